// A small metadata record (volume configuration, snapshot table, ...) as JSON inside a binary envelope:
//
//   magic "VDMETA01" (8) | version u16 | kind u16 | payload length u32 | payload CRC32C u32 | header CRC32C u32 | JSON
//
// JSON keeps the records readable and extensible; the envelope makes a torn, truncated or bit-flipped record fail
// loudly instead of decoding to something plausible.

import FoundationEssentials
public import NIOCore

public enum MetadataRecord {
    public static let version: UInt16 = 1
    static let magic: [UInt8] = Array("VDMETA01".utf8)
    static let headerBytes = 24

    public struct Kind: RawRepresentable, Hashable, Sendable {
        public var rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let volumeConfig = Kind(rawValue: 1)
        public static let volumeRegistration = Kind(rawValue: 2)
        public static let snapshotTable = Kind(rawValue: 3)
        public static let scrubResult = Kind(rawValue: 4)
        public static let lease = Kind(rawValue: 5)
        public static let ownerRecord = Kind(rawValue: 6)
        public static let nodeRecord = Kind(rawValue: 7)
        public static let generationStart = Kind(rawValue: 8)
        public static let dtlRecord = Kind(rawValue: 9)
    }

    public static func encode<T: Encodable>(_ value: T, kind: Kind) throws(VDError) -> ByteBuffer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        encoder.dateEncodingStrategy = .iso8601
        let json: Data
        do { json = try encoder.encode(value) } catch {
            throw VDError(.invalidArgument, "cannot encode metadata: \(error)")
        }
        var b = ByteBuffer.zeroes(headerBytes)
        b.setBytes(magic, at: 0)
        b.setLE(version, at: 8)
        b.setLE(kind.rawValue, at: 10)
        b.setLE(UInt32(json.count), at: 12)
        b.setLE(CRC32C.checksum(json), at: 16)
        b.setLE(b.crc32c(0, 20), at: 20)
        b.writeBytes(json)
        return b
    }

    public static func decode<T: Decodable>(
        _ type: T.Type, from b: ByteBuffer, kind: Kind, what: String
    ) throws(VDError)
        -> T
    {
        guard b.readableBytes >= headerBytes, b.hasMagic(magic) else {
            throw .corrupt("\(what): not a VolumeDriver metadata record (bad magic)")
        }
        guard b.getLE(UInt32.self, at: 20) == b.crc32c(0, 20) else {
            throw .corrupt("\(what): record header checksum mismatch")
        }
        let version = b.getLE(UInt16.self, at: 8)
        guard version == MetadataRecord.version else {
            throw .corrupt("\(what): unsupported record version \(version)")
        }
        guard b.getLE(UInt16.self, at: 10) == kind.rawValue else {
            throw .corrupt("\(what): record kind \(b.getLE(UInt16.self, at: 10)), expected \(kind.rawValue)")
        }
        let length = Int(b.getLE(UInt32.self, at: 12))
        guard b.readableBytes == headerBytes + length else {
            throw .corrupt("\(what): record is \(b.readableBytes) bytes, its header says \(headerBytes + length)")
        }
        guard b.getLE(UInt32.self, at: 16) == b.crc32c(headerBytes, headerBytes + length) else {
            throw .corrupt("\(what): record payload checksum mismatch")
        }
        let json = Data(b.readableBytesView.dropFirst(headerBytes))
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do { return try decoder.decode(T.self, from: json) } catch {
            throw .corrupt("\(what): record does not decode: \(error)")
        }
    }
}
