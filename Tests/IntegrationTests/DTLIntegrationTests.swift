// The distributed transaction log with routers as separate `vd serve` processes sharing one backend (a local
// directory), each serving as DTL peer (`--dtl-listen`), a 3 s lease:
//
// - Node loss: fio writes with periodic flushes on A, mirrored in sync mode to B; A is killed (-9) and its data
//   directory deleted; `vd volume takeover` on B fetches the journals from its own peer service: fio --verify_only of
//   everything passes. Once with SCOs large enough that nothing reaches the backend before the loss, once with small
//   SCOs (most of it uploaded, the rest only on A and B).
// - Peer loss: B is killed and loses its data directory mid-run; A continues degraded (flushes within the timeout);
//   B returns empty, A catches it up; then A is lost: everything flushed is on the new owner.
// - A stopped peer (SIGSTOP: no answers, the connection open): A's writes wait at most the DTL timeout, then A is
//   degraded; the slowest write is reported.
// - A peer in a network namespace behind a veth pair: A's p99 write latency is reported (and with a 5 ms `tc netem`
//   delay, where the kernel has netem); with the link down A's writes wait at most the timeout, then A is degraded;
//   with the link back it catches up.
// - Owner and peer both lost: the takeover names the window that may be lost and refuses without --accept-loss.
// - With the cluster's TLS configured, the mirror runs over TLS (client certificates of the cluster CA).

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct DTLIntegrationTests {
    static let token = "test-cluster-token-0123456789"

    struct Cluster {
        let directory: TemporaryDirectory
        let shared: String
        let config: String

        init(_ label: String, scoSize: String, tls: Bool = false) throws {
            directory = try TemporaryDirectory(label)
            shared = directory.path + "/shared"
            try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
            config = directory.path + "/vd.toml"
            var tlsLines = ""
            if tls {
                let pki = directory.path + "/pki"
                try FileManager.default.createDirectory(atPath: pki, withIntermediateDirectories: true)
                let made = try TestCertificates.make(in: pki)
                #expect(made.succeeded, "\(made.error)")
                tlsLines =
                    "tls_certificate = \"\(pki)/router-cert.pem\"\ntls_key = \"\(pki)/router-key.pem\"\ntls_ca = \"\(pki)/ca-cert.pem\""
            }
            try """
            [backends.local]
            url = "file://\(shared)"

            [cluster]
            lease_seconds = 3
            \(tlsLines)

            [sco]
            size = "\(scoSize)"

            [upload]
            max_age_seconds = 3600

            [dtl]
            timeout_seconds = 2
            """.write(toFile: config, atomically: true, encoding: .utf8)
        }

        func router(_ node: String) throws -> VDServer {
            try .clusterNode(node, in: directory.path, config: config, token: DTLIntegrationTests.token, dtl: true)
        }

        func vd(_ server: VDServer, _ arguments: [String]) throws -> ProcessResult {
            try server.cli(arguments + ["--config", config])
        }

        /// The volume's DTL state from `vd volume info --json` (nil: none shown).
        func dtlState(_ server: VDServer, _ volume: String) throws -> String? {
            let info = try vd(server, ["volume", "info", volume, "--json"])
            guard info.succeeded, let object = try? JSONSerialization.jsonObject(with: Data(info.output.utf8)),
                let status = object as? [String: Any], let dtl = status["dtl"] as? [String: Any]
            else { return nil }
            return dtl["state"] as? String
        }

        func waitForDTL(_ server: VDServer, _ volume: String, state: String, timeoutSeconds: Double = 60) throws {
            let deadline = Date().addingTimeInterval(timeoutSeconds)
            var last: String?
            while Date() < deadline {
                last = try dtlState(server, volume)
                if last == state { return }
                usleep(100_000)
            }
            Issue.record("the DTL of \(volume) did not reach \(state) (last: \(last ?? "none")): \(server.output)")
        }

        /// Creates vol1 on the first router, starts them all, mirrors vol1 in sync mode to node-b and waits until it
        /// is in sync.
        func startMirrored(_ routers: [VDServer]) throws {
            #expect(try vd(routers[0], ["volume", "create", "vol1", "--size", "64M"]).succeeded)
            for router in routers { try router.start() }
            let set = try vd(routers[0], ["volume", "dtl", "vol1", "--mode", "sync", "--peer", "node-b"])
            #expect(set.succeeded && set.output.contains("sync to node-b"), "\(set.output)\(set.error)")
            try waitForDTL(routers[0], "vol1", state: "in_sync")
        }

        /// The node is lost with its disk.
        func lose(_ server: VDServer) {
            server.kill9()
            try? FileManager.default.removeItem(atPath: server.dataDirectory)
        }

        func remove() { directory.remove() }
    }

    static func fio(_ uri: String, _ job: [String], in directory: String) throws -> ProcessResult {
        try ProcessRunner.run("fio", job + ["--uri=" + uri], currentDirectory: directory)
    }

    static func qemuIO(_ uri: String, _ commands: [String]) throws -> ProcessResult {
        try ProcessRunner.run("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri])
    }

    /// fio randwrite with a flush every 16 writes, then fio --verify_only of all of it on `verifier` after A's loss.
    func nodeLoss(scoSize: String, seed: Int) throws {
        let cluster = try Cluster("vd-dtl-loss", scoSize: scoSize)
        defer { cluster.remove() }
        let a = try cluster.router("node-a")
        let b = try cluster.router("node-b")
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
        }
        try cluster.startMirrored([a, b])

        let job = [
            "--name=dtl\(seed)", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=32M", "--io_size=12M",
            "--iodepth=8", "--fsync=16", "--end_fsync=1", "--verify=crc32c", "--do_verify=0", "--verify_state_save=1",
            "--randseed=\(seed)",
        ]
        let write = try Self.fio(a.uri("vol1"), job, in: cluster.directory.path)
        #expect(write.succeeded, "\(write.output)\(write.error)")
        #expect(try cluster.dtlState(a, "vol1") == "in_sync")
        let info = try cluster.vd(a, ["volume", "info", "vol1"])
        print("before the loss (SCO size \(scoSize)):\n\(info.output)")

        cluster.lose(a)
        let takeover = try cluster.vd(b, ["volume", "takeover", "vol1"])
        #expect(takeover.succeeded, "\(takeover.output)\(takeover.error)\(b.output)")
        #expect(b.output.contains("from the DTL peer"), "\(b.output)")
        let verify = try Self.fio(
            b.uri("vol1"),
            job.filter { $0 != "--verify_state_save=1" && $0 != "--do_verify=0" } + [
                "--verify_only", "--verify_state_load=1",
            ], in: cluster.directory.path)
        #expect(verify.succeeded && !verify.output.contains("verify failed"), "\(verify.output)\(verify.error)")
        // B owns it now and is no peer of its own: with node-a gone the new owner is degraded, and says so.
        let after = try cluster.vd(b, ["volume", "info", "vol1"])
        #expect(after.output.contains("DTL:"), "\(after.output)")
    }

    @Test func aLostOwnersFlushedWritesAreRecoveredFromThePeerWithNothingUploaded() throws {
        try nodeLoss(scoSize: "64M", seed: 11)
    }

    @Test func aLostOwnersFlushedWritesAreRecoveredFromThePeerAndTheBackend() throws {
        try nodeLoss(scoSize: "4M", seed: 12)
    }

    @Test func theMirrorRunsOverTLSWhenTheClusterDoes() throws {
        let cluster = try Cluster("vd-dtl-tls", scoSize: "64M", tls: true)
        defer { cluster.remove() }
        let a = try cluster.router("node-a")
        let b = try cluster.router("node-b")
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
        }
        try cluster.startMirrored([a, b])
        #expect(b.output.contains("DTL peer service at") && b.output.contains("(TLS)"), "\(b.output)")
        let write = try Self.qemuIO(a.uri("vol1"), ["write -P 0x66 0 4M", "flush"])
        #expect(write.succeeded && !write.output.contains("failed"), "\(write.output)")
        cluster.lose(a)
        let takeover = try cluster.vd(b, ["volume", "takeover", "vol1"])
        #expect(takeover.succeeded, "\(takeover.output)\(takeover.error)\(b.output)")
        let read = try Self.qemuIO(b.uri("vol1"), ["read -P 0x66 0 4M"])
        #expect(read.succeeded && !read.output.contains("Pattern verification failed"), "\(read.output)")
    }

    /// The p99 completion latency (microseconds) of fio randwrite 4k qd1 for `seconds` on `uri`.
    static func p99(_ uri: String, seconds: Int, in directory: String) throws -> Double? {
        let run = try fio(
            uri,
            [
                "--name=lat", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=1", "--size=16M",
                "--runtime=\(seconds)", "--time_based", "--output-format=json",
            ], in: directory)
        guard run.succeeded, let start = run.output.firstIndex(of: "{"),
            let object = try? JSONSerialization.jsonObject(with: Data(run.output[start...].utf8)) as? [String: Any],
            let jobs = object["jobs"] as? [[String: Any]], let write = jobs.first?["write"] as? [String: Any],
            let clat = write["clat_ns"] as? [String: Any], let percentiles = clat["percentile"] as? [String: Any],
            let p99 = percentiles["99.000000"] as? NSNumber
        else { return nil }
        return p99.doubleValue / 1000
    }

    /// The peer in a network namespace, reached through a veth pair: a 5 ms delay (`tc netem`, if the kernel has it)
    /// shows in the owner's write latency, and a cut link degrades the owner within the timeout; the link back, it
    /// catches up.
    @Test func aPeerInANetworkNamespaceCutOffDegradesTheOwnerWithinTheTimeout() throws {
        let cluster = try Cluster("vd-dtl-netns", scoSize: "64M")
        defer { cluster.remove() }
        let network = try VethNamespace(prefix: "vdd", subnet: 214)
        defer { network.remove() }

        let a = try cluster.router("node-a")
        let b = try VDServer(
            dataDirectory: cluster.directory.path + "/node-b",
            extraArguments: [
                "--config", cluster.config, "--node", "node-b", "--cluster-listen", "\(network.namespaceAddress):0",
                "--dtl-listen",
                "\(network.namespaceAddress):0",
            ], environment: ["VD_CLUSTER_TOKEN": Self.token])
        b.launcher = network.launcher
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
        }
        try cluster.startMirrored([a, b])

        let near = try #require(try Self.p99(a.uri("vol1"), seconds: 3, in: cluster.directory.path))
        let delayed = try ProcessRunner.run(
            "/usr/sbin/tc", ["qdisc", "add", "dev", network.hostSide, "root", "netem", "delay", "5ms"])
        if delayed.succeeded {
            let far = try #require(try Self.p99(a.uri("vol1"), seconds: 3, in: cluster.directory.path))
            print("DTL sync, randwrite 4k qd1 p99: \(Int(near)) us on the veth pair, \(Int(far)) us with 5 ms added")
            #expect(far >= 5000, "every write waits for the peer's answer")
        } else {
            // `tc netem` needs the sch_netem kernel module, which this machine's kernel lacks.
            print(
                "DTL sync, randwrite 4k qd1 p99: \(Int(near)) us on the veth pair; no delay added (tc netem: \(delayed.error.trimmingCharacters(in: .whitespacesAndNewlines)))"
            )
        }

        // Partitioned: the peer stops answering; writes wait at most the 2 s timeout, then A is degraded.
        try network.setLink(up: false)
        let started = Date()
        let write = try Self.qemuIO(a.uri("vol1"), ["write -P 0x77 0 64k", "flush", "write -P 0x78 64k 64k", "flush"])
        let seconds = Date().timeIntervalSince(started)
        #expect(write.succeeded && !write.output.contains("failed"), "\(write.output)")
        print("writes while the peer was partitioned: \(String(format: "%.2f", seconds)) s (DTL timeout 2 s)")
        #expect(seconds < 2 * 2 + 3)
        #expect(try cluster.dtlState(a, "vol1") == "degraded")
        try network.setLink(up: true)
        try cluster.waitForDTL(a, "vol1", state: "in_sync")
    }

    @Test func aLostPeerIsCaughtUpWhenItReturnsAndProtectsAgain() throws {
        let cluster = try Cluster("vd-dtl-peer", scoSize: "4M")
        defer { cluster.remove() }
        let a = try cluster.router("node-a")
        let b = try cluster.router("node-b")
        let c = try cluster.router("node-c")
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
            _ = try? c.stop()
        }
        try cluster.startMirrored([a, b, c])
        let first = try Self.qemuIO(a.uri("vol1"), ["write -P 0x11 0 6M", "flush"])
        #expect(first.succeeded && !first.output.contains("failed"), "\(first.output)")

        // B is lost with its disk: A goes on, degraded.
        cluster.lose(b)
        let started = Date()
        let second = try Self.qemuIO(a.uri("vol1"), ["write -P 0x22 6M 6M", "flush"])
        let seconds = Date().timeIntervalSince(started)
        #expect(second.succeeded && !second.output.contains("failed"), "\(second.output)")
        print("6 MiB written and flushed while the peer was lost: \(String(format: "%.2f", seconds)) s")
        #expect(seconds < 20)
        try cluster.waitForDTL(a, "vol1", state: "degraded")
        let degraded = try cluster.vd(a, ["volume", "info", "vol1"])
        #expect(degraded.output.contains("degraded"), "\(degraded.output)")
        let metrics = try ProcessRunner.run(
            "curl", ["-s", "--unix-socket", a.dataDirectory + "/api.sock", "http://localhost/metrics"])
        #expect(metrics.output.contains("vd_volume_dtl_state{volume=\"vol1\"} 3"), "\(metrics.output)")

        // B returns with an empty disk: A resends everything the backend lacks.
        try b.start()
        try cluster.waitForDTL(a, "vol1", state: "in_sync")
        let third = try Self.qemuIO(a.uri("vol1"), ["write -P 0x33 12M 6M", "flush"])
        #expect(third.succeeded && !third.output.contains("failed"), "\(third.output)")

        // Now A is lost: C takes it over with B's journals.
        cluster.lose(a)
        let takeover = try cluster.vd(c, ["volume", "takeover", "vol1"])
        #expect(takeover.succeeded, "\(takeover.output)\(takeover.error)\(c.output)")
        let read = try Self.qemuIO(
            c.uri("vol1"), ["read -P 0x11 0 6M", "read -P 0x22 6M 6M", "read -P 0x33 12M 6M"])
        #expect(read.succeeded && !read.output.contains("Pattern verification failed"), "\(read.output)")
        // C chose a peer other than itself (B) and mirrors to it.
        try cluster.waitForDTL(c, "vol1", state: "in_sync")
    }

    @Test func aStoppedPeerHoldsWritesAtMostTheTimeoutThenTheOwnerDegrades() throws {
        let cluster = try Cluster("vd-dtl-slow", scoSize: "64M")
        defer { cluster.remove() }
        let a = try cluster.router("node-a")
        let b = try cluster.router("node-b")
        defer {
            kill(b.pid, SIGCONT)
            _ = try? a.stop()
            _ = try? b.stop()
        }
        try cluster.startMirrored([a, b])
        // The peer stops answering (its connection stays open): each write waits, up to the 2 s timeout.
        kill(b.pid, SIGSTOP)
        let started = Date()
        let write = try Self.qemuIO(a.uri("vol1"), ["write -P 0x44 0 64k", "flush", "write -P 0x45 64k 64k", "flush"])
        let seconds = Date().timeIntervalSince(started)
        #expect(write.succeeded && !write.output.contains("failed"), "\(write.output)")
        print("writes while the peer was stopped: \(String(format: "%.2f", seconds)) s (DTL timeout 2 s)")
        #expect(seconds < 2 * 2 + 3, "a write waited longer than the timeout and the degraded record")
        #expect(try cluster.dtlState(a, "vol1") == "degraded")
        kill(b.pid, SIGCONT)
        try cluster.waitForDTL(a, "vol1", state: "in_sync")
    }

    @Test func withOwnerAndPeerLostTheTakeoverNamesTheWindowAndNeedsAcceptLoss() throws {
        let cluster = try Cluster("vd-dtl-both", scoSize: "64M")
        defer { cluster.remove() }
        let a = try cluster.router("node-a")
        let b = try cluster.router("node-b")
        let c = try cluster.router("node-c")
        defer {
            _ = try? a.stop()
            _ = try? b.stop()
            _ = try? c.stop()
        }
        try cluster.startMirrored([a, b, c])
        #expect(try Self.qemuIO(a.uri("vol1"), ["write -P 0x55 0 1M", "flush"]).succeeded)
        cluster.lose(a)
        cluster.lose(b)
        let refused = try cluster.vd(c, ["volume", "takeover", "vol1"])
        #expect(!refused.succeeded)
        #expect(
            refused.error.contains("may exist only on the lost node") && refused.error.contains("--accept-loss"),
            "\(refused.output)\(refused.error)")
        let accepted = try cluster.vd(c, ["volume", "takeover", "vol1", "--accept-loss"])
        #expect(accepted.succeeded, "\(accepted.output)\(accepted.error)\(c.output)")
        #expect(try Self.qemuIO(c.uri("vol1"), ["read -P 0x00 0 1M"]).succeeded)
    }
}
