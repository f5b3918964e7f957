// NBDDecoders
// Turns the client's byte stream into messages: the handshake decoder (client flags, then option frames) and the
// transmission decoder (request headers, WRITE payloads). Both are plain structs with no channel inside, so tests can
// feed them bytes one at a time or all at once.
//
// Faults they must survive: any byte sequence. Bad magic and absurd lengths end in a thrown `NBDDecodingError` (the
// connection then closes); lengths above what we buffer but below the absurd bound are skipped as they stream in
// (never buffered), so no client can make us hold more than one option of `optionDataBytesMax` or one WRITE payload
// of the advertised maximum.

package import NIOCore

/// Why the byte stream cannot be decoded; the connection must be closed.
package enum NBDDecodingError: Error, Hashable, Sendable, CustomStringConvertible {
    case badOptionMagic(UInt64)
    case optionTooLarge(option: UInt32, length: UInt32)
    case badRequestMagic(UInt32)
    case writeTooLarge(length: UInt32)

    package var description: String {
        switch self {
        case .badOptionMagic(let magic):
            return "bad option magic 0x\(String(magic, radix: 16)) (expected IHAVEOPT)"
        case .optionTooLarge(let option, let length):
            return "option \(option) announces \(length) bytes of data, more than the server accepts"
        case .badRequestMagic(let magic):
            return "bad request magic 0x\(String(magic, radix: 16)) (expected 0x25609513)"
        case .writeTooLarge(let length):
            return "WRITE announces a payload of \(length) bytes, more than the server accepts"
        }
    }
}

/// What one call of a frame decoder produced.
package enum NBDDecodeStep<Frame> {
    /// A whole frame; its bytes were consumed.
    case frame(Frame)
    /// No frame yet: `count` more bytes are needed. Unconsumed bytes left in the buffer are the start of the next
    /// frame (the caller keeps them and appends `count` more); consumed bytes were skipped payload.
    case needMoreBytes(Int)
}

/// A decoder that cuts frames off the front of a buffer (see `NBDInboundBuffer`).
package protocol NBDFrameDecoder {
    associatedtype Frame
    mutating func decode(_ buffer: inout ByteBuffer) throws(NBDDecodingError) -> NBDDecodeStep<Frame>
}

// MARK: - Handshake

/// One option as sent by the client: its code and its data (at most `optionDataBytesMax` bytes).
package struct NBDClientOption: Hashable, Sendable {
    package var code: UInt32
    package var data: ByteBuffer
    package init(code: UInt32, data: ByteBuffer) {
        self.code = code
        self.data = data
    }
}

/// A message of the handshake phase.
package enum NBDHandshakeMessage: Hashable, Sendable {
    /// The 32-bit client flags that follow the server greeting.
    case clientFlags(UInt32)
    case option(NBDClientOption)
    /// An option whose data is longer than we buffer; the data is being skipped (the server replies with an error).
    case oversizedOption(code: UInt32, length: UInt32)
}

/// Decodes the client side of the handshake: 4 bytes of client flags, then option frames.
package struct NBDHandshakeDecoder: NBDFrameDecoder {
    /// Options with more data than this are skipped, not buffered. Our largest legitimate option is a
    /// `NBD_OPT_SET_META_CONTEXT` listing a few queries of at most 4096 bytes each.
    package static let optionDataBytesMaxDefault: UInt32 = 64 << 10
    /// Options announcing more data than this end the connection (the spec allows a hard disconnect on a denial of
    /// service; skipping gigabytes of data would be one).
    package static let optionDiscardBytesMaxDefault: UInt32 = 16 << 20

    private enum State: Hashable {
        case clientFlags
        case options
        case discarding(remaining: UInt32)
    }

    package let optionDataBytesMax: UInt32
    package let optionDiscardBytesMax: UInt32
    private var state = State.clientFlags

    /// - Parameter expectClientFlags: false to start with option frames (tests of the option framing alone).
    package init(
        optionDataBytesMax: UInt32 = optionDataBytesMaxDefault,
        optionDiscardBytesMax: UInt32 = optionDiscardBytesMaxDefault, expectClientFlags: Bool = true
    ) {
        precondition(optionDataBytesMax <= optionDiscardBytesMax)
        self.optionDataBytesMax = optionDataBytesMax
        self.optionDiscardBytesMax = optionDiscardBytesMax
        self.state = expectClientFlags ? .clientFlags : .options
    }

    package mutating func decode(
        _ buffer: inout ByteBuffer
    ) throws(NBDDecodingError) -> NBDDecodeStep<
        NBDHandshakeMessage
    > {
        while true {
            switch state {
            case .clientFlags:
                guard let flags = buffer.readInteger(as: UInt32.self) else {
                    return .needMoreBytes(NBDWire.clientFlagsBytes - buffer.readableBytes)
                }
                state = .options
                return .frame(.clientFlags(flags))

            case .discarding(let remaining):
                let skipped = min(Int(remaining), buffer.readableBytes)
                buffer.moveReaderIndex(forwardBy: skipped)
                let left = remaining - UInt32(skipped)
                if left > 0 {
                    state = .discarding(remaining: left)
                    return .needMoreBytes(Int(left))
                }
                state = .options

            case .options:
                let start = buffer.readerIndex
                guard buffer.readableBytes >= NBDWire.optionHeaderBytes,
                    let magic = buffer.getInteger(at: start, as: UInt64.self),
                    let code = buffer.getInteger(at: start + 8, as: UInt32.self),
                    let length = buffer.getInteger(at: start + 12, as: UInt32.self)
                else {
                    // Ask for the magic first and check it as soon as it is complete: a client speaking another
                    // protocol is cut off without waiting for bytes it may never send, however its bytes are split.
                    guard let magic = buffer.getInteger(at: start, as: UInt64.self) else {
                        return .needMoreBytes(8 - buffer.readableBytes)
                    }
                    guard magic == NBDMagic.option else { throw .badOptionMagic(magic) }
                    return .needMoreBytes(NBDWire.optionHeaderBytes - buffer.readableBytes)
                }
                guard magic == NBDMagic.option else { throw .badOptionMagic(magic) }
                if length <= optionDataBytesMax {
                    let frameBytes = NBDWire.optionHeaderBytes + Int(length)
                    guard buffer.readableBytes >= frameBytes else {
                        return .needMoreBytes(frameBytes - buffer.readableBytes)
                    }
                    buffer.moveReaderIndex(forwardBy: NBDWire.optionHeaderBytes)
                    let data = buffer.readSlice(length: Int(length))!
                    return .frame(.option(NBDClientOption(code: code, data: data)))
                }
                guard length <= optionDiscardBytesMax else { throw .optionTooLarge(option: code, length: length) }
                buffer.moveReaderIndex(forwardBy: NBDWire.optionHeaderBytes)
                state = .discarding(remaining: length)
                return .frame(.oversizedOption(code: code, length: length))
            }
        }
    }
}

// MARK: - Transmission

/// The fixed part of a transmission request.
package struct NBDRequestHeader: Hashable, Sendable {
    package var flags: UInt16
    package var type: UInt16
    package var cookie: UInt64
    package var offset: UInt64
    package var length: UInt32
    package init(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
}

/// A message of the transmission phase.
package enum NBDRequestMessage: Hashable, Sendable {
    /// A request; `payload` holds the `length` data bytes of a WRITE (a slice of the received bytes, not a copy) and
    /// is nil for every other type.
    case request(NBDRequestHeader, payload: ByteBuffer?)
    /// A WRITE whose payload is larger than the advertised maximum; the payload is being skipped and the server
    /// replies with an error.
    case oversizedWrite(NBDRequestHeader)
}

/// Decodes transmission requests.
package struct NBDRequestDecoder: NBDFrameDecoder {
    private enum State: Hashable {
        case header
        case discarding(remaining: UInt32)
    }

    /// WRITE payloads up to this many bytes are delivered (the advertised maximum payload).
    package let payloadBytesMax: UInt32
    /// WRITE payloads above `payloadBytesMax` and up to this are skipped; above it the connection ends.
    package let discardBytesMax: UInt32
    private var state = State.header

    package init(payloadBytesMax: UInt32, discardBytesMax: UInt32) {
        precondition(payloadBytesMax <= discardBytesMax)
        self.payloadBytesMax = payloadBytesMax
        self.discardBytesMax = discardBytesMax
    }

    package mutating func decode(
        _ buffer: inout ByteBuffer
    ) throws(NBDDecodingError) -> NBDDecodeStep<
        NBDRequestMessage
    > {
        while true {
            switch state {
            case .discarding(let remaining):
                let skipped = min(Int(remaining), buffer.readableBytes)
                buffer.moveReaderIndex(forwardBy: skipped)
                let left = remaining - UInt32(skipped)
                if left > 0 {
                    state = .discarding(remaining: left)
                    return .needMoreBytes(Int(left))
                }
                state = .header

            case .header:
                let start = buffer.readerIndex
                guard buffer.readableBytes >= NBDWire.requestHeaderBytes,
                    let (magic, flags, type, cookie, offset, length) = buffer.getMultipleIntegers(
                        at: start, as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self)
                else {
                    // As for options: the magic is checked as soon as its 4 bytes are here.
                    guard let magic = buffer.getInteger(at: start, as: UInt32.self) else {
                        return .needMoreBytes(4 - buffer.readableBytes)
                    }
                    guard magic == NBDMagic.request else { throw .badRequestMagic(magic) }
                    return .needMoreBytes(NBDWire.requestHeaderBytes - buffer.readableBytes)
                }
                guard magic == NBDMagic.request else { throw .badRequestMagic(magic) }
                let header = NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
                guard type == NBDCommand.write else {
                    buffer.moveReaderIndex(forwardBy: NBDWire.requestHeaderBytes)
                    return .frame(.request(header, payload: nil))
                }
                if length <= payloadBytesMax {
                    let frameBytes = NBDWire.requestHeaderBytes + Int(length)
                    guard buffer.readableBytes >= frameBytes else {
                        return .needMoreBytes(frameBytes - buffer.readableBytes)
                    }
                    buffer.moveReaderIndex(forwardBy: NBDWire.requestHeaderBytes)
                    let payload = buffer.readSlice(length: Int(length))!
                    return .frame(.request(header, payload: payload))
                }
                guard length <= discardBytesMax else { throw .writeTooLarge(length: length) }
                buffer.moveReaderIndex(forwardBy: NBDWire.requestHeaderBytes)
                state = .discarding(remaining: length)
                return .frame(.oversizedWrite(header))
            }
        }
    }
}

// MARK: - ByteToMessageDecoder adapters

/// The handshake decoder as a NIO `ByteToMessageDecoder` (used by tests with `ByteToMessageDecoderVerifier`).
package struct NBDHandshakeByteToMessageDecoder: ByteToMessageDecoder {
    package typealias InboundOut = NBDHandshakeMessage
    package var decoder: NBDHandshakeDecoder
    package init(_ decoder: NBDHandshakeDecoder = NBDHandshakeDecoder()) { self.decoder = decoder }

    package mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        switch try decoder.decode(&buffer) {
        case .frame(let message):
            context.fireChannelRead(Self.wrapInboundOut(message))
            return .continue
        case .needMoreBytes:
            return .needMoreData
        }
    }

    package mutating func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}

/// The request decoder as a NIO `ByteToMessageDecoder` (used by tests with `ByteToMessageDecoderVerifier`).
package struct NBDRequestByteToMessageDecoder: ByteToMessageDecoder {
    package typealias InboundOut = NBDRequestMessage
    package var decoder: NBDRequestDecoder
    package init(_ decoder: NBDRequestDecoder) { self.decoder = decoder }

    package mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        switch try decoder.decode(&buffer) {
        case .frame(let message):
            context.fireChannelRead(Self.wrapInboundOut(message))
            return .continue
        case .needMoreBytes:
            return .needMoreData
        }
    }

    package mutating func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}
