// The client side of the NBD wire format, written independently of the server's encoders and decoders so tests
// check the server against the spec rather than against itself.

import NBDServer
import NIOCore

enum ClientWire {
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    static let requestMagic: UInt32 = 0x2560_9513

    static func bytes(_ values: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: values) }

    static func clientFlags(_ flags: UInt32) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(flags)
        return buffer
    }

    static func option(_ code: UInt32, _ data: ByteBuffer = ByteBuffer()) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(optionMagic)
        buffer.writeInteger(code)
        buffer.writeInteger(UInt32(data.readableBytes))
        buffer.writeImmutableBuffer(data)
        return buffer
    }

    static func option(_ code: UInt32, string: String) -> ByteBuffer {
        option(code, ByteBuffer(string: string))
    }

    /// NBD_OPT_INFO / NBD_OPT_GO data.
    static func infoData(name: String, items: [UInt16] = []) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(name.utf8.count))
        buffer.writeString(name)
        buffer.writeInteger(UInt16(items.count))
        for item in items { buffer.writeInteger(item) }
        return buffer
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data.
    static func metaContextData(name: String, queries: [String]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(name.utf8.count))
        buffer.writeString(name)
        buffer.writeInteger(UInt32(queries.count))
        for query in queries {
            buffer.writeInteger(UInt32(query.utf8.count))
            buffer.writeString(query)
        }
        return buffer
    }

    static func request(
        _ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0,
        payload: ByteBuffer? = nil
    ) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(requestMagic)
        buffer.writeInteger(flags)
        buffer.writeInteger(type)
        buffer.writeInteger(cookie)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
        if let payload { buffer.writeImmutableBuffer(payload) }
        return buffer
    }

    static func write(cookie: UInt64, offset: UInt64, data: ByteBuffer, flags: UInt16 = 0) -> ByteBuffer {
        request(
            NBDCommand.write, flags: flags, cookie: cookie, offset: offset, length: UInt32(data.readableBytes),
            payload: data)
    }

    static func pattern(_ byte: UInt8, count: Int) -> ByteBuffer {
        ByteBuffer(repeating: byte, count: count)
    }
}

/// One option reply as the client sees it.
struct OptionReply: Equatable, CustomStringConvertible {
    var option: UInt32
    var type: UInt32
    var data: ByteBuffer

    var description: String {
        "OptionReply(option: \(option), type: 0x\(String(type, radix: 16)), \(data.readableBytes) bytes)"
    }

    /// Parses every complete option reply at the front of `buffer`.
    static func parseAll(_ buffer: inout ByteBuffer) throws -> [OptionReply] {
        var replies: [OptionReply] = []
        while let reply = try parse(&buffer) { replies.append(reply) }
        return replies
    }

    static func parse(_ buffer: inout ByteBuffer) throws -> OptionReply? {
        guard buffer.readableBytes >= 20,
            let length = buffer.getInteger(at: buffer.readerIndex + 16, as: UInt32.self),
            buffer.readableBytes >= 20 + Int(length)
        else { return nil }
        let magic = buffer.readInteger(as: UInt64.self)!
        guard magic == 0x0003_e889_0455_65a9 else {
            throw WireError("bad option reply magic \(String(magic, radix: 16))")
        }
        let option = buffer.readInteger(as: UInt32.self)!
        let type = buffer.readInteger(as: UInt32.self)!
        _ = buffer.readInteger(as: UInt32.self)!
        return OptionReply(option: option, type: type, data: buffer.readSlice(length: Int(length))!)
    }

    /// For NBD_REP_INFO replies: the info type.
    var infoType: UInt16? { data.getInteger(at: data.readerIndex, as: UInt16.self) }
}

/// One reply of the transmission phase as the client sees it.
enum TransmissionReply: Equatable {
    case simple(cookie: UInt64, error: UInt32, data: ByteBuffer?)
    case chunk(cookie: UInt64, flags: UInt16, type: UInt16, payload: ByteBuffer)

    var cookie: UInt64 {
        switch self {
        case .simple(let cookie, _, _), .chunk(let cookie, _, _, _): return cookie
        }
    }

    /// The error of a simple reply or of an error chunk (0 for success).
    var error: UInt32 {
        switch self {
        case .simple(_, let error, _): return error
        case .chunk(_, _, let type, let payload):
            guard type & 0x8000 != 0 else { return 0 }
            return payload.getInteger(at: payload.readerIndex, as: UInt32.self) ?? 0
        }
    }

    var isDone: Bool {
        switch self {
        case .simple: return true
        case .chunk(_, let flags, _, _): return flags & 1 != 0
        }
    }

    /// Parses the next complete reply; `readLengths` maps the cookies of pending simple-reply READs to their
    /// lengths (a simple reply's data length is only known from the request).
    static func parse(_ buffer: inout ByteBuffer, readLengths: [UInt64: Int] = [:]) throws -> TransmissionReply? {
        guard let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        switch magic {
        case 0x6744_6698:
            guard buffer.readableBytes >= 16 else { return nil }
            let error = buffer.getInteger(at: buffer.readerIndex + 4, as: UInt32.self)!
            let cookie = buffer.getInteger(at: buffer.readerIndex + 8, as: UInt64.self)!
            let dataLength = error == 0 ? (readLengths[cookie] ?? 0) : 0
            guard buffer.readableBytes >= 16 + dataLength else { return nil }
            buffer.moveReaderIndex(forwardBy: 16)
            let data = dataLength > 0 ? buffer.readSlice(length: dataLength) : nil
            return .simple(cookie: cookie, error: error, data: data)
        case 0x668e_33ef:
            guard buffer.readableBytes >= 20 else { return nil }
            let length = Int(buffer.getInteger(at: buffer.readerIndex + 16, as: UInt32.self)!)
            guard buffer.readableBytes >= 20 + length else { return nil }
            _ = buffer.readInteger(as: UInt32.self)
            let flags = buffer.readInteger(as: UInt16.self)!
            let type = buffer.readInteger(as: UInt16.self)!
            let cookie = buffer.readInteger(as: UInt64.self)!
            _ = buffer.readInteger(as: UInt32.self)
            return .chunk(cookie: cookie, flags: flags, type: type, payload: buffer.readSlice(length: length)!)
        default:
            throw WireError("bad reply magic 0x\(String(magic, radix: 16))")
        }
    }

    static func parseAll(_ buffer: inout ByteBuffer, readLengths: [UInt64: Int] = [:]) throws -> [TransmissionReply] {
        var replies: [TransmissionReply] = []
        while let reply = try parse(&buffer, readLengths: readLengths) { replies.append(reply) }
        return replies
    }
}

struct WireError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
