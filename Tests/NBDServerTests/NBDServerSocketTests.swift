// The server over real sockets: out-of-order replies, back-pressure, clients vanishing with requests in flight,
// socket file handling, connection limits, stop and disconnect, TCP, and a byte-at-a-time client.

import Foundation
import NBDServer
import NIOCore
import NIOPosix
import Testing
import VolumeCore
import VolumeTesting

@Suite(.serialized) struct NBDServerSocketTests {
    @Test func repliesCompleteOutOfOrderMatchedByCookie() async throws {
        let gated = GatedDevice(inner: MemoryBlockDevice(sizeBytes: 16 << 20), slowOffsets: [0])
        try await withTestServer(extraExports: [NBDExport(name: "gated", device: gated)]) { server in
            try await RawClient.with(server.socketPath) { client in
                try await client.handshake(export: "gated")
                try await client.send(
                    ClientWire.request(0, cookie: 1, offset: 0, length: 4096),
                    ClientWire.write(cookie: 2, offset: 8192, data: ClientWire.pattern(9, count: 4096)),
                    ClientWire.request(0, cookie: 3, offset: 8192, length: 4096))
                let second = try await client.readReply(readLengths: [3: 4096])
                #expect(second == .simple(cookie: 2, error: 0, data: nil))
                let third = try await client.readReply(readLengths: [3: 4096])
                #expect(third == .simple(cookie: 3, error: 0, data: ClientWire.pattern(9, count: 4096)))
                #expect(gated.startedSlowOperations == 1)
                gated.release()
                let first = try await client.readReply(readLengths: [1: 4096])
                #expect(first == .simple(cookie: 1, error: 0, data: ClientWire.pattern(0, count: 4096)))
            }
        }
    }

    @Test func manyPipelinedRequestsUnderTightInFlightBounds() async throws {
        try await withTestServer(configure: {
            $0.maxInFlightRequestsPerConnection = 2
            $0.maxInFlightBytesPerConnection = 16384
        }) { server in
            try await RawClient.with(server.socketPath) { client in
                try await client.handshake(structured: true)
                var batch = ByteBuffer()
                for index in 0..<200 {
                    let data = ClientWire.pattern(UInt8(index % 251 + 1), count: 4096)
                    batch.writeImmutableBuffer(
                        ClientWire.write(cookie: UInt64(index), offset: UInt64(index) * 4096, data: data))
                }
                for index in 0..<200 {
                    batch.writeImmutableBuffer(
                        ClientWire.request(0, cookie: 1000 + UInt64(index), offset: UInt64(index) * 4096, length: 4096))
                }
                try await client.send(batch)
                var writes = Set<UInt64>()
                var reads = 0
                for _ in 0..<400 {
                    let reply = try await client.readReply()
                    #expect(reply.error == 0)
                    if reply.cookie < 1000 {
                        writes.insert(reply.cookie)
                    } else if case .chunk(let cookie, 1, 1, var payload) = reply {
                        let index = Int(cookie - 1000)
                        #expect(payload.readInteger(as: UInt64.self) == UInt64(index) * 4096)
                        // Reads were sent after all writes, but may run before them: check only what a completed
                        // write guarantees.
                        if payload.readableBytesView.first != 0 {
                            #expect(payload == ClientWire.pattern(UInt8(index % 251 + 1), count: 4096))
                        }
                        reads += 1
                    }
                }
                #expect(writes.count == 200)
                #expect(reads == 200)
                for index in stride(from: 0, to: 200, by: 37) {
                    let data = try await client.readBlockStructured(
                        cookie: 5000, offset: UInt64(index) * 4096, length: 4096)
                    #expect(data == ClientWire.pattern(UInt8(index % 251 + 1), count: 4096))
                }
            }
        }
    }

    @Test func serverStopsTakingRequestsAtTheInFlightBound() async throws {
        let offsets = Set((0..<64).map { UInt64($0) * 4096 })
        let gated = GatedDevice(inner: MemoryBlockDevice(sizeBytes: 16 << 20), slowOffsets: offsets)
        try await withTestServer(
            extraExports: [NBDExport(name: "gated", device: gated)],
            configure: { $0.maxInFlightRequestsPerConnection = 4 }
        ) { server in
            try await RawClient.with(server.socketPath) { client in
                try await client.handshake(export: "gated")
                var batch = ByteBuffer()
                for index in 0..<64 {
                    batch.writeImmutableBuffer(
                        ClientWire.write(
                            cookie: UInt64(index), offset: UInt64(index) * 4096,
                            data: ClientWire.pattern(UInt8(index), count: 4096)))
                }
                try await client.send(batch)
                while gated.startedSlowOperations < 4 { try await Task.sleep(for: .milliseconds(5)) }
                try await Task.sleep(for: .milliseconds(200))
                #expect(gated.startedSlowOperations == 4, "only the in-flight bound of requests reach the device")
                gated.release()
                var cookies = Set<UInt64>()
                for _ in 0..<64 { cookies.insert(try await client.readReply().cookie) }
                #expect(cookies.count == 64)
                #expect(gated.startedSlowOperations == 64)
            }
        }
    }

    @Test func vanishedClientIsQuiescedOnlyAfterItsDeviceCommandsFinish() async throws {
        let gated = GatedDevice(inner: MemoryBlockDevice(sizeBytes: 16 << 20), slowOffsets: [4096])
        try await withTestServer(extraExports: [NBDExport(name: "gated", device: gated)]) { server in
            try await RawClient.with(server.socketPath) { client in
                try await client.handshake(export: "gated")
                try await client.send(
                    ClientWire.write(cookie: 1, offset: 4096, data: ClientWire.pattern(7, count: 4096)))
                while gated.startedSlowOperations == 0 { try await Task.sleep(for: .milliseconds(5)) }
                #expect(server.server.connectionCount(export: "gated") == 1)
            }
            // The client is gone; its WRITE is still running.
            try await Task.sleep(for: .milliseconds(100))
            #expect(server.server.connectionCount(export: "gated") == 1)
            gated.release()
            try await server.waitForNoConnections()
            #expect(gated.finishedSlowOperations == 1)
            #expect(try await gated.inner.read(offset: 4096, length: 4096) == ClientWire.pattern(7, count: 4096))
        }
    }

    @Test func staleSocketFileIsReplacedLiveOneIsBusyOthersAreLeftAlone() async throws {
        let directory = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/s.sock"
        // A socket file nobody listens on (a crashed server's).
        try makeStaleSocketFile(path)
        #expect(FileManager.default.fileExists(atPath: path))

        let exports = NBDStaticExportProvider([NBDExport(name: "d", device: MemoryBlockDevice(sizeBytes: 1 << 20))])
        let first = NBDServer(
            configuration: NBDServerConfiguration(unixSocketPath: path), exports: exports,
            eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: testLogger)
        try await first.start()
        #expect(first.boundAddresses == [.unix(path: path)])

        let second = NBDServer(
            configuration: NBDServerConfiguration(unixSocketPath: path), exports: exports,
            eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: testLogger)
        do {
            try await second.start()
            Issue.record("a second server must not take over a live socket")
        } catch {
            #expect(error.code == .busy)
            #expect(error.message.contains(path))
        }
        // The first server still serves.
        let (size, _) = try await RawClient.with(path) { client in
            try await client.handshake(export: "d")
        }
        #expect(size == 1 << 20)
        await first.stop()
        #expect(!FileManager.default.fileExists(atPath: path))

        let regular = directory + "/file"
        #expect(FileManager.default.createFile(atPath: regular, contents: Data("keep me".utf8)))
        let third = NBDServer(
            configuration: NBDServerConfiguration(unixSocketPath: regular), exports: exports,
            eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: testLogger)
        do {
            try await third.start()
            Issue.record("a regular file must not be replaced")
        } catch {
            #expect(error.code == .alreadyExists)
        }
        #expect(FileManager.default.contents(atPath: regular) == Data("keep me".utf8))
    }

    @Test func badConfigurationIsRejectedAtStart() async throws {
        let exports = NBDStaticExportProvider([])
        for configuration in [
            NBDServerConfiguration(),
            NBDServerConfiguration(unixSocketPath: "/tmp/" + String(repeating: "x", count: 200)),
            NBDServerConfiguration(tcpPort: 70000),
            NBDServerConfiguration(unixSocketPath: "/tmp/x.sock", maxConnections: 0),
            NBDServerConfiguration(unixSocketPath: "/tmp/x.sock", maximumPayloadBytes: 4096),
            NBDServerConfiguration(unixSocketPath: "/tmp/x.sock", handshakeTimeoutSeconds: -1),
        ] {
            let server = NBDServer(
                configuration: configuration, exports: exports, eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
                logger: testLogger)
            do {
                try await server.start()
                Issue.record("\(configuration) must be rejected")
                await server.stop()
            } catch {
                #expect(error.code == .configuration)
            }
        }
    }

    @Test func connectionLimitRefusesExtraClients() async throws {
        try await withTestServer(configure: { $0.maxConnections = 2 }) { server in
            try await RawClient.with(server.socketPath) { first in
                try await first.handshake()
                try await RawClient.with(server.socketPath) { second in
                    try await second.handshake()
                    let refused = try await RawClient.with(server.socketPath) { third in
                        try await third.waitForClose()
                    }
                    #expect(refused)
                    #expect(try await second.readBlock(cookie: 1, offset: 0, length: 512).readableBytes == 512)
                }
            }
            try await server.waitForNoConnections()
            try await wellBehavedSession(server.socketPath, slot: 0)
        }
    }

    @Test func stopClosesClientsAndRemovesTheSocket() async throws {
        let server = try await TestServer.start()
        try await RawClient.with(server.socketPath) { client in
            try await client.handshake()
            #expect(server.server.connectionCount(export: "disk") == 1)
            await server.server.stop()
            #expect(try await client.waitForClose())
        }
        #expect(!FileManager.default.fileExists(atPath: server.socketPath))
        #expect(server.server.boundAddresses.isEmpty)
        await server.stop()  // idempotent
    }

    @Test func disconnectClientsOfOneExport() async throws {
        let gated = GatedDevice(inner: MemoryBlockDevice(sizeBytes: 16 << 20), slowOffsets: [0])
        try await withTestServer(
            extraExports: [NBDExport(name: "gated", device: gated)],
            configure: { $0.shutdownGracePeriodSeconds = 5 }
        ) { server in
            try await RawClient.with(server.socketPath) { diskClient in
                try await diskClient.handshake()
                try await RawClient.with(server.socketPath) { gatedClient in
                    try await gatedClient.handshake(export: "gated")
                    #expect(server.server.connectionCount(export: "gated") == 1)
                    #expect(server.server.connectionCount(export: "disk") == 1)
                    // A request in flight when the disconnect starts is answered before the connection closes.
                    try await gatedClient.send(ClientWire.request(0, cookie: 1, offset: 0, length: 512))
                    while gated.startedSlowOperations == 0 { try await Task.sleep(for: .milliseconds(5)) }
                    async let disconnected = server.server.disconnectClients(export: "gated")
                    try await Task.sleep(for: .milliseconds(50))
                    // New requests during the drain get NBD_ESHUTDOWN.
                    try await gatedClient.send(ClientWire.request(0, cookie: 2, offset: 8192, length: 512))
                    #expect(try await gatedClient.readReply() == .simple(cookie: 2, error: 108, data: nil))
                    gated.release()
                    #expect(try await gatedClient.readReply(readLengths: [1: 512]).cookie == 1)
                    #expect(try await gatedClient.waitForClose())
                    #expect(await disconnected == 1)
                    #expect(server.server.connectionCount(export: "gated") == 0)
                }
                // The other export's client is untouched.
                #expect(try await diskClient.readBlock(cookie: 3, offset: 0, length: 512).readableBytes == 512)
                #expect(server.server.connectionCount(export: "disk") == 1)
            }
        }
    }

    @Test func tcpListenerOnAnEphemeralPort() async throws {
        try await withTestServer(configure: { $0.tcpPort = 0 }) { server in
            let addresses = server.server.boundAddresses
            #expect(addresses.count == 2)
            guard case .tcp(let host, let port) = addresses.last else {
                Issue.record("expected a TCP address, got \(addresses)")
                return
            }
            #expect(host == "127.0.0.1")
            #expect(port > 0)
            #expect(addresses.last?.uri(export: "disk") == "nbd://127.0.0.1:\(port)/disk")
            #expect(addresses.first?.uri(export: "disk") == server.uri())
            let info = try await runTool("nbdinfo", ["--json", "nbd://127.0.0.1:\(port)/disk"], package: "libnbd-bin")
            #expect(info.contains("\"export-size\": \(64 << 20)"))
        }
    }

    @Test func dripFedClientOneByteAtATime() async throws {
        try await withTestServer { server in
            try await RawClient.with(server.socketPath) { client in
                try await client.readGreeting()
                var conversation = ClientWire.clientFlags(3)
                conversation.writeImmutableBuffer(ClientWire.option(8))
                conversation.writeImmutableBuffer(
                    ClientWire.option(10, ClientWire.metaContextData(name: "disk", queries: ["base:allocation"])))
                conversation.writeImmutableBuffer(ClientWire.option(7, ClientWire.infoData(name: "disk", items: [3])))
                conversation.writeImmutableBuffer(
                    ClientWire.write(cookie: 1, offset: 65536, data: ClientWire.pattern(0x42, count: 4096)))
                conversation.writeImmutableBuffer(ClientWire.request(0, cookie: 2, offset: 65536, length: 4096))
                for byte in conversation.readableBytesView {
                    try await client.send(ByteBuffer(bytes: [byte]))
                }
                #expect(try await client.readOptionReplies().map(\.type) == [1])
                #expect(try await client.readOptionReplies().map(\.type) == [4, 1])
                #expect(try await client.readOptionReplies().last?.type == 1)
                #expect(try await client.readReply() == .simple(cookie: 1, error: 0, data: nil))
                guard case .chunk(2, 1, 1, var data) = try await client.readReply() else {
                    throw WireError("expected a data chunk")
                }
                data.moveReaderIndex(forwardBy: 8)
                #expect(data == ClientWire.pattern(0x42, count: 4096))
                // Requests in flight together may run in any order: ask for block status once the WRITE is done.
                for byte in ClientWire.request(7, cookie: 3, offset: 0, length: 1 << 20).readableBytesView {
                    try await client.send(ByteBuffer(bytes: [byte]))
                }
                guard case .chunk(3, 1, 5, var status) = try await client.readReply() else {
                    throw WireError("expected a block status chunk")
                }
                #expect(status.readInteger(as: UInt32.self) == 1)
                var extents: [(UInt32, UInt32)] = []
                while let length = status.readInteger(as: UInt32.self), let flags = status.readInteger(as: UInt32.self)
                {
                    extents.append((length, flags))
                }
                #expect(extents.map(\.0) == [65536, 4096, (1 << 20) - 69632])
                #expect(extents.map(\.1) == [3, 0, 3])
            }
        }
    }

    @Test func fuaAndFlushReachTheDevice() async throws {
        try await withTestServer { server in
            try await RawClient.with(server.socketPath) { client in
                try await client.handshake()
                let before = server.device.flushCount
                #expect(
                    try await client.writeBlock(
                        cookie: 1, offset: 0, data: ClientWire.pattern(1, count: 4096), flags: 1) == 0)
                #expect(server.device.flushCount == before + 1)
                try await client.send(ClientWire.request(3, cookie: 2))
                #expect(try await client.readReply().error == 0)
                #expect(server.device.flushCount == before + 2)
                // Read-only export: writes refused with EPERM, reads served.
            }
            try await RawClient.with(server.socketPath) { client in
                let (_, flags) = try await client.handshake(export: "ro")
                #expect(flags & 2 != 0)
                #expect(try await client.writeBlock(cookie: 1, offset: 0, data: ClientWire.pattern(1, count: 512)) == 1)
                #expect(
                    try await client.readBlock(cookie: 2, offset: 0, length: 512) == ClientWire.pattern(1, count: 512))
            }
        }
    }
}

extension RawClient {
    mutating func readBlockStructured(cookie: UInt64, offset: UInt64, length: Int) async throws -> ByteBuffer {
        try await send(ClientWire.request(0, cookie: cookie, offset: offset, length: UInt32(length)))
        guard case .chunk(cookie, 1, 1, var payload) = try await readReply() else {
            throw WireError("expected one data chunk")
        }
        #expect(payload.readInteger(as: UInt64.self) == offset)
        return payload
    }
}
