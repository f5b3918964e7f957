// Real NBD clients against NBDServer + MemoryBlockDevice on a Unix socket: nbdinfo, qemu-io, qemu-img, nbdcopy,
// fio. A missing tool fails the test naming its apt package.

import Foundation
import NBDServer
import NIOCore
import Testing
import VolumeCore
import VolumeTesting

@Suite(.serialized) struct NBDToolIntegrationTests {
    private static func json(_ text: String) throws -> [String: Any] {
        // fio prints a line before its JSON; nbdinfo does not. Start at the first brace.
        guard let start = text.firstIndex(of: "{") else { throw ToolFailure(description: "no JSON in: \(text)") }
        let object = try JSONSerialization.jsonObject(with: Data(text[start...].utf8))
        guard let dictionary = object as? [String: Any] else { throw ToolFailure(description: "not a JSON object") }
        return dictionary
    }

    @Test func aMissingToolFailsNamingItsPackage() async throws {
        do {
            try await runTool("nbd-tool-that-is-not-there", ["--version"], package: "some-apt-package")
            Issue.record("a missing tool must fail the test")
        } catch let failure as ToolFailure {
            #expect(failure.description.contains("apt-get install -y some-apt-package"))
        }
    }

    @Test func nbdinfoReportsSizeFlagsAndBlockSizes() async throws {
        try await withTestServer(size: 96 << 20) { server in
            let info = try Self.json(try await runTool("nbdinfo", ["--json", server.uri()], package: "libnbd-bin"))
            #expect(info["protocol"] as? String == "newstyle-fixed")
            #expect(info["structured"] as? Bool == true)
            let export = try #require((info["exports"] as? [[String: Any]])?.first)
            #expect(export["export-size"] as? Int == 96 << 20)
            #expect(export["can_flush"] as? Bool == true)
            #expect(export["can_fua"] as? Bool == true)
            #expect(export["can_trim"] as? Bool == true)
            #expect(export["can_zero"] as? Bool == true)
            #expect(export["can_fast_zero"] as? Bool == true)
            #expect(export["can_multi_conn"] as? Bool == true)
            #expect(export["can_cache"] as? Bool == true)
            #expect(export["is_read_only"] as? Bool == false)
            #expect(export["block_size_minimum"] as? Int == 512)
            #expect(export["block_size_preferred"] as? Int == 4096)
            #expect(export["block_size_maximum"] as? Int == Int(Limits.requestBytesMax))
            #expect((export["contexts"] as? [String])?.contains("base:allocation") == true)
            #expect(export["description"] as? String == "memory disk")

            let readOnly = try Self.json(
                try await runTool("nbdinfo", ["--json", server.uri("ro")], package: "libnbd-bin"))
            let roExport = try #require((readOnly["exports"] as? [[String: Any]])?.first)
            #expect(roExport["is_read_only"] as? Bool == true)
            #expect(roExport["can_trim"] as? Bool == false)
        }
    }

    @Test func nbdinfoListsExports() async throws {
        try await withTestServer { server in
            let list = try await runTool("nbdinfo", ["--list", server.uri()], package: "libnbd-bin")
            #expect(list.contains("export=\"disk\""))
            #expect(list.contains("export=\"ro\""))
            #expect(list.contains("description: memory disk"))
            #expect(list.contains("description: read-only view"))
        }
    }

    @Test func nbdinfoMapShowsHoles() async throws {
        try await withTestServer(size: 16 << 20) { server in
            try await runTool(
                "qemu-io", ["-f", "raw", "-c", "write -P 0x11 1M 128k", "-c", "write -P 0x22 8M 4k", server.uri()],
                package: "qemu-utils")
            let map = try await runTool("nbdinfo", ["--map", server.uri()], package: "libnbd-bin")
            let rows = map.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true) }
            let extents: [(offset: Int, length: Int, type: Int)] = rows.map { (Int($0[0])!, Int($0[1])!, Int($0[2])!) }
            let mib = 1 << 20
            let expectedOffsets: [Int] = [0, mib, mib + 131072, 8 * mib, 8 * mib + 4096]
            #expect(extents.map(\.offset) == expectedOffsets)
            #expect(extents.map(\.type) == [3, 0, 3, 0, 3])
            let end = extents.last.map { $0.offset + $0.length }
            #expect(end == 16 * mib)
        }
    }

    @Test func qemuIOPatternsFUAZeroesAndDiscard() async throws {
        try await withTestServer(size: 32 << 20) { server in
            let flushesBefore = server.device.flushCount
            try await runTool(
                "qemu-io",
                [
                    "-f", "raw",
                    "-c", "write -P 0xab 0 1M",
                    "-c", "write -f -P 0xcd 1M 64k",  // FUA
                    "-c", "write -P 0x5a 3M 512",  // unaligned to the cluster, aligned to the minimum block
                    "-c", "write -z 512k 256k",
                    "-c", "write -P 0xee 2M 1M",
                    "-c", "discard 2M 1M",
                    "-c", "flush",
                    server.uri(),
                ], package: "qemu-utils")
            #expect(server.device.flushCount >= flushesBefore + 2)  // the FUA write and the flush
            try await runTool(
                "qemu-io",
                [
                    "-f", "raw", "-r",
                    "-c", "read -P 0xab 0 512k",
                    "-c", "read -P 0 512k 256k",
                    "-c", "read -P 0xab 768k 256k",
                    "-c", "read -P 0xcd 1M 64k",
                    "-c", "read -P 0 2M 1M",
                    "-c", "read -P 0x5a 3M 512",
                    "-c", "read -P 0 3146240 512",
                    server.uri(),
                ], package: "qemu-utils")
            // The check can fail: a wrong pattern is reported.
            let wrong = try await runToolOutput(
                "qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x99 0 4k", server.uri()], package: "qemu-utils",
                check: false)
            #expect(wrong.stdout.contains("Pattern verification failed"))
        }
    }

    @Test func qemuIOAgainstAReadOnlyExport() async throws {
        try await withTestServer(size: 8 << 20) { server in
            let output = try await runToolOutput(
                "qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", server.uri("ro")], package: "qemu-utils", check: false
            )
            let text = output.stdout + output.stderr
            let refused =
                output.status != 0 || text.contains("ermission") || text.contains("read-only")
                || text.contains("read only")
            #expect(refused, "qemu-io said: \(text)")
            #expect(server.device.writeCount == 0)
        }
    }

    @Test func qemuImgConvertInAndOutThenCompare() async throws {
        try await withTestServer(size: 32 << 20) { server in
            let source = server.directory + "/source.raw"
            let back = server.directory + "/back.raw"
            // A sparse source: data at a few places, holes elsewhere.
            try await runTool("qemu-img", ["create", "-f", "raw", source, "32M"], package: "qemu-utils")
            try await runTool(
                "qemu-io",
                [
                    "-f", "raw", "-c", "write -P 0x31 0 3M", "-c", "write -P 0x32 10M 64k", "-c",
                    "write -P 0x33 30M 2M", source,
                ],
                package: "qemu-utils")
            try await runTool(
                "qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, server.uri()], package: "qemu-utils")
            try await runTool(
                "qemu-img", ["compare", "-f", "raw", "-F", "raw", source, server.uri()], package: "qemu-utils")
            try await runTool(
                "qemu-img", ["convert", "-f", "raw", "-O", "raw", server.uri(), back], package: "qemu-utils")
            try await runTool("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, back], package: "qemu-utils")
            // The holes stayed holes on the device (block status let qemu-img skip them).
            let dataPages = ((3 << 20) + (64 << 10) + (2 << 20)) / 4096
            #expect(server.device.allocatedPageCount <= dataPages + 16)
            // compare notices a difference.
            try await runTool(
                "qemu-io", ["-f", "raw", "-c", "write -P 0x77 20M 4k", server.uri()], package: "qemu-utils")
            let differs = try await runToolOutput(
                "qemu-img", ["compare", "-f", "raw", "-F", "raw", source, server.uri()], package: "qemu-utils",
                check: false)
            #expect(differs.status == 1)
        }
    }

    @Test(arguments: [1, 4])
    func nbdcopyInAndOut(connections: Int) async throws {
        try await withTestServer(size: 24 << 20) { server in
            let source = server.directory + "/in.raw"
            let back = server.directory + "/out.raw"
            var generator = SplitMix64(seed: UInt64(connections))
            var bytes = [UInt8](repeating: 0, count: 24 << 20)
            for block in stride(from: 0, to: bytes.count, by: 65536) where generator.next() % 3 != 0 {
                for index in block..<(block + 65536) { bytes[index] = UInt8(truncatingIfNeeded: generator.next()) }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: source))
            try await runTool(
                "nbdcopy", ["--connections=\(connections)", "--requests=16", source, server.uri()],
                package: "libnbd-bin")
            try await runTool(
                "nbdcopy", ["--connections=\(connections)", server.uri(), back], package: "libnbd-bin")
            let copied = try Data(contentsOf: URL(fileURLWithPath: back))
            #expect(copied == Data(bytes))
            try await server.waitForNoConnections()
        }
    }

    @Test func fioVerifiesMixedBlockSizes() async throws {
        try await withTestServer(size: 64 << 20) { server in
            let output = try await runTool(
                "fio",
                [
                    "--name=verify", "--ioengine=nbd", "--uri=\(server.uri())", "--rw=randwrite",
                    "--bssplit=512/10:4k/50:8k/15:64k/15:1m/10", "--size=32M", "--iodepth=16", "--verify=crc32c",
                    "--do_verify=1", "--verify_fatal=1", "--randrepeat=1", "--output-format=json",
                ], package: "fio", timeout: .seconds(60), currentDirectory: server.directory)
            let result = try Self.json(output)
            let job = try #require((result["jobs"] as? [[String: Any]])?.first)
            #expect(job["error"] as? Int == 0)
            let write = try #require(job["write"] as? [String: Any])
            #expect((write["io_bytes"] as? Int ?? 0) >= 32 << 20)
            let read = try #require(job["read"] as? [String: Any])
            #expect((read["io_bytes"] as? Int ?? 0) >= 32 << 20)  // the verify pass read everything back
        }
    }

    @Test func multiConnWriteOnOneFlushOnAnotherReadOnAThird() async throws {
        try await withTestServer { server in
            let path = server.socketPath
            let data = ClientWire.pattern(0xc4, count: 65536)
            try await RawClient.with(path) { conn0 in
                let (_, flags) = try await conn0.handshake()
                #expect(flags & NBDFlagsForTests.canMultiConn != 0)
                try await RawClient.with(path) { conn1 in
                    try await conn1.handshake()
                    try await RawClient.with(path) { conn2 in
                        try await conn2.handshake()
                        #expect(server.server.connectionCount(export: "disk") == 3)
                        #expect(try await conn1.writeBlock(cookie: 1, offset: 1 << 20, data: data) == 0)
                        let flushes = server.device.flushCount
                        try await conn2.send(ClientWire.request(3, cookie: 2))
                        #expect(try await conn2.readReply() == .simple(cookie: 2, error: 0, data: nil))
                        #expect(server.device.flushCount == flushes + 1)
                        #expect(try await conn0.readBlock(cookie: 3, offset: 1 << 20, length: 65536) == data)
                    }
                }
            }
        }
    }
}

enum NBDFlagsForTests {
    static let canMultiConn: UInt16 = 1 << 8
}
