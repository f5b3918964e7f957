// Two routers sharing one backend (`vd serve --node`): a volume is served by one of them at a time under an owner
// lease on the backend; the other refuses it naming the owner; a clean, drained shutdown releases it and the other
// router then serves it with everything written before.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct OwnershipIntegrationTests {
    @Test func oneRouterServesAVolumeAtATimeAndACleanShutdownHandsItOver() throws {
        let directory = try TemporaryDirectory("vd-own")
        defer { directory.remove() }
        let shared = directory.path + "/shared"
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        let url = "file://" + shared
        let a = try VDServer(dataDirectory: directory.path + "/a", extraArguments: ["--node", "node-a"])
        let b = try VDServer(dataDirectory: directory.path + "/b", extraArguments: ["--node", "node-b"])
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
        }
        #expect(try a.cli(["volume", "create", "vol1", "--size", "64M", "--backend", url]).succeeded)
        try a.start()
        #expect(a.output.contains("owned by node node-a, generation 1"), "\(a.output)")
        let write = try ProcessRunner.run(
            "qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", a.uri("vol1")])
        #expect(write.succeeded && !write.output.contains("failed"), "\(write.output)\(write.error)")
        let owner = try FileManager.default.contentsOfDirectory(atPath: shared + "/vol1/owner")
        #expect(!owner.isEmpty, "the owner record is on the backend")

        // B registers the volume but does not serve it while A owns it.
        let attach = try b.cli(["volume", "attach", "vol1", "--backend", url])
        #expect(attach.succeeded, "\(attach.output)\(attach.error)")
        try b.start()
        #expect(
            b.output.contains("volume vol1 is not served") && b.output.contains("owned by node node-a"), "\(b.output)")
        let refused = try ProcessRunner.run("nbdinfo", [b.uri("vol1")])
        #expect(!refused.succeeded, "node B must not export a volume node A owns")
        // A keeps serving.
        let stillA = try ProcessRunner.run("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", a.uri("vol1")])
        #expect(stillA.succeeded && !stillA.output.contains("failed"), "\(stillA.output)\(stillA.error)")

        // A clean shutdown uploads everything and releases the volume; B then takes it at once (generation 2).
        #expect(try a.stop() == 0, "\(a.output)")
        #expect(try b.stop() == 0)
        try b.start()
        #expect(b.output.contains("owned by node node-b, generation 2"), "\(b.output)")
        let onB = try ProcessRunner.run(
            "qemu-io",
            ["-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "write -P 0x77 1M 64k", "-c", "flush", b.uri("vol1")])
        #expect(onB.succeeded && !onB.output.contains("failed"), "\(onB.output)\(onB.error)")

        // Now A refuses it, naming B.
        try a.start()
        #expect(
            a.output.contains("volume vol1 is not served") && a.output.contains("owned by node node-b"), "\(a.output)")
        #expect(!(try ProcessRunner.run("nbdinfo", [a.uri("vol1")])).succeeded)
    }

    /// The owner cannot reach its owner record (the directory is replaced by a file: every renewal fails, as in a
    /// partition from the bucket): within the lease its NBD requests fail (ESHUTDOWN), it keeps serving its other
    /// volumes, and once renewals go through again the same router serves the volume again.
    @Test func anOwnerThatCannotRenewStopsAcknowledgingWithinTheLease() throws {
        let directory = try TemporaryDirectory("vd-own")
        defer { directory.remove() }
        let shared = directory.path + "/shared"
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        let config = directory.path + "/vd.toml"
        try "[cluster]\nnode = \"node-a\"\nlease_seconds = 3\n".write(toFile: config, atomically: true, encoding: .utf8)
        let a = try VDServer(dataDirectory: directory.path + "/a", extraArguments: ["--config", config])
        defer { _ = try? a.stop() }
        let url = "file://" + shared
        #expect(
            try a.cli(["volume", "create", "vol1", "--size", "64M", "--backend", url, "--config", config]).succeeded)
        #expect(try a.cli(["volume", "create", "vol2", "--size", "64M", "--config", config]).succeeded)
        try a.start()
        func io(_ volume: String, _ command: String) throws -> Bool {
            let result = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", command, "-c", "flush", a.uri(volume)])
            return result.succeeded && !result.output.contains("failed")
        }
        #expect(try io("vol1", "write -P 0x11 0 64k"))
        // Cut the owner record off: the directory becomes a file.
        let records = shared + "/vol1/owner"
        try FileManager.default.moveItem(atPath: records, toPath: records + ".away")
        _ = FileManager.default.createFile(atPath: records, contents: Data("not a directory".utf8))
        let deadline = Date().addingTimeInterval(15)
        var refused = false
        while Date() < deadline {
            if !(try io("vol1", "write -P 0x22 0 4k")) {
                refused = true
                break
            }
            usleep(250_000)
        }
        #expect(refused, "writes must fail once the lease ran out")
        #expect(Date() < deadline)
        #expect(a.output.contains("cannot renew the owner lease of volume vol1"), "\(a.output)")
        // Other volumes are not affected.
        #expect(try io("vol2", "write -P 0x33 0 4k"))
        // The backend comes back: renewals succeed and the volume is served again.
        try FileManager.default.removeItem(atPath: records)
        try FileManager.default.moveItem(atPath: records + ".away", toPath: records)
        var back = false
        let again = Date().addingTimeInterval(15)
        while Date() < again {
            if try io("vol1", "read -P 0x11 4k 60k") {
                back = true
                break
            }
            usleep(250_000)
        }
        #expect(back, "\(a.output)")
    }

    /// `vd volume move` between two routers on one backend: fio writes with a verify state on node A (its data still
    /// only on A's flash), the volume moves to node B (drained, released, taken), and fio verifies every block on B;
    /// A no longer exports it; the cluster API refuses a request without the token.
    @Test func moveToAnotherNodeKeepsEveryWrite() throws {
        let directory = try TemporaryDirectory("vd-move")
        defer { directory.remove() }
        let shared = directory.path + "/shared"
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        let config = directory.path + "/vd.toml"
        try "[backends.local]\nurl = \"file://\(shared)\"\n".write(toFile: config, atomically: true, encoding: .utf8)
        let token = "test-cluster-token-0123456789"
        let environment = ["VD_CLUSTER_TOKEN": token]
        func router(_ node: String) throws -> VDServer {
            try .clusterNode(node, in: directory.path, config: config, token: token)
        }
        let a = try router("node-a")
        let b = try router("node-b")
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
        }
        #expect(try a.cli(["volume", "create", "vol1", "--size", "64M", "--config", config]).succeeded)
        try a.start()
        try b.start()
        let job = [
            "--name=move", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=32M", "--io_size=8M",
            "--verify=crc32c", "--do_verify=0", "--verify_state_save=1", "--randrepeat=1",
        ]
        let write = try ProcessRunner.run(
            "fio", job + ["--uri=" + a.uri("vol1")], currentDirectory: directory.path)
        #expect(write.succeeded, "\(write.output)\(write.error)")

        func moveToB() throws -> ProcessResult {
            try ProcessRunner.run(
                a.binary,
                ["volume", "move", "vol1", "--to", "node-b", "--data-dir", a.dataDirectory, "--config", config],
                environment: environment)
        }
        // The target is down: the move fails after the drain and A serves the volume again (taking its own release
        // back: generation 2; the real move then makes generation 3).
        #expect(try b.stop() == 0)
        let failed = try moveToB()
        #expect(
            !failed.succeeded && failed.error.contains("it is served here again"), "\(failed.output)\(failed.error)")
        #expect(try ProcessRunner.run("nbdinfo", [a.uri("vol1")]).succeeded, "\(a.output)")
        try b.start()

        let move = try moveToB()
        #expect(move.succeeded, "\(move.output)\(move.error)\n\(a.output)\n\(b.output)")
        #expect(move.output.contains("moved volume vol1 from node-a to node-b (generation 3)"), "\(move.output)")
        print("move: \(move.output)")

        let verify = try ProcessRunner.run(
            "fio",
            job.filter { $0 != "--verify_state_save=1" && $0 != "--do_verify=0" }
                + ["--verify_only", "--verify_state_load=1", "--uri=" + b.uri("vol1")],
            currentDirectory: directory.path)
        #expect(verify.succeeded && !verify.output.contains("verify failed"), "\(verify.output)\(verify.error)")
        #expect(!(try ProcessRunner.run("nbdinfo", [a.uri("vol1")])).succeeded, "node A must not export vol1 any more")
        #expect(!(try a.cli(["volume", "list", "--config", config])).output.contains("vol1"), "A forgot the volume")

        // The cluster API wants the token.
        let line = b.output.split(separator: "\n").first { $0.contains("cluster API of node node-b at ") }
        let address = try #require(line.flatMap { $0.split(separator: " ").last }.map(String.init))
        let anonymous = try ProcessRunner.run(
            "/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://\(address)/v1/volumes"])
        #expect(anonymous.output == "401", "\(anonymous.output)")
        let authorized = try ProcessRunner.run(
            "/usr/bin/curl", ["-s", "-H", "Authorization: Bearer \(token)", "http://\(address)/v1/volumes"])
        #expect(authorized.output.contains("vol1"), "\(authorized.output)")
    }
}
