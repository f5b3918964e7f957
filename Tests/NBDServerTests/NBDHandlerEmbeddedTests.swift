// The real channel handler on an EmbeddedChannel (no sockets, one thread): a whole session fed one byte at a time
// and all at once must produce the same replies; device commands run on the (embedded) event loop, which is why
// the settings pin `.eventLoop` execution (the embedded loop must not be touched from other threads).

import Logging
import NIOCore
import NIOEmbedded
import Testing
import VolumeCore
import VolumeTesting

@testable import NBDServer

@Suite struct NBDHandlerEmbeddedTests {
    /// A client conversation: structured replies, base:allocation, GO, WRITE, READ, BLOCK_STATUS, a bad command,
    /// TRIM, READ of the trimmed range, DISC.
    private static func conversation() -> ByteBuffer {
        var bytes = ClientWire.clientFlags(3)
        bytes.writeImmutableBuffer(ClientWire.option(8))
        bytes.writeImmutableBuffer(
            ClientWire.option(10, ClientWire.metaContextData(name: "disk", queries: ["base:allocation"])))
        bytes.writeImmutableBuffer(ClientWire.option(7, ClientWire.infoData(name: "disk", items: [3])))
        bytes.writeImmutableBuffer(
            ClientWire.write(cookie: 1, offset: 4096, data: ClientWire.pattern(0x61, count: 8192)))
        bytes.writeImmutableBuffer(ClientWire.request(0, cookie: 2, offset: 4096, length: 8192))
        bytes.writeImmutableBuffer(ClientWire.request(7, cookie: 3, offset: 0, length: 65536))
        bytes.writeImmutableBuffer(ClientWire.request(99, cookie: 4, offset: 0, length: 512))
        bytes.writeImmutableBuffer(ClientWire.request(4, cookie: 5, offset: 4096, length: 4096))
        bytes.writeImmutableBuffer(ClientWire.request(0, cookie: 6, offset: 4096, length: 8192))
        bytes.writeImmutableBuffer(ClientWire.request(2, cookie: 7))
        return bytes
    }

    private static func run(chunkSize: Int) throws -> (output: ByteBuffer, closed: Bool, device: MemoryBlockDevice) {
        let device = MemoryBlockDevice(sizeBytes: 1 << 20)
        let exports = NBDStaticExportProvider([NBDExport(name: "disk", device: device)])
        let channel = EmbeddedChannel()
        let handler = NBDConnectionHandler(
            id: 1, eventLoop: channel.eventLoop, settings: NBDConnectionSettings(deviceExecution: .eventLoop),
            exports: exports, observer: nil,
            logger: Logger(label: "embedded", factory: { _ in SwiftLogNoOpLogHandler() }),
            allocator: channel.allocator)
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()

        var output = ByteBuffer()
        func drain() throws {
            channel.embeddedEventLoop.run()
            while let bytes = try channel.readOutbound(as: ByteBuffer.self) { output.writeImmutableBuffer(bytes) }
        }
        try drain()
        var rest = conversation()
        while rest.readableBytes > 0, channel.isActive {
            try channel.writeInbound(rest.readSlice(length: min(chunkSize, rest.readableBytes))!)
            try drain()
        }
        try drain()
        return (output, !channel.isActive, device)
    }

    @Test(arguments: [1, 7, 28, 1000, 1 << 20])
    func sessionProducesTheSameBytesHoweverTheInputIsCut(chunkSize: Int) throws {
        let (output, closed, device) = try Self.run(chunkSize: chunkSize)
        #expect(closed, "NBD_CMD_DISC closes the connection")
        var rest = output
        #expect(rest.readBytes(length: 18) == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3])
        var optionReplies: [OptionReply] = []
        while optionReplies.last.map({ $0.option == 7 && $0.type == 1 }) != true {
            guard let reply = try OptionReply.parse(&rest) else { throw WireError("option replies cut short") }
            optionReplies.append(reply)
        }
        #expect(optionReplies.map(\.type) == [1, 4, 1, 3, 3, 1])
        // Replies may come in any order (the refused request is answered before the device replies when the input
        // arrives in one piece); compare them by cookie.
        // The READ after the TRIM is two chunks: a hole where the trim unmapped, then data (in offset order).
        let all = try TransmissionReply.parseAll(&rest)
        let replies = all.filter { $0.cookie != 6 }.sorted { $0.cookie < $1.cookie } + all.filter { $0.cookie == 6 }
        #expect(rest.readableBytes == 0)
        #expect(replies.map(\.cookie) == [1, 2, 3, 4, 5, 6, 6])
        #expect(replies.map(\.error) == [0, 0, 0, 22, 0, 0, 0])
        guard case .chunk(2, 1, 1, var read) = replies[1] else { throw WireError("READ reply: \(replies[1])") }
        #expect(read.readInteger(as: UInt64.self) == 4096)
        #expect(read == ClientWire.pattern(0x61, count: 8192))
        guard case .chunk(3, 1, 5, var status) = replies[2] else { throw WireError("BLOCK_STATUS reply") }
        #expect(status.readInteger(as: UInt32.self) == 1)
        #expect(
            status.readMultipleIntegers(as: (UInt32, UInt32, UInt32, UInt32, UInt32, UInt32).self)! == (
                4096, 3, 8192, 0, 65536 - 12288, 3
            ))
        guard case .chunk(6, 0, 2, var hole) = replies[5] else { throw WireError("hole chunk: \(replies[5])") }
        #expect(hole.readMultipleIntegers(as: (UInt64, UInt32).self)! == (4096, 4096))
        guard case .chunk(6, 1, 1, var trimmed) = replies[6] else { throw WireError("READ after TRIM") }
        #expect(trimmed.readInteger(as: UInt64.self) == 8192)
        #expect(trimmed == ClientWire.pattern(0x61, count: 4096))
        #expect(device.writeCount == 1)
    }
}
