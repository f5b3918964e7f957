// The incremental backup stream (`vd snapshot export-diff`, `vd volume import-diff`): the changed extents between two
// versions of a volume, with the data of each. Little-endian, every part checksummed (CRC32C):
//
//   header   "VDDIFF01" | version u16 | reserved u16 | info length u32 | info (JSON, DiffStreamInfo) | CRC u32 of all
//            the header bytes before it
//   records  32 bytes each: kind u8 (1 data, 2 zero, 3 end) | 3 reserved | payload CRC u32 | offset u64 |
//            length u64 | chain u32 (the header CRC of the previous record; the stream header's CRC for the first) |
//            CRC u32 of the 28 bytes before it; a data record is followed by `length` bytes of payload
//   end      kind 3: offset = number of records before it, length = payload bytes in them
//
// The chain and the end record make a truncated, reordered or spliced stream fail verification, not apply a part.

public import FoundationEssentials

/// What a diff stream holds: the source volume and the two versions it spans.
public struct DiffStreamInfo: Codable, Sendable, Hashable {
    public var volume: String
    public var volumeID: String
    public var sizeBytes: UInt64
    public var clusterSizeBytes: UInt32
    /// The older version: a snapshot name, `PARENT@SNAPSHOT` for a clone's base, or nil (a full copy).
    public var from: String?
    /// The newer version: a snapshot name.
    public var to: String
    public var createdAt: Date

    public init(
        volume: String, volumeID: String, sizeBytes: UInt64, clusterSizeBytes: UInt32, from: String?, to: String,
        createdAt: Date = Date()
    ) {
        self.volume = volume
        self.volumeID = volumeID
        self.sizeBytes = sizeBytes
        self.clusterSizeBytes = clusterSizeBytes
        self.from = from
        self.to = to
        self.createdAt = createdAt
    }
}

public enum DiffStream {
    public static let magic: [UInt8] = Array("VDDIFF01".utf8)
    public static let version: UInt16 = 1
    public static let recordBytes = 32
    /// Largest payload of one data record (extents are split).
    public static let payloadBytesMax = 4 << 20
    /// Bound on the header's JSON.
    public static let infoBytesMax = 64 << 10

    public enum Kind: UInt8, Sendable {
        case data = 1
        case zero = 2
        case end = 3
    }

    public struct Record: Sendable, Hashable {
        public var kind: Kind
        public var offset: UInt64
        public var length: UInt64
        public var payloadCRC: UInt32
        public init(kind: Kind, offset: UInt64, length: UInt64, payloadCRC: UInt32 = 0) {
            self.kind = kind
            self.offset = offset
            self.length = length
            self.payloadCRC = payloadCRC
        }
    }

    /// The header bytes, and the CRC the first record chains to.
    public static func encodeHeader(_ info: DiffStreamInfo) throws(VDError) -> (bytes: [UInt8], crc: UInt32) {
        let json: [UInt8]
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            encoder.dateEncodingStrategy = .iso8601
            json = Array(try encoder.encode(info))
        } catch {
            throw VDError(.invalidArgument, "cannot encode the diff stream header: \(error)")
        }
        var bytes = magic
        bytes.appendLE(version)
        bytes.appendLE(UInt16(0))
        bytes.appendLE(UInt32(json.count))
        bytes += json
        let crc = CRC32C.checksum(bytes)
        bytes.appendLE(crc)
        return (bytes, crc)
    }

    /// The fixed part of the header (magic, version, info length): how many more bytes the header has.
    public static let fixedHeaderBytes = 16

    /// Parses the header from its first bytes: nil while `bytes` is too short (the count needed is returned).
    public static func decodeHeader(_ bytes: [UInt8], what: String) throws(VDError) -> (
        info: DiffStreamInfo, crc: UInt32, length: Int
    )? {
        guard bytes.count >= fixedHeaderBytes else { return nil }
        guard Array(bytes[0..<8]) == magic else { throw .corrupt("\(what): not a VolumeDriver diff stream (bad magic)") }
        let version = bytes.loadLE(UInt16.self, at: 8)
        guard version == Self.version else { throw .corrupt("\(what): unsupported diff stream version \(version)") }
        let infoLength = Int(bytes.loadLE(UInt32.self, at: 12))
        guard infoLength <= infoBytesMax else { throw .corrupt("\(what): diff stream header of \(infoLength) bytes") }
        let total = fixedHeaderBytes + infoLength + 4
        guard bytes.count >= total else { return nil }
        let crc = bytes.loadLE(UInt32.self, at: total - 4)
        guard CRC32C.checksum(Array(bytes[0..<(total - 4)])) == crc else {
            throw .corrupt("\(what): diff stream header checksum mismatch")
        }
        do {
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let info = try decoder.decode(
                DiffStreamInfo.self, from: Data(bytes[fixedHeaderBytes..<(fixedHeaderBytes + infoLength)]))
            return (info, crc, total)
        } catch {
            throw .corrupt("\(what): diff stream header does not decode: \(error)")
        }
    }

    /// A record's 32 bytes; returns them and the CRC the next record chains to.
    public static func encodeRecord(_ record: Record, chain: UInt32) -> (bytes: [UInt8], crc: UInt32) {
        var bytes: [UInt8] = [record.kind.rawValue, 0, 0, 0]
        bytes.appendLE(record.payloadCRC)
        bytes.appendLE(record.offset)
        bytes.appendLE(record.length)
        bytes.appendLE(chain)
        let crc = CRC32C.checksum(bytes)
        bytes.appendLE(crc)
        return (bytes, crc)
    }

    /// Verifies a record header (its CRC and its place in the chain); returns it and the next chain value.
    public static func decodeRecord(_ bytes: [UInt8], chain: UInt32, what: String) throws(VDError) -> (
        record: Record, crc: UInt32
    ) {
        precondition(bytes.count == recordBytes, "a diff record is \(recordBytes) bytes")
        let crc = bytes.loadLE(UInt32.self, at: 28)
        guard CRC32C.checksum(Array(bytes[0..<28])) == crc else {
            throw .corrupt("\(what): record checksum mismatch (damaged or truncated stream)")
        }
        guard bytes.loadLE(UInt32.self, at: 24) == chain else {
            throw .corrupt("\(what): record out of sequence (records missing, reordered or from another stream)")
        }
        guard let kind = Kind(rawValue: bytes[0]) else { throw .corrupt("\(what): unknown record kind \(bytes[0])") }
        let record = Record(
            kind: kind, offset: bytes.loadLE(UInt64.self, at: 8), length: bytes.loadLE(UInt64.self, at: 16),
            payloadCRC: bytes.loadLE(UInt32.self, at: 4))
        return (record, crc)
    }
}

extension [UInt8] {
    fileprivate mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    fileprivate func loadLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}
