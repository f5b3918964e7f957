// A minimal blocking NBD client for tests that must know exactly which writes completed when (a client-side model
// of the writes). Fixed newstyle handshake with NBD_OPT_GO, simple replies, one request at a time. Not for production.

import Foundation

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif

public final class NBDTestClient {
    public let exportName: String
    public private(set) var sizeBytes: UInt64 = 0
    private let fd: Int32
    private var nextHandle: UInt64 = 1

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Connects to the Unix socket and negotiates `export`.
    public init(socketPath: String, export: String) throws {
        exportName = export
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw Failure(description: "socket path too long")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in pathBytes.enumerated() { raw[i] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            close(fd)
            throw Failure(description: "connect \(socketPath): errno \(errno)")
        }
        try handshake()
    }

    deinit { close(fd) }

    private func send(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Failure(description: "write failed: errno \(errno)") }
            done += n
        }
    }

    private func receive(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, count - done) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Failure(description: "connection closed") }
            done += n
        }
        return bytes
    }

    private static func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    private static func read<T: FixedWidthInteger>(_ bytes: [UInt8], at offset: Int, as: T.Type) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size { value = value << 8 | T(bytes[offset + i]) }
        return value
    }

    private func handshake() throws {
        let greeting = try receive(18)
        guard Self.read(greeting, at: 0, as: UInt64.self) == 0x4e42_444d_4147_4943,
            Self.read(greeting, at: 8, as: UInt64.self) == 0x4948_4156_454f_5054
        else { throw Failure(description: "not an NBD newstyle server") }
        let flags = Self.read(greeting, at: 16, as: UInt16.self)
        let noZeroes: UInt32 = flags & 2 != 0 ? 2 : 0
        try send(Self.be(UInt32(1) | noZeroes))  // FIXED_NEWSTYLE (+ NO_ZEROES)
        let name = Array(exportName.utf8)
        var option = Self.be(UInt64(0x4948_4156_454f_5054)) + Self.be(UInt32(7))  // NBD_OPT_GO
        option += Self.be(UInt32(4 + name.count + 2)) + Self.be(UInt32(name.count)) + name + Self.be(UInt16(0))
        try send(option)
        while true {
            let reply = try receive(20)
            let type = Self.read(reply, at: 12, as: UInt32.self)
            let length = Int(Self.read(reply, at: 16, as: UInt32.self))
            let data = try receive(length)
            if type == 1 { return }  // NBD_REP_ACK
            if type == 3, length >= 12, Self.read(data, at: 0, as: UInt16.self) == 0 {  // NBD_INFO_EXPORT
                sizeBytes = Self.read(data, at: 2, as: UInt64.self)
                continue
            }
            if type & 0x8000_0000 != 0 {
                throw Failure(description: "export \(exportName) refused: \(String(decoding: data, as: UTF8.self))")
            }
        }
    }

    private func request(type: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt32, payload: [UInt8] = [])
        throws -> [UInt8]
    {
        let handle = nextHandle
        nextHandle += 1
        var header = Self.be(UInt32(0x2560_9513)) + Self.be(flags) + Self.be(type) + Self.be(handle)
        header += Self.be(offset) + Self.be(length)
        try send(header + payload)
        let reply = try receive(16)
        guard Self.read(reply, at: 0, as: UInt32.self) == 0x6744_6698, Self.read(reply, at: 8, as: UInt64.self) == handle
        else { throw Failure(description: "unexpected reply") }
        let error = Self.read(reply, at: 4, as: UInt32.self)
        guard error == 0 else { throw Failure(description: "NBD error \(error)") }
        return type == 0 ? try receive(Int(length)) : []
    }

    public func write(offset: UInt64, _ data: [UInt8], fua: Bool = false) throws {
        _ = try request(type: 1, flags: fua ? 1 : 0, offset: offset, length: UInt32(data.count), payload: data)
    }

    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        try request(type: 0, offset: offset, length: UInt32(length))
    }

    public func flush() throws { _ = try request(type: 3, offset: 0, length: 0) }

    public func disconnect() { try? send(Self.be(UInt32(0x2560_9513)) + Self.be(UInt16(0)) + Self.be(UInt16(2)) + [UInt8](repeating: 0, count: 20)) }
}
