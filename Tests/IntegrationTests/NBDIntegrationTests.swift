// The NBD export of vd serve with clients that use more of the protocol: several connections (multi-conn),
// nbdcopy with four connections, qemu's NBD client reconnecting across a kill -9, block status maps, and many
// handshakes in a row (no resources left behind).

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct NBDIntegrationTests {
    func serve(_ size: String = "64M") throws -> (TemporaryDirectory, VDServer) {
        let directory = try TemporaryDirectory("vd-nbd")
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", size]).succeeded)
        try server.start()
        return (directory, server)
    }

    @Test func flushOnOneConnectionCoversWritesOfAnother() throws {
        let (directory, server) = try serve()
        defer {
            _ = try? server.stop()
            directory.remove()
        }
        let info = try ProcessRunner.run("nbdinfo", ["--json", server.uri("vol1")])
        #expect(info.output.contains("\"can_multi_conn\": true"))
        let c0 = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        let c1 = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        let c2 = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        let data = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try c1.write(offset: 1 << 20, data)
        try c2.flush()
        #expect(try c0.read(offset: 1 << 20, length: 65536) == data)
        // The flush made c1's write durable: after kill -9 and restart it is there (durable writes survive either
        // way; what the router must not do is acknowledge a flush before the journal holding c1's write is synced,
        // which the engine tests check at the generation level).
        server.kill9()
        try server.start()
        let again = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        #expect(try again.read(offset: 1 << 20, length: 65536) == data)
    }

    @Test func nbdcopyWithFourConnectionsRoundTrips() throws {
        let (directory, server) = try serve()
        defer {
            _ = try? server.stop()
            directory.remove()
        }
        let source = directory.path + "/source.raw"
        #expect(try ProcessRunner.run("qemu-img", ["create", "-f", "raw", source, "64M"]).succeeded)
        #expect(
            try ProcessRunner.run(
                "qemu-io", ["-f", "raw", "-c", "write -P 0x31 0 20M", "-c", "write -P 0x32 40M 8M", source]
            ).succeeded)
        let into = try ProcessRunner.run("nbdcopy", ["--connections=4", source, server.uri("vol1")])
        #expect(into.succeeded, "\(into.error)")
        let back = directory.path + "/back.raw"
        let out = try ProcessRunner.run("nbdcopy", ["--connections=4", server.uri("vol1"), back])
        #expect(out.succeeded, "\(out.error)")
        #expect(try ProcessRunner.run("cmp", [source, back]).succeeded)
        // Block status: the holes show up (nbdinfo --map), and qemu-img map agrees on what holds data.
        let map = try ProcessRunner.run("nbdinfo", ["--map", server.uri("vol1")])
        #expect(map.succeeded && map.output.contains("hole"), "\(map.output)")
        #expect(map.output.contains("data"))
    }

    @Test func qemuReconnectsAcrossKillNine() throws {
        let (directory, server) = try serve()
        defer {
            _ = try? server.stop()
            directory.remove()
        }
        let image = "driver=nbd,server.type=unix,server.path=\(server.socketPath),export=vol1,reconnect-delay=20"
        let io = Process()
        io.executableURL = URL(fileURLWithPath: try ProcessRunner.which("qemu-io"))
        io.arguments = [
            "--image-opts", image, "-c", "write -P 0x61 0 1M", "-c", "sleep 3000", "-c", "write -P 0x62 1M 1M",
            "-c", "read -P 0x61 0 1M", "-c", "read -P 0x62 1M 1M",
        ]
        let pipe = Pipe()
        io.standardOutput = pipe
        io.standardError = pipe
        try io.run()
        // While qemu-io sleeps between its writes, the router dies and comes back.
        Thread.sleep(forTimeInterval: 1.0)
        server.kill9()
        Thread.sleep(forTimeInterval: 0.5)
        try server.start()
        let deadline = Date().addingTimeInterval(60)
        while io.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.1) }
        if io.isRunning { io.terminate() }
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(io.terminationStatus == 0, "\(output)")
        #expect(output.contains("read 1048576/1048576 bytes at offset 1048576"), "\(output)")
        #expect(!output.contains("failed"), "\(output)")
    }

    @Test func thousandsOfHandshakesLeaveNothingBehind() throws {
        let (directory, server) = try serve("16M")
        defer {
            _ = try? server.stop()
            directory.remove()
        }
        func rss() -> Int {
            let status = (try? String(contentsOfFile: "/proc/\(server.pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
            return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
        }
        for _ in 0..<200 { try NBDTestClient(socketPath: server.socketPath, export: "vol1").disconnect() }
        let before = rss()
        for index in 0..<3000 {
            let client = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
            if index % 3 == 0 { _ = try client.read(offset: 0, length: 4096) }
            if index % 2 == 0 { client.disconnect() }  // the others vanish without NBD_CMD_DISC
        }
        Thread.sleep(forTimeInterval: 1)
        let after = rss()
        #expect(after - before < 32 * 1024, "resident memory grew from \(before) KiB to \(after) KiB over 3000 handshakes")
        let metrics = try ProcessRunner.run(
            "/usr/bin/curl", ["-s", "--unix-socket", server.dataDirectory + "/api.sock", "http://vd/metrics"])
        #expect(metrics.output.contains("vd_volume_nbd_connections{volume=\"vol1\"} 0"), "\(metrics.output)")
    }
}
