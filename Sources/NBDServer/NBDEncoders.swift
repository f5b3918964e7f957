// NBDEncoders
// Writes what the server sends: option replies of the handshake and simple / structured replies of the transmission
// phase. Encoding is separate from deciding (the state machine decides), so each byte layout is tested on its own.
//
// Faults it must survive: strings from devices or exports longer than the protocol allows (cut to 4096 bytes on a
// character boundary), READ data that must not be copied (the header is written into one buffer, the data buffer is
// handed back untouched so the channel writes both with one writev).

package import NIOCore

/// A run of blocks with one allocation status, as sent in an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
package struct NBDBlockDescriptor: Hashable, Sendable {
    package var length: UInt32
    package var flags: UInt32
    package init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// A reply of the transmission phase.
package enum NBDReply: Hashable, Sendable {
    /// A simple reply without data: success (`error` 0) or failure.
    case simple(cookie: UInt64, error: UInt32)
    /// A successful READ: a simple reply followed by the data, or (structured) one `NBD_REPLY_TYPE_OFFSET_DATA` chunk
    /// flagged done.
    case readData(cookie: UInt64, offset: UInt64, data: ByteBuffer, structured: Bool)
    /// A successful structured READ with holes: `NBD_REPLY_TYPE_OFFSET_DATA` chunks for the stored parts and
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks for `holes` (ranges relative to `offset`, ascending), in offset order, the
    /// last flagged done.
    case sparseRead(cookie: UInt64, offset: UInt64, data: ByteBuffer, holes: [Range<Int>])
    /// A structured `NBD_REPLY_TYPE_ERROR` chunk flagged done.
    case structuredError(cookie: UInt64, error: UInt32, message: String)
    /// Structured `NBD_REPLY_TYPE_BLOCK_STATUS` chunks, one per selected context, the last flagged done.
    case blockStatus(cookie: UInt64, contexts: [NBDStatusChunk])

    package var cookie: UInt64 {
        switch self {
        case .simple(let cookie, _), .readData(let cookie, _, _, _), .sparseRead(let cookie, _, _, _),
            .structuredError(let cookie, _, _), .blockStatus(let cookie, _):
            return cookie
        }
    }
}

package enum NBDReplyEncoder {
    /// Appends the reply's header bytes to `buffer` and returns the data buffer that must follow them on the wire
    /// (READ data, passed through without copying), if any. A `.sparseRead` may have several data parts, so here it is
    /// copied whole into `buffer`; the connection sends it with `encodeSparseRead` instead, without copying.
    package static func encode(_ reply: NBDReply, into buffer: inout ByteBuffer) -> ByteBuffer? {
        switch reply {
        case .sparseRead(let cookie, let offset, let data, let holes):
            for var segment in encodeSparseRead(
                cookie: cookie, offset: offset, data: data, holes: holes, allocator: ByteBufferAllocator())
            {
                buffer.writeBuffer(&segment)
            }
            return nil
        case .simple(let cookie, let error):
            buffer.writeMultipleIntegers(NBDMagic.simpleReply, error, cookie)
            return nil
        case .readData(let cookie, let offset, let data, let structured):
            if structured {
                buffer.writeMultipleIntegers(
                    NBDMagic.structuredReply, NBDReplyChunk.flagDone, NBDReplyChunk.typeOffsetData, cookie,
                    UInt32(8 + data.readableBytes), offset)
            } else {
                buffer.writeMultipleIntegers(NBDMagic.simpleReply, UInt32(0), cookie)
            }
            return data
        case .structuredError(let cookie, let error, let message):
            let text = truncatedUTF8(message, maxBytes: NBDWire.stringBytesMax)
            buffer.writeMultipleIntegers(
                NBDMagic.structuredReply, NBDReplyChunk.flagDone, NBDReplyChunk.typeError, cookie,
                UInt32(6 + text.count), error, UInt16(text.count))
            buffer.writeBytes(text)
            return nil
        case .blockStatus(let cookie, let contexts):
            precondition(!contexts.isEmpty, "a block status reply needs at least one context")
            for (index, chunk) in contexts.enumerated() {
                buffer.writeMultipleIntegers(
                    NBDMagic.structuredReply, index == contexts.count - 1 ? NBDReplyChunk.flagDone : 0,
                    NBDReplyChunk.typeBlockStatus, cookie, UInt32(4 + 8 * chunk.descriptors.count), chunk.contextID)
                for descriptor in chunk.descriptors {
                    buffer.writeMultipleIntegers(descriptor.length, descriptor.flags)
                }
            }
            return nil
        }
    }

    /// The chunks of a structured READ with holes, as buffers to write in order: chunk headers (hole chunks whole) and
    /// slices of `data` (not copied). The chunk covering the end of the request carries NBD_REPLY_FLAG_DONE.
    package static func encodeSparseRead(
        cookie: UInt64, offset: UInt64, data: ByteBuffer, holes: [Range<Int>], allocator: ByteBufferAllocator
    ) -> [ByteBuffer] {
        var segments: [ByteBuffer] = []
        var headers = allocator.buffer(capacity: 32 * (2 * holes.count + 1))
        let total = data.readableBytes
        var position = 0
        func flag(_ end: Int) -> UInt16 { end == total ? NBDReplyChunk.flagDone : 0 }
        func dataChunk(upTo end: Int) {
            guard end > position else { return }
            headers.writeMultipleIntegers(
                NBDMagic.structuredReply, flag(end), NBDReplyChunk.typeOffsetData, cookie, UInt32(8 + end - position),
                offset + UInt64(position))
            segments.append(headers)
            headers.clear()
            segments.append(data.getSlice(at: data.readerIndex + position, length: end - position)!)
            position = end
        }
        for hole in holes {
            let lower = max(hole.lowerBound, position)
            let upper = min(hole.upperBound, total)
            guard lower < upper else { continue }
            dataChunk(upTo: lower)
            headers.writeMultipleIntegers(
                NBDMagic.structuredReply, flag(upper), NBDReplyChunk.typeOffsetHole, cookie, UInt32(12),
                offset + UInt64(lower), UInt32(upper - lower))
            position = upper
        }
        dataChunk(upTo: total)
        if headers.readableBytes > 0 { segments.append(headers) }
        return segments
    }

    /// The whole reply as one buffer (tests and cold paths).
    package static func encode(_ reply: NBDReply, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer
    {
        var buffer = allocator.buffer(capacity: 64)
        if var data = encode(reply, into: &buffer) {
            buffer.writeBuffer(&data)
        }
        return buffer
    }

    /// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
    package static func greeting(handshakeFlags: UInt16, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: NBDWire.greetingBytes)
        buffer.writeMultipleIntegers(NBDMagic.initPassword, NBDMagic.option, handshakeFlags)
        return buffer
    }

    /// Appends one option reply: magic, option, reply type, length, then what `body` writes.
    package static func appendOptionReply(
        to buffer: inout ByteBuffer, option: UInt32, type: UInt32, body: (inout ByteBuffer) -> Void = { _ in }
    ) {
        buffer.writeMultipleIntegers(NBDMagic.optionReply, option, type)
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        let start = buffer.writerIndex
        body(&buffer)
        buffer.setInteger(UInt32(buffer.writerIndex - start), at: lengthIndex)
    }

    /// Appends an error option reply whose data is a message for humans.
    package static func appendOptionError(
        to buffer: inout ByteBuffer, option: UInt32, type: UInt32, message: String
    ) {
        precondition(type & 0x8000_0000 != 0, "option error replies have bit 31 set")
        appendOptionReply(to: &buffer, option: option, type: type) { $0.writeBytes(truncatedUTF8(message)) }
    }

    /// `string` as UTF-8, cut to at most `maxBytes` bytes without splitting a character.
    package static func truncatedUTF8(_ string: String, maxBytes: Int = NBDWire.stringBytesMax) -> ArraySlice<UInt8> {
        let bytes = Array(string.utf8)
        guard bytes.count > maxBytes else { return bytes[...] }
        var end = maxBytes
        // Back off continuation bytes (10xxxxxx) so the cut falls before the start of a character.
        while end > 0 && bytes[end] & 0xC0 == 0x80 { end -= 1 }
        return bytes[..<end]
    }
}

/// The block status of one meta context, for one request.
package struct NBDStatusChunk: Hashable, Sendable {
    package var contextID: UInt32
    package var descriptors: [NBDBlockDescriptor]
    package init(contextID: UInt32, descriptors: [NBDBlockDescriptor]) {
        self.contextID = contextID
        self.descriptors = descriptors
    }
}
