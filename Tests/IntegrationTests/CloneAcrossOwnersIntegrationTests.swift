// Clones and parents on different routers (docs/design.md, "Clones across owners"): separate `vd serve` processes
// sharing one backend. A clone moved away from its parent's router, a clone created on a router that does not own
// the parent, and clones left behind when their parent moves all read the parent's snapshot from the backend, keep
// reading it right while the owner scrubs it, and keep it from being deleted.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct CloneAcrossOwnersIntegrationTests {
    @Test func clonesReadThroughAParentAnotherRouterOwns() throws {
        let directory = try TemporaryDirectory("vd-clone-x")
        defer { directory.remove() }
        let shared = directory.path + "/shared"
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        let config = directory.path + "/vd.toml"
        try """
        [backends.local]
        url = "file://\(shared)"
        [sco]
        size = "4M"
        [upload]
        max_pending = "8M"
        [cache]
        size = "16M"
        [scrub]
        poll_seconds = 1
        delete_grace_seconds = 0
        """.write(toFile: config, atomically: true, encoding: .utf8)
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
        func vd(_ server: VDServer, _ arguments: [String]) throws -> ProcessResult {
            let result = try server.cli(arguments + ["--config", config])
            #expect(result.succeeded, "vd \(arguments.joined(separator: " ")): \(result.output)\(result.error)")
            return result
        }
        /// qemu-io on one export; a failure is recorded with the failing command's output only.
        func io(
            _ server: VDServer, _ volume: String, _ commands: [String], readOnly: Bool = false,
            sourceLocation: SourceLocation = #_sourceLocation
        ) {
            let arguments =
                ["-f", "raw"] + (readOnly ? ["-r"] : []) + commands.flatMap { ["-c", $0] } + [server.uri(volume)]
            let result = try? ProcessRunner.run("qemu-io", arguments)
            let ok = result.map { $0.succeeded && !$0.output.contains("failed") && !$0.error.contains("failed") }
            #expect(
                ok == true,
                "qemu-io on \(volume): \(result.map { $0.output.split(separator: "\n").filter { $0.contains("fail") }.prefix(3).joined(separator: "; ") + $0.error } ?? "did not run")",
                sourceLocation: sourceLocation)
        }
        // s1's SCOs are half garbage, so a scrub must relocate what s1 reads: 64 KiB chunks alternate between 0x11
        // and 0x33 over 0..<16M, and the 0x33 chunks are overwritten with 0x44 before s1. After s1 the parent
        // overwrites 0..<2M with 0x22. What every clone of s1 reads where it never wrote:
        let chunks = 0..<128
        let snapshotReads =
            chunks.flatMap { ["read -P 0x11 \($0 * 128)k 64k", "read -P 0x44 \($0 * 128 + 64)k 64k"] } + [
                "read -P 0 16M 48M"
            ]
        let fill =
            chunks.flatMap { ["write -P 0x11 \($0 * 128)k 64k", "write -P 0x33 \($0 * 128 + 64)k 64k"] }
            + chunks.map { "write -P 0x44 \($0 * 128 + 64)k 64k" } + ["flush"]

        _ = try vd(a, ["volume", "create", "vol1", "--size", "64M"])
        try a.start()
        try b.start()
        io(a, "vol1", fill)
        _ = try vd(a, ["snapshot", "create", "vol1", "s1"])
        io(a, "vol1", ["write -P 0x22 0 2M", "flush"])

        // 1. A clone made next to its parent moves away alone: on B it reads s1 from the backend.
        _ = try vd(a, ["clone", "create", "vol1@s1", "c1"])
        io(a, "c1", ["write -P 0x55 16M 1M", "flush"])
        let c1Reads = Array(snapshotReads.dropLast()) + ["read -P 0x55 16M 1M", "read -P 0 17M 47M"]
        let moveC1 = try ProcessRunner.run(
            a.binary, ["volume", "move", "c1", "--to", "node-b", "--data-dir", a.dataDirectory, "--config", config],
            environment: environment)
        #expect(moveC1.succeeded, "\(moveC1.output)\(moveC1.error)\n\(a.output)\n\(b.output)")
        io(b, "c1", c1Reads)
        #expect(b.output.contains("volume c1: reads vol1@s1 from the backend"), "\(b.output)")

        // 2. A clone created on B, which does not own the parent: A records it in s1.
        _ = try vd(b, ["clone", "create", "vol1@s1", "c2"])
        io(b, "c2", snapshotReads + ["write -P 0x66 32M 64k", "read -P 0x66 32M 64k"])
        let snapshots = try vd(a, ["snapshot", "list", "vol1"])
        #expect(snapshots.output.contains("c1") && snapshots.output.contains("c2"), "\(snapshots.output)")
        let refused = try a.cli(["snapshot", "delete", "vol1", "s1", "--config", config])
        #expect(!refused.succeeded && refused.error.contains("c2"), "\(refused.output)\(refused.error)")
        // Nor can the parent go while clones on other routers read it.
        let parentDelete = try a.cli(["volume", "delete", "vol1", "--config", config])
        #expect(
            !parentDelete.succeeded && parentDelete.error.contains("c2 (of s1)"),
            "\(parentDelete.output)\(parentDelete.error)")

        // 3. The parent moves away from a clone that stays: c3 on A switches to a backend view while it is open.
        _ = try vd(a, ["clone", "create", "vol1@s1", "c3"])
        io(a, "c3", snapshotReads)
        let moveParent = try ProcessRunner.run(
            a.binary,
            ["volume", "move", "vol1", "--to", "node-b", "--data-dir", a.dataDirectory, "--config", config],
            environment: environment)
        #expect(moveParent.succeeded, "\(moveParent.output)\(moveParent.error)\n\(a.output)")
        #expect(a.output.contains("volume c3: reads vol1@s1 from the backend from now on"), "\(a.output)")
        io(a, "c3", snapshotReads)
        io(b, "vol1", ["read -P 0x22 0 2M"] + Array(snapshotReads.dropFirst(32).dropLast()), readOnly: true)

        // 4. The new owner scrubs s1's SCOs: relocated clusters, sources deleted; every clone still reads them.
        let scosBefore = try FileManager.default.contentsOfDirectory(atPath: shared + "/vol1/sco")
        let scrub = try vd(b, ["scrub", "--volume", "vol1", "--threshold", "0.95"])
        print("scrub: \(scrub.output)")
        #expect(scrub.output.contains("copying") && !scrub.output.contains("copying 0 "), "\(scrub.output)")
        var deleted: Set<String> = []
        for _ in 0..<100 {
            // B applies the result, stores the TLog that carries it, then deletes the sources (no grace here).
            deleted = Set(scosBefore).subtracting(
                try FileManager.default.contentsOfDirectory(atPath: shared + "/vol1/sco"))
            if !deleted.isEmpty { break }
            Thread.sleep(forTimeInterval: 0.2)
        }
        #expect(!deleted.isEmpty, "the scrub deleted no source SCO: \(scrub.output)\n\(b.output)")
        // Fresh readers (their caches hold nothing of the deleted SCOs) and the old ones alike.
        #expect(try a.stop() == 0)
        try a.start()
        io(a, "c3", snapshotReads)
        io(b, "c1", c1Reads)
        // (B's flash cache is small: its views of s1 lost the windows they fetched, found the SCOs gone and
        // replayed vol1's namespace.)
        #expect(b.output.contains("replaying the parent's namespace again"), "\(b.output)")
        io(b, "c2", Array(snapshotReads.dropLast()) + ["read -P 0 16M 16M", "read -P 0x66 32M 64k"])

        // 5. Deleting a clone on A forgets it in B's table; s1 goes once no clone reads it.
        _ = try vd(a, ["volume", "delete", "c3"])
        _ = try vd(b, ["volume", "delete", "c2"])
        _ = try vd(b, ["volume", "delete", "c1"])
        let after = try vd(b, ["snapshot", "list", "vol1"])
        #expect(!after.output.contains("c3") && !after.output.contains("c2"), "\(after.output)")
        // A clone recorded by a creation that failed on its router (it exists nowhere) does not keep s1.
        let line = b.output.split(separator: "\n").first { $0.contains("cluster API of node node-b at ") }
        let address = try #require(line.flatMap { $0.split(separator: " ").last }.map(String.init))
        let ghost = try ProcessRunner.run(
            "/usr/bin/curl",
            [
                "-s", "-H", "Authorization: Bearer \(token)", "-d", #"{"clone":"ghost","present":true}"#,
                "http://\(address)/v1/volumes/vol1/snapshots/s1/clones",
            ])
        #expect(ghost.output.contains("ghost"), "\(ghost.output)\(ghost.error)")
        _ = try vd(b, ["snapshot", "delete", "vol1", "s1"])
        #expect(b.output.contains("clone ghost recorded in snapshot s1 does not exist; forgetting it"))
        let check = try vd(b, ["check", "vol1"])
        #expect(check.output.contains("\nclean") || check.output.hasPrefix("clean"), "\(check.output)")
    }
}
