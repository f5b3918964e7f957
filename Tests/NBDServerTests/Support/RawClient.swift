// A byte-level NBD client over a real Unix socket for the hostile-client and protocol tests: it sends exactly the
// bytes a test gives it and reads with deadlines (a read that times out closes the connection and throws, so a hung
// server fails the test instead of hanging it).

import NBDServer
import NIOCore
import NIOPosix
import Synchronization
import Testing

struct ReadTimeout: Error, CustomStringConvertible {
    var description: String
}

struct RawClient: ~Copyable {
    private var inbound: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    let channel: any Channel
    private var received = ByteBuffer()
    private(set) var closedByPeer = false

    fileprivate init(
        inbound: NIOAsyncChannelInboundStream<ByteBuffer>, outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>,
        channel: any Channel
    ) {
        self.inbound = inbound.makeAsyncIterator()
        self.outbound = outbound
        self.channel = channel
    }

    /// Connects to `path` and runs `body`; the connection is closed afterwards.
    @discardableResult
    static func with<T: Sendable>(
        _ path: String, _ body: (inout RawClient) async throws -> T
    ) async throws -> T {
        let asyncChannel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(unixDomainSocketPath: path) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        return try await asyncChannel.executeThenClose { inbound, outbound in
            var client = RawClient(inbound: inbound, outbound: outbound, channel: asyncChannel.channel)
            return try await body(&client)
        }
    }

    mutating func send(_ bytes: ByteBuffer) async throws {
        try await outbound.write(bytes)
    }

    mutating func send(_ parts: ByteBuffer...) async throws {
        var all = ByteBuffer()
        for part in parts { all.writeImmutableBuffer(part) }
        try await outbound.write(all)
    }

    /// Receives until at least `count` bytes are buffered; throws on timeout or if the server closes first.
    private mutating func fill(_ count: Int, timeout: Duration) async throws {
        while received.readableBytes < count {
            guard let chunk = try await nextChunk(timeout: timeout) else {
                throw WireError(
                    "the server closed the connection with \(received.readableBytes) of \(count) bytes received")
            }
            received.writeImmutableBuffer(chunk)
        }
    }

    /// The next chunk from the server, nil once it closed. On timeout the connection is closed and this throws.
    private mutating func nextChunk(timeout: Duration) async throws -> ByteBuffer? {
        guard !closedByPeer else { return nil }
        let timedOut = Flag()
        let channel = self.channel
        let timer = channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) {
            timedOut.set()
            channel.close(promise: nil)
        }
        let chunk: ByteBuffer?
        do {
            chunk = try await inbound.next()
        } catch {
            timer.cancel()
            closedByPeer = true
            return nil
        }
        timer.cancel()
        if timedOut.isSet { throw ReadTimeout(description: "no data from the server within \(timeout)") }
        if chunk == nil { closedByPeer = true }
        return chunk
    }

    mutating func read(_ count: Int, timeout: Duration = .seconds(5)) async throws -> ByteBuffer {
        try await fill(count, timeout: timeout)
        return received.readSlice(length: count)!
    }

    /// True if the server closes the connection within `timeout` (any bytes it sends first are discarded).
    mutating func waitForClose(timeout: Duration = .seconds(5)) async throws -> Bool {
        do {
            while try await nextChunk(timeout: timeout) != nil {}
            return true
        } catch is ReadTimeout {
            return false
        }
    }

    // MARK: Handshake helpers

    /// Reads the greeting and checks it.
    mutating func readGreeting() async throws {
        let greeting = try await read(18)
        #expect(Array(greeting.readableBytesView) == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3])
    }

    mutating func readOptionReply(timeout: Duration = .seconds(5)) async throws -> OptionReply {
        try await fill(20, timeout: timeout)
        let length = Int(received.getInteger(at: received.readerIndex + 16, as: UInt32.self)!)
        try await fill(20 + length, timeout: timeout)
        return try OptionReply.parse(&received)!
    }

    /// Reads option replies up to and including the final one (an ACK or an error).
    mutating func readOptionReplies() async throws -> [OptionReply] {
        var replies: [OptionReply] = []
        while true {
            let reply = try await readOptionReply()
            replies.append(reply)
            if reply.type == 1 || reply.type & 0x8000_0000 != 0 { return replies }
        }
    }

    /// Greeting, client flags, optional structured replies and base:allocation, NBD_OPT_GO. Returns (size, flags).
    @discardableResult
    mutating func handshake(
        export: String = "disk", structured: Bool = false, metaContext: Bool = false, blockSizes: Bool = true
    ) async throws -> (size: UInt64, flags: UInt16) {
        try await readGreeting()
        try await send(ClientWire.clientFlags(3))
        if structured {
            try await send(ClientWire.option(8))
            #expect(try await readOptionReplies().last?.type == 1)
        }
        if metaContext {
            try await send(
                ClientWire.option(10, ClientWire.metaContextData(name: export, queries: ["base:allocation"])))
            #expect(try await readOptionReplies().map(\.type) == [4, 1])
        }
        try await send(ClientWire.option(7, ClientWire.infoData(name: export, items: blockSizes ? [3] : [])))
        let replies = try await readOptionReplies()
        guard replies.last?.type == 1, let export = replies.first(where: { $0.infoType == 0 }) else {
            throw WireError("NBD_OPT_GO failed: \(replies)")
        }
        return (export.data.getInteger(at: 2, as: UInt64.self)!, export.data.getInteger(at: 10, as: UInt16.self)!)
    }

    // MARK: Transmission helpers

    /// Reads one reply (simple or one structured chunk). `readLengths` maps cookies of simple-reply READs to lengths.
    mutating func readReply(
        readLengths: [UInt64: Int] = [:], timeout: Duration = .seconds(5)
    ) async throws
        -> TransmissionReply
    {
        while true {
            if let reply = try TransmissionReply.parse(&received, readLengths: readLengths) { return reply }
            guard let chunk = try await nextChunk(timeout: timeout) else {
                throw WireError("the server closed the connection while a reply was expected")
            }
            received.writeImmutableBuffer(chunk)
        }
    }

    mutating func writeBlock(cookie: UInt64, offset: UInt64, data: ByteBuffer, flags: UInt16 = 0) async throws -> UInt32
    {
        try await send(ClientWire.write(cookie: cookie, offset: offset, data: data, flags: flags))
        let reply = try await readReply()
        #expect(reply.cookie == cookie)
        return reply.error
    }

    /// READ with simple replies; returns the data or throws with the error.
    mutating func readBlock(cookie: UInt64, offset: UInt64, length: Int) async throws -> ByteBuffer {
        try await send(ClientWire.request(0, cookie: cookie, offset: offset, length: UInt32(length)))
        let reply = try await readReply(readLengths: [cookie: length])
        guard case .simple(cookie, 0, let data?) = reply else { throw WireError("READ failed: \(reply)") }
        return data
    }

    mutating func disconnect() async throws {
        try await send(ClientWire.request(2, cookie: 0))
    }
}

final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .sequentiallyConsistent) }
    var isSet: Bool { value.load(ordering: .sequentiallyConsistent) }
}
