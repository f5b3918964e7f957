// A minimal HTTP/1.1 framer for S3FaultProxy: it splits a byte stream (requests from libs3, or responses from the
// server) into message heads and bodies without changing a byte, so the proxy can pass traffic through unchanged and
// still know where a request starts and which bytes are a response body. It understands Content-Length, chunked
// bodies (passed as opaque body bytes), bodiless responses (HEAD, 1xx such as `100 Continue`, 204, 304) and bodies
// delimited by the connection closing. Malformed input (a head over `headBytesMax`) switches it to pass-through.

public import NIOCore

/// The parsed first line and headers of one HTTP message, plus its raw bytes.
public struct HTTPMessageHead: Sendable {
    public var firstLine: String
    public var headers: [(name: String, value: String)]
    public var raw: ByteBuffer

    /// Request method (requests only).
    public var method: String { String(firstLine.split(separator: " ").first ?? "") }
    /// Request target (requests only).
    public var target: String {
        let parts = firstLine.split(separator: " ")
        return parts.count > 1 ? String(parts[1]) : ""
    }
    /// Status code (responses only; 0 when unparsable).
    public var status: Int {
        let parts = firstLine.split(separator: " ")
        return parts.count > 1 ? Int(parts[1]) ?? 0 : 0
    }

    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }
    var contentLength: Int? { header("content-length").flatMap { Int($0.trimmingCharacters()) } }
    var isChunked: Bool { header("transfer-encoding")?.lowercased().contains("chunked") ?? false }
}

/// Splits an HTTP/1.1 byte stream into pieces. Feed bytes with `append`, take pieces with `next`.
public struct HTTPStreamParser: Sendable {
    /// One piece of the stream; concatenating the bytes of all pieces gives back the input exactly.
    public enum Piece: Sendable {
        case head(HTTPMessageHead)
        /// Body bytes; `offset` is the position of the first byte in the body. For chunked bodies the bytes include
        /// the chunk framing and `isFramed` is true.
        case body(ByteBuffer, offset: Int, isFramed: Bool)
        /// The message ended (a new head may follow).
        case end
    }

    private enum State: Sendable {
        case head
        case body(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case trailers
        case untilClose
        case passThrough
    }

    public static let headBytesMax = 64 * 1024

    public let isResponse: Bool
    private var buffer = ByteBuffer()
    private var state = State.head
    private var bodyOffset = 0
    private var pendingEnd = false

    public init(isResponse: Bool) { self.isResponse = isResponse }

    public mutating func append(_ bytes: ByteBuffer) {
        var bytes = bytes
        buffer.writeBuffer(&bytes)
    }

    /// The next complete piece. `bodyless` is asked, for a response head, whether the message has no body (the
    /// proxy knows whether the request was a HEAD).
    public mutating func next(bodyless: (HTTPMessageHead) -> Bool = { _ in false }) -> Piece? {
        if pendingEnd {
            pendingEnd = false
            state = .head
            return .end
        }
        switch state {
        case .passThrough, .untilClose:
            guard buffer.readableBytes > 0 else { return nil }
            let chunk = buffer.readSlice(length: buffer.readableBytes)!
            defer { bodyOffset += chunk.readableBytes }
            return .body(chunk, offset: bodyOffset, isFramed: false)
        case .head:
            guard let end = buffer.readableBytesView.firstRange(of: Array("\r\n\r\n".utf8)) else {
                if buffer.readableBytes > Self.headBytesMax { state = .passThrough }
                return nil
            }
            let length = end.upperBound - buffer.readerIndex
            let raw = buffer.readSlice(length: length)!
            let head = Self.parseHead(raw)
            bodyOffset = 0
            let length2 = head.contentLength
            if isResponse && (head.status / 100 == 1 || head.status == 204 || head.status == 304 || bodyless(head)) {
                pendingEnd = true
            } else if head.isChunked {
                state = .chunkSize
            } else if let length2, length2 > 0 {
                state = .body(remaining: length2)
            } else if isResponse && length2 == nil {
                state = .untilClose
            } else {
                pendingEnd = true
            }
            return .head(head)
        case .body(let remaining):
            guard buffer.readableBytes > 0 else { return nil }
            let count = min(remaining, buffer.readableBytes)
            let chunk = buffer.readSlice(length: count)!
            let offset = bodyOffset
            bodyOffset += count
            if count == remaining {
                pendingEnd = true
            } else {
                state = .body(remaining: remaining - count)
            }
            return .body(chunk, offset: offset, isFramed: false)
        case .chunkSize:
            guard let lineEnd = buffer.readableBytesView.firstRange(of: Array("\r\n".utf8)) else { return nil }
            let line = buffer.readSlice(length: lineEnd.upperBound - buffer.readerIndex)!
            let text = String(buffer: line).split(separator: ";").first.map(String.init) ?? ""
            let size = Int(text.trimmingCharacters(), radix: 16) ?? 0
            state = size == 0 ? .trailers : .chunkData(remaining: size + 2)
            return framed(line)
        case .chunkData(let remaining):
            guard buffer.readableBytes > 0 else { return nil }
            let count = min(remaining, buffer.readableBytes)
            let chunk = buffer.readSlice(length: count)!
            state = count == remaining ? .chunkSize : .chunkData(remaining: remaining - count)
            return framed(chunk)
        case .trailers:
            guard let lineEnd = buffer.readableBytesView.firstRange(of: Array("\r\n".utf8)) else { return nil }
            let line = buffer.readSlice(length: lineEnd.upperBound - buffer.readerIndex)!
            if line.readableBytes == 2 { pendingEnd = true }
            return framed(line)
        }
    }

    private mutating func framed(_ bytes: ByteBuffer) -> Piece {
        defer { bodyOffset += bytes.readableBytes }
        return .body(bytes, offset: bodyOffset, isFramed: true)
    }

    private static func parseHead(_ raw: ByteBuffer) -> HTTPMessageHead {
        let text = String(buffer: raw)
        var lines = text.components(separatedByCRLF: ())
        let first = lines.isEmpty ? "" : lines.removeFirst()
        var headers: [(name: String, value: String)] = []
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers.append(
                (String(line[..<colon]), String(line[line.index(after: colon)...]).trimmingCharacters()))
        }
        return HTTPMessageHead(firstLine: first, headers: headers, raw: raw)
    }
}

extension String {
    fileprivate func trimmingCharacters() -> String {
        var s = Substring(self)
        while let first = s.first, first == " " || first == "\t" { s = s.dropFirst() }
        while let last = s.last, last == " " || last == "\t" || last == "\r" || last == "\n" { s = s.dropLast() }
        return String(s)
    }

    fileprivate func components(separatedByCRLF: ()) -> [String] {
        var result: [String] = []
        var current = ""
        var iterator = makeIterator()
        while let character = iterator.next() {
            if character == "\r\n" || character == "\n" {
                result.append(current)
                current = ""
            } else {
                current.append(character)
            }
        }
        if !current.isEmpty { result.append(current) }
        return result
    }
}
