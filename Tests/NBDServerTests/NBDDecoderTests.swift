// Decoders without sockets: NIO's ByteToMessageDecoderVerifier (drip-fed, batched, one message per buffer),
// NBDInboundBuffer with every split of a byte stream, and malformed input.

import NIOCore
import NIOTestUtils
import Testing

@testable import NBDServer

@Suite struct NBDDecoderTests {
    // MARK: Verifier

    @Test func optionFramingPassesTheDecoderVerifier() throws {
        let pairs: [(ByteBuffer, [NBDHandshakeMessage])] = [
            (
                ClientWire.option(NBDOption.go, ClientWire.infoData(name: "disk", items: [3])),
                [.option(NBDClientOption(code: 7, data: ClientWire.infoData(name: "disk", items: [3])))]
            ),
            (ClientWire.option(NBDOption.list), [.option(NBDClientOption(code: 3, data: ByteBuffer()))]),
            (
                ClientWire.option(NBDOption.abort, string: "x"),
                [.option(NBDClientOption(code: 2, data: ByteBuffer(string: "x")))]
            ),
            // Larger than we buffer: announced at the header, then skipped as it streams in.
            (ClientWire.option(99, ClientWire.pattern(0xee, count: 200)), [.oversizedOption(code: 99, length: 200)]),
        ]
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            NBDHandshakeByteToMessageDecoder(
                NBDHandshakeDecoder(optionDataBytesMax: 64, optionDiscardBytesMax: 4096, expectClientFlags: false))
        }
    }

    @Test func requestFramingPassesTheDecoderVerifier() throws {
        let payload = ClientWire.pattern(0xab, count: 1000)
        let readHeader = NBDRequestHeader(type: NBDCommand.read, cookie: 1, offset: 4096, length: 512)
        let writeHeader = NBDRequestHeader(flags: 1, type: NBDCommand.write, cookie: 2, offset: 0, length: 1000)
        let bigWrite = NBDRequestHeader(type: NBDCommand.write, cookie: 3, offset: 0, length: 3000)
        let pairs: [(ByteBuffer, [NBDRequestMessage])] = [
            (
                ClientWire.request(NBDCommand.read, cookie: 1, offset: 4096, length: 512),
                [.request(readHeader, payload: nil)]
            ),
            (
                ClientWire.write(cookie: 2, offset: 0, data: payload, flags: 1),
                [.request(writeHeader, payload: payload)]
            ),
            (
                ClientWire.write(cookie: 3, offset: 0, data: ClientWire.pattern(1, count: 3000)),
                [.oversizedWrite(bigWrite)]
            ),
            (
                ClientWire.request(NBDCommand.flush, cookie: 4),
                [.request(NBDRequestHeader(type: 3, cookie: 4), payload: nil)]
            ),
        ]
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            NBDRequestByteToMessageDecoder(NBDRequestDecoder(payloadBytesMax: 2048, discardBytesMax: 8192))
        }
    }

    // MARK: NBDInboundBuffer splits

    /// A whole handshake transcript decodes to the same messages however the bytes are cut.
    @Test func handshakeStreamDecodesTheSameUnderAnySplit() throws {
        var stream = ClientWire.clientFlags(3)
        stream.writeImmutableBuffer(ClientWire.option(NBDOption.structuredReply))
        stream.writeImmutableBuffer(ClientWire.option(99, ClientWire.pattern(7, count: 300)))
        stream.writeImmutableBuffer(ClientWire.option(NBDOption.go, ClientWire.infoData(name: "disk", items: [1, 3])))
        let expected: [NBDHandshakeMessage] = [
            .clientFlags(3),
            .option(NBDClientOption(code: 8, data: ByteBuffer())),
            .oversizedOption(code: 99, length: 300),
            .option(NBDClientOption(code: 7, data: ClientWire.infoData(name: "disk", items: [1, 3]))),
        ]
        for chunkSize in [1, 2, 3, 5, 16, 17, 100, stream.readableBytes] {
            #expect(try decodeHandshake(stream, chunkSize: chunkSize) == expected, "chunk size \(chunkSize)")
        }
    }

    @Test func requestStreamDecodesTheSameUnderAnySplit() throws {
        let data = ByteBuffer(bytes: (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        var stream = ClientWire.write(cookie: 1, offset: 8192, data: data)
        stream.writeImmutableBuffer(ClientWire.request(NBDCommand.read, cookie: 2, offset: 0, length: 4096))
        stream.writeImmutableBuffer(ClientWire.write(cookie: 3, offset: 0, data: ClientWire.pattern(9, count: 9000)))
        stream.writeImmutableBuffer(ClientWire.write(cookie: 4, offset: 512, data: ClientWire.pattern(5, count: 512)))
        stream.writeImmutableBuffer(ClientWire.request(NBDCommand.disconnect, cookie: 5))
        let expected: [NBDRequestMessage] = [
            .request(NBDRequestHeader(type: 1, cookie: 1, offset: 8192, length: 4096), payload: data),
            .request(NBDRequestHeader(type: 0, cookie: 2, offset: 0, length: 4096), payload: nil),
            .oversizedWrite(NBDRequestHeader(type: 1, cookie: 3, offset: 0, length: 9000)),
            .request(
                NBDRequestHeader(type: 1, cookie: 4, offset: 512, length: 512),
                payload: ClientWire.pattern(5, count: 512)),
            .request(NBDRequestHeader(type: 2, cookie: 5), payload: nil),
        ]
        for chunkSize in [1, 3, 27, 28, 29, 1000, 4124, 4125, stream.readableBytes] {
            var decoder = NBDRequestDecoder(payloadBytesMax: 8192, discardBytesMax: 16384)
            var inbound = NBDInboundBuffer()
            var messages: [NBDRequestMessage] = []
            var rest = stream
            while rest.readableBytes > 0 {
                inbound.append(rest.readSlice(length: min(chunkSize, rest.readableBytes))!)
                while let message = try inbound.nextFrame(&decoder) { messages.append(message) }
            }
            #expect(messages == expected, "chunk size \(chunkSize)")
            #expect(inbound.bufferedBytes == 0)
        }
    }

    /// A payload inside one received buffer is handed out as a slice of it, not a copy.
    @Test func writePayloadInsideOneBufferIsNotCopied() throws {
        let received = ClientWire.write(cookie: 1, offset: 0, data: ClientWire.pattern(0x5a, count: 4096))
        let receivedBase = received.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        var inbound = NBDInboundBuffer()
        inbound.append(received)
        var decoder = NBDRequestDecoder(payloadBytesMax: 1 << 20, discardBytesMax: 1 << 20)
        guard case .request(_, let payload?) = try inbound.nextFrame(&decoder) else {
            Issue.record("expected a WRITE")
            return
        }
        let payloadBase = payload.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        #expect(payloadBase == receivedBase + 28)
    }

    // MARK: Malformed input

    @Test func badOptionMagicIsRejectedAsSoonAsItIsComplete() throws {
        var decoder = NBDHandshakeDecoder(expectClientFlags: false)
        var buffer = ByteBuffer(bytes: [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50])  // "IHAVEOP", one byte short
        #expect(try decoder.decode(&buffer).isNeedMore)
        buffer.writeInteger(UInt8(ascii: "X"))
        #expect(throws: NBDDecodingError.badOptionMagic(0x4948_4156_454F_5058)) { try decoder.decode(&buffer) }
    }

    @Test func transmissionRequestDuringHandshakeIsBadMagic() throws {
        var decoder = NBDHandshakeDecoder(expectClientFlags: false)
        var buffer = ClientWire.request(NBDCommand.read, cookie: 1, length: 512)
        #expect(throws: NBDDecodingError.self) { try decoder.decode(&buffer) }
    }

    @Test func absurdOptionLengthIsRejected() throws {
        var decoder = NBDHandshakeDecoder(expectClientFlags: false)
        var buffer = ByteBuffer()
        buffer.writeInteger(ClientWire.optionMagic)
        buffer.writeInteger(UInt32(7))
        buffer.writeInteger(UInt32.max)
        #expect(throws: NBDDecodingError.optionTooLarge(option: 7, length: .max)) { try decoder.decode(&buffer) }
    }

    @Test func shortMessagesWaitForMoreBytes() throws {
        var handshake = NBDHandshakeDecoder()
        var flags = ByteBuffer(bytes: [0, 0, 0])
        #expect(try handshake.decode(&flags).needed == 1)
        flags.writeInteger(UInt8(1))
        guard case .frame(.clientFlags(1)) = try handshake.decode(&flags) else {
            Issue.record("expected client flags")
            return
        }
        var option = ClientWire.option(NBDOption.go, ClientWire.infoData(name: "disk"))
        option.moveWriterIndex(to: option.writerIndex - 3)
        #expect(try handshake.decode(&option).needed == 3)
        #expect(option.readerIndex == 0)  // nothing consumed while waiting

        var requests = NBDRequestDecoder(payloadBytesMax: 4096, discardBytesMax: 4096)
        var header = ClientWire.request(NBDCommand.read, cookie: 9, length: 512)
        header.moveWriterIndex(to: 20)
        #expect(try requests.decode(&header).needed == 8)
        var write = ClientWire.write(cookie: 1, offset: 0, data: ClientWire.pattern(1, count: 100))
        write.moveWriterIndex(to: 28 + 40)
        #expect(try requests.decode(&write).needed == 60)
    }

    @Test func badRequestMagicAndExtendedHeadersAreRejected() throws {
        for magic: UInt32 in [0x2156_0953, 0x21e4_1c71, 0, 0x6744_6698] {
            var decoder = NBDRequestDecoder(payloadBytesMax: 4096, discardBytesMax: 4096)
            var buffer = ByteBuffer()
            buffer.writeInteger(magic)
            #expect(throws: NBDDecodingError.badRequestMagic(magic)) { try decoder.decode(&buffer) }
        }
    }

    @Test func absurdWriteLengthIsRejected() throws {
        var decoder = NBDRequestDecoder(payloadBytesMax: 4096, discardBytesMax: 8192)
        var buffer = ClientWire.request(NBDCommand.write, cookie: 1, length: 8193)
        #expect(throws: NBDDecodingError.writeTooLarge(length: 8193)) { try decoder.decode(&buffer) }
        // A READ of any length has no payload: the state machine judges it, not the decoder.
        var read = ClientWire.request(NBDCommand.read, cookie: 1, length: .max)
        var reads = NBDRequestDecoder(payloadBytesMax: 4096, discardBytesMax: 8192)
        guard case .frame(.request(let header, nil)) = try reads.decode(&read) else {
            Issue.record("expected a READ")
            return
        }
        #expect(header.length == .max)
    }

    private func decodeHandshake(_ stream: ByteBuffer, chunkSize: Int) throws -> [NBDHandshakeMessage] {
        var decoder = NBDHandshakeDecoder(optionDataBytesMax: 256, optionDiscardBytesMax: 1024)
        var inbound = NBDInboundBuffer()
        var messages: [NBDHandshakeMessage] = []
        var rest = stream
        while rest.readableBytes > 0 {
            inbound.append(rest.readSlice(length: min(chunkSize, rest.readableBytes))!)
            while let message = try inbound.nextFrame(&decoder) { messages.append(message) }
        }
        #expect(inbound.bufferedBytes == 0)
        return messages
    }
}

extension NBDDecodeStep {
    var isNeedMore: Bool {
        if case .needMoreBytes = self { return true }
        return false
    }
    var needed: Int? {
        if case .needMoreBytes(let count) = self { return count }
        return nil
    }
}
