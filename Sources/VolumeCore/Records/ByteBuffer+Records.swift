// Little helpers shared by the record codecs: fixed-width little-endian fields at absolute offsets and a CRC over a
// byte range of a buffer.

public import NIOCore

extension ByteBuffer {
    /// `count` zero bytes, filled with one memset (NIO's repeating-byte initializer writes byte by byte in debug
    /// builds, which made tests and the simulation spend a tenth of their time zeroing buffers).
    public static func zeroes(_ count: Int) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            UnsafeMutableRawBufferPointer(rebasing: raw[0..<count]).initializeMemory(as: UInt8.self, repeating: 0)
            return count
        }
        return buffer
    }

    @inlinable
    package mutating func setLE<T: FixedWidthInteger>(_ value: T, at index: Int) {
        setInteger(value, at: readerIndex + index, endianness: .little)
    }

    @inlinable
    package func getLE<T: FixedWidthInteger>(_ type: T.Type, at index: Int) -> T {
        getInteger(at: readerIndex + index, endianness: .little, as: T.self)!
    }

    /// CRC32C of readable bytes `[start, end)` (relative to the reader index).
    @inlinable
    package func crc32c(_ start: Int, _ end: Int) -> UInt32 {
        withUnsafeReadableBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[start..<end])) }
    }

    /// Eight ASCII bytes at relative `index` equal `magic`.
    @inlinable
    package func hasMagic(_ magic: [UInt8], at index: Int = 0) -> Bool {
        guard readableBytes >= index + magic.count else { return false }
        return withUnsafeReadableBytes { raw in
            for i in 0..<magic.count where raw[index + i] != magic[i] { return false }
            return true
        }
    }
}

/// Calls `body` with the readable bytes of every buffer of `buffers`, in order (for one pwritev or writev).
package func withReadablePointers<R>(
    _ buffers: [ByteBuffer], _ body: ([UnsafeRawBufferPointer]) throws(VDError) -> R
) throws(VDError) -> R {
    var pointers: [UnsafeRawBufferPointer] = []
    pointers.reserveCapacity(buffers.count)
    return try nestReadablePointers(buffers[...], &pointers, body)
}

private func nestReadablePointers<R>(
    _ rest: ArraySlice<ByteBuffer>, _ pointers: inout [UnsafeRawBufferPointer],
    _ body: ([UnsafeRawBufferPointer]) throws(VDError) -> R
) throws(VDError) -> R {
    guard let first = rest.first else { return try body(pointers) }
    return try first.withUnsafeReadableBytes { (raw) throws(VDError) -> R in
        pointers.append(raw)
        return try nestReadablePointers(rest.dropFirst(), &pointers, body)
    }
}

/// A 128-bit volume identity (a random UUID), stored in every record so that data of one volume can never be
/// mistaken for another's (for example in a recycled cache file).
public struct VolumeID: Hashable, Sendable, Codable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64
    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }
    public static func random() -> VolumeID { random(using: SystemRandom()) }

    public static func random(using source: any RandomSource) -> VolumeID {
        // RFC 4122 version 4 bits, so the text form is a valid UUID.
        let high = (source.next() & ~0xF000) | 0x4000
        let low = (source.next() & ~(UInt64(0xC) << 60)) | (UInt64(0x8) << 60)
        return VolumeID(high: high, low: low)
    }
    public var description: String {
        func hex(_ v: UInt64, _ digits: Int) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: digits - s.count) + s
        }
        let h = hex(high, 16)
        let l = hex(low, 16)
        let hs = Array(h)
        let ls = Array(l)
        return String(hs[0..<8]) + "-" + String(hs[8..<12]) + "-" + String(hs[12..<16]) + "-" + String(ls[0..<4]) + "-"
            + String(ls[4..<16])
    }
    public init?(string: String) {
        let hex = string.filter { $0 != "-" }
        guard hex.count == 32, let h = UInt64(hex.prefix(16), radix: 16), let l = UInt64(hex.suffix(16), radix: 16)
        else { return nil }
        self.init(high: h, low: l)
    }
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let id = VolumeID(string: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "bad volume id"))
        }
        self = id
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}
