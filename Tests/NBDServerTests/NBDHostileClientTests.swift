// Hostile clients over a real Unix socket: bad magic, truncated messages, oversized option and write lengths,
// disconnects at every handshake stage and mid-request. After each, the server has no leftover connection and a
// concurrent well-behaved client still works.

import NBDServer
import NIOCore
import Testing
import VolumeCore

/// A well-behaved client: handshake, writes, read-back, FLUSH, DISC. Uses its own offset range (`slot`).
func wellBehavedSession(_ path: String, slot: UInt64, structured: Bool = false) async throws {
    try await RawClient.with(path) { client in
        try await client.handshake(structured: structured)
        let base = slot * (1 << 20)
        for round in 0..<4 {
            let offset = base + UInt64(round) * 8192
            let data = ClientWire.pattern(UInt8(truncatingIfNeeded: Int(slot) * 16 + round + 1), count: 8192)
            #expect(try await client.writeBlock(cookie: UInt64(round), offset: offset, data: data) == 0)
            if structured {
                try await client.send(ClientWire.request(0, cookie: 100, offset: offset, length: 8192))
                guard case .chunk(100, 1, 1, var payload) = try await client.readReply() else {
                    throw WireError("expected one data chunk")
                }
                #expect(payload.readInteger(as: UInt64.self) == offset)
                #expect(payload == data)
            } else {
                #expect(try await client.readBlock(cookie: 100, offset: offset, length: 8192) == data)
            }
        }
        try await client.send(ClientWire.request(3, cookie: 7))
        #expect(try await client.readReply().error == 0)
        try await client.disconnect()
        #expect(try await client.waitForClose())
    }
}

@Suite(.serialized) struct NBDHostileClientTests {
    /// Runs `hostile` against a server while a well-behaved client works next to it, then checks that the hostile
    /// connection is gone and that a new well-behaved client works.
    private func survive(
        configure: (inout NBDServerConfiguration) -> Void = { _ in },
        _ hostile: @escaping @Sendable (String) async throws -> Void
    ) async throws {
        try await withTestServer(configure: configure) { server in
            let path = server.socketPath
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await hostile(path) }
                group.addTask { try await wellBehavedSession(path, slot: 1) }
                try await group.waitForAll()
            }
            try await server.waitForNoConnections()
            try await wellBehavedSession(path, slot: 2, structured: true)
            try await server.waitForNoConnections()
        }
    }

    @Test func badOptionMagicDisconnects() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(ClientWire.clientFlags(3), ByteBuffer(string: "GET / HTTP/1.1\r\n\r\n"))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func badRequestMagicDisconnects() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.handshake()
                var bad = ClientWire.request(0, cookie: 1, length: 512)
                bad.setInteger(UInt32(0x1256_0953), at: 0)  // the historic request magic
                try await client.send(bad)
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func requestsBeforeTheHandshakeEndsDisconnect() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(ClientWire.clientFlags(3), ClientWire.request(0, cookie: 1, length: 512))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func unknownClientFlagsDisconnect() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(ClientWire.clientFlags(0xffff_ffff))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func exportNameForAMissingExportDisconnects() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(ClientWire.clientFlags(3), ClientWire.option(1, string: "missing"))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func oversizedOptionIsRefusedAndTheConnectionGoesOn() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(
                    ClientWire.clientFlags(3), ClientWire.option(7, ClientWire.pattern(0x55, count: 200_000)))
                #expect(try await client.readOptionReply().type == 0x8000_0009)
                try await client.send(ClientWire.option(7, ClientWire.infoData(name: "disk")))
                #expect(try await client.readOptionReplies().last?.type == 1)
                #expect(try await client.readBlock(cookie: 1, offset: 0, length: 512).readableBytes == 512)
            }
        }
    }

    @Test func absurdOptionLengthDisconnects() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                var header = ByteBuffer()
                header.writeInteger(ClientWire.optionMagic)
                header.writeInteger(UInt32(7))
                header.writeInteger(UInt32.max)
                try await client.send(ClientWire.clientFlags(3), header, ClientWire.pattern(0, count: 1000))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func oversizedWriteIsDiscardedAndRefused() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.handshake()
                let length = Int(Limits.requestBytesMax) + 4096
                try await client.send(ClientWire.request(1, cookie: 9, offset: 0, length: UInt32(length)))
                var left = length
                while left > 0 {
                    let chunk = min(left, 1 << 20)
                    try await client.send(ClientWire.pattern(0xee, count: chunk))
                    left -= chunk
                }
                let reply = try await client.readReply()
                #expect(reply == .simple(cookie: 9, error: 22, data: nil))
                // Nothing of it was written, and the connection still works.
                #expect(
                    try await client.readBlock(cookie: 10, offset: 0, length: 4096)
                        == ClientWire.pattern(0, count: 4096))
            }
        }
    }

    @Test func absurdWriteLengthDisconnects() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.handshake()
                try await client.send(ClientWire.request(1, cookie: 9, offset: 0, length: .max))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func truncatedMessagesThenDisconnect() async throws {
        // Each case sends a prefix of a valid conversation, then vanishes.
        let go = ClientWire.option(7, ClientWire.infoData(name: "disk", items: [3]))
        let cases: [(name: String, afterHandshake: Bool, bytes: ByteBuffer)] = [
            ("nothing", false, ByteBuffer()),
            ("half the client flags", false, ByteBuffer(bytes: [0, 0])),
            ("client flags", false, ClientWire.clientFlags(3)),
            ("half an option header", false, ClientWire.clientFlags(3).merged(ClientWire.pattern(0x49, count: 5))),
            ("option header without data", false, ClientWire.clientFlags(3).merged(go.getSlice(at: 0, length: 16)!)),
            ("GO without reading the reply", false, ClientWire.clientFlags(3).merged(go)),
            ("half a request header", true, ClientWire.request(0, cookie: 1, length: 512).getSlice(at: 0, length: 13)!),
            ("a WRITE header without payload", true, ClientWire.request(1, cookie: 1, offset: 0, length: 65536)),
            (
                "half a WRITE payload", true,
                ClientWire.write(cookie: 1, offset: 0, data: ClientWire.pattern(3, count: 65536)).getSlice(
                    at: 0, length: 30000)!
            ),
            (
                "requests in flight", true,
                ClientWire.write(cookie: 1, offset: 0, data: ClientWire.pattern(3, count: 65536))
                    .merged(ClientWire.request(0, cookie: 2, offset: 0, length: 1 << 20))
                    .merged(ClientWire.request(3, cookie: 3))
            ),
        ]
        for testCase in cases {
            try await survive { path in
                try await RawClient.with(path) { client in
                    if testCase.afterHandshake {
                        try await client.handshake()
                    } else if testCase.name != "nothing" {
                        try await client.readGreeting()
                    }
                    if testCase.bytes.readableBytes > 0 { try await client.send(testCase.bytes) }
                    // Leaving the closure closes the connection.
                }
            }
        }
    }

    @Test func abortAfterOptions() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(ClientWire.clientFlags(3), ClientWire.option(3), ClientWire.option(2))
                let replies = try await client.readOptionReplies()  // LIST
                #expect(replies.map(\.type) == [2, 2, 1])
                #expect(try await client.readOptionReply() == OptionReply(option: 2, type: 1, data: ByteBuffer()))
                #expect(try await client.waitForClose())
            }
        }
    }

    @Test func handshakeTimeoutDisconnectsStalledClients() async throws {
        try await survive(configure: { $0.handshakeTimeoutSeconds = 0.3 }) { path in
            try await RawClient.with(path) { client in
                try await client.readGreeting()
                try await client.send(ClientWire.clientFlags(3))
                let start = ContinuousClock.now
                #expect(try await client.waitForClose(timeout: .seconds(5)))
                #expect(ContinuousClock.now - start < .seconds(3))
            }
        }
    }

    @Test func idleTimeoutDisconnectsQuietClients() async throws {
        try await survive(configure: { $0.idleTimeoutSeconds = 0.3 }) { path in
            try await RawClient.with(path) { client in
                try await client.handshake()
                #expect(try await client.readBlock(cookie: 1, offset: 0, length: 512).readableBytes == 512)
                #expect(try await client.waitForClose(timeout: .seconds(5)))
            }
        }
    }

    @Test func garbageFloodIsCutOff() async throws {
        try await survive { path in
            try await RawClient.with(path) { client in
                try await client.handshake()
                var generator = SplitMix64(seed: 42)
                var garbage = ByteBuffer()
                for _ in 0..<4096 { garbage.writeInteger(generator.next()) }
                do {
                    try await client.send(garbage)
                } catch {
                    // The server may close while we are still sending.
                }
                #expect(try await client.waitForClose())
            }
        }
    }
}

extension ByteBuffer {
    func merged(_ other: ByteBuffer) -> ByteBuffer {
        var copy = self
        copy.writeImmutableBuffer(other)
        return copy
    }
}

/// A small seeded generator (tests print the seed, so any failure replays).
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
