// The TLog (transaction log) object of one epoch: the compact, ordered list of what the epoch did to the volume's
// map. Its number is the epoch (epochs are contiguous from 1); the SCO holding the epoch's data is named by its
// `scoSealed` record (SCO numbers are unique but need not equal the epoch). TLogs are what a restart from the backend replays; together they are the volume's history and the source of
// truth from which the RocksDB map can always be rebuilt. Layout (little-endian):
//
//   header (64 B): magic "VDTLOG01", version, record size, volume id, TLog number, cluster size, CRC of the header
//   records (32 B each): kind, aux, a, b, c, CRC of the record
//   end record: record count, bytes before it, CRC of every byte before it
//
// A TLog is written whole (temporary file, fsync, rename) and uploaded only after the SCOs it references are on the
// backend; readers verify the header, every record and the end record before using any of it.

public import NIOCore

/// One record of a TLog.
public enum TLogRecord: Sendable, Hashable {
    /// Cluster `address` now lives at `location`.
    case write(address: ClusterAddress, location: ClusterLocation)
    /// `count` clusters from `address` now read as zeroes.
    case unmap(address: ClusterAddress, count: UInt32)
    /// SCO `sco` is complete: `lengthBytes` long with CRC32C `crc` over all of it.
    case scoSealed(sco: SCONumber, lengthBytes: UInt64, crc: UInt32)
    /// A snapshot was taken after everything before this record: `snapshotID` refers to the volume's snapshot table.
    case snapshot(snapshotID: UInt64)
    /// The volume's content became what it was at the end of epoch `toEpoch`.
    case rollback(toEpoch: UInt64)
    /// The relocations of scrub result `resultID` took effect here.
    case scrubApplied(resultID: UInt64)

    static let writeKind: UInt8 = 1
    static let unmapKind: UInt8 = 2
    static let sealedKind: UInt8 = 3
    static let snapshotKind: UInt8 = 4
    static let rollbackKind: UInt8 = 5
    static let scrubAppliedKind: UInt8 = 6
    static let endKind: UInt8 = 0xFF
}

public struct TLog: Sendable, Hashable {
    public static let headerBytes = 64
    public static let recordBytes = 32
    public static let version: UInt16 = 1
    static let magic: [UInt8] = Array("VDTLOG01".utf8)

    public var volumeID: VolumeID
    public var number: SCONumber
    public var clusterSizeBytes: UInt32
    public var records: [TLogRecord]

    public init(volumeID: VolumeID, number: SCONumber, clusterSizeBytes: UInt32, records: [TLogRecord]) {
        self.volumeID = volumeID
        self.number = number
        self.clusterSizeBytes = clusterSizeBytes
        self.records = records
    }

    public var encodedBytes: Int { TLog.headerBytes + (records.count + 1) * TLog.recordBytes }

    public func encode() -> ByteBuffer {
        var b = ByteBuffer.zeroes(encodedBytes)
        b.setBytes(TLog.magic, at: 0)
        b.setLE(TLog.version, at: 8)
        b.setLE(UInt32(TLog.recordBytes), at: 12)
        b.setLE(volumeID.high, at: 16)
        b.setLE(volumeID.low, at: 24)
        b.setLE(number.rawValue, at: 32)
        b.setLE(clusterSizeBytes, at: 40)
        b.setLE(UInt32(records.count), at: 44)
        b.setLE(b.crc32c(0, 60), at: 60)
        var position = TLog.headerBytes
        for record in records {
            switch record {
            case .write(let address, let location):
                b.setLE(TLogRecord.writeKind, at: position)
                b.setLE(location.offset, at: position + 4)
                b.setLE(address, at: position + 8)
                b.setLE(location.sco.rawValue, at: position + 16)
                b.setLE(location.crc, at: position + 24)
            case .unmap(let address, let count):
                b.setLE(TLogRecord.unmapKind, at: position)
                b.setLE(count, at: position + 4)
                b.setLE(address, at: position + 8)
            case .scoSealed(let sco, let length, let crc):
                b.setLE(TLogRecord.sealedKind, at: position)
                b.setLE(sco.rawValue, at: position + 8)
                b.setLE(length, at: position + 16)
                b.setLE(crc, at: position + 24)
            case .snapshot(let id):
                b.setLE(TLogRecord.snapshotKind, at: position)
                b.setLE(id, at: position + 8)
            case .rollback(let epoch):
                b.setLE(TLogRecord.rollbackKind, at: position)
                b.setLE(epoch, at: position + 8)
            case .scrubApplied(let id):
                b.setLE(TLogRecord.scrubAppliedKind, at: position)
                b.setLE(id, at: position + 8)
            }
            b.setLE(b.crc32c(position, position + 28), at: position + 28)
            position += TLog.recordBytes
        }
        b.setLE(TLogRecord.endKind, at: position)
        b.setLE(UInt32(records.count), at: position + 4)
        b.setLE(UInt64(position), at: position + 8)
        b.setLE(b.crc32c(0, position), at: position + 24)
        b.setLE(b.crc32c(position, position + 28), at: position + 28)
        return b
    }

    /// Decodes and verifies a whole TLog; `what` names the file or object in errors. Any mismatch is `.corrupt`.
    public static func decode(_ b: ByteBuffer, what: String) throws(VDError) -> TLog {
        guard b.readableBytes >= headerBytes + recordBytes, b.hasMagic(magic) else {
            throw .corrupt("\(what): not a TLog (bad magic or too short: \(b.readableBytes) bytes)")
        }
        let version = b.getLE(UInt16.self, at: 8)
        guard version == TLog.version else { throw .corrupt("\(what): unsupported TLog version \(version)") }
        guard b.getLE(UInt32.self, at: 60) == b.crc32c(0, 60) else { throw .corrupt("\(what): TLog header checksum mismatch") }
        guard b.getLE(UInt32.self, at: 12) == UInt32(recordBytes) else { throw .corrupt("\(what): bad TLog record size") }
        let count = Int(b.getLE(UInt32.self, at: 44))
        let expected = headerBytes + (count + 1) * recordBytes
        guard b.readableBytes == expected else {
            throw .corrupt("\(what): TLog is \(b.readableBytes) bytes, its header says \(expected) (truncated?)")
        }
        var records: [TLogRecord] = []
        records.reserveCapacity(count)
        var position = headerBytes
        for index in 0..<count {
            guard b.getLE(UInt32.self, at: position + 28) == b.crc32c(position, position + 28) else {
                throw .corrupt("\(what): TLog record \(index) checksum mismatch")
            }
            switch b.getLE(UInt8.self, at: position) {
            case TLogRecord.writeKind:
                records.append(
                    .write(
                        address: b.getLE(UInt64.self, at: position + 8),
                        location: ClusterLocation(
                            sco: SCONumber(b.getLE(UInt64.self, at: position + 16)),
                            offset: b.getLE(UInt32.self, at: position + 4),
                            crc: b.getLE(UInt32.self, at: position + 24))))
            case TLogRecord.unmapKind:
                records.append(
                    .unmap(address: b.getLE(UInt64.self, at: position + 8), count: b.getLE(UInt32.self, at: position + 4)))
            case TLogRecord.sealedKind:
                records.append(
                    .scoSealed(
                        sco: SCONumber(b.getLE(UInt64.self, at: position + 8)),
                        lengthBytes: b.getLE(UInt64.self, at: position + 16), crc: b.getLE(UInt32.self, at: position + 24)))
            case TLogRecord.snapshotKind:
                records.append(.snapshot(snapshotID: b.getLE(UInt64.self, at: position + 8)))
            case TLogRecord.rollbackKind:
                records.append(.rollback(toEpoch: b.getLE(UInt64.self, at: position + 8)))
            case TLogRecord.scrubAppliedKind:
                records.append(.scrubApplied(resultID: b.getLE(UInt64.self, at: position + 8)))
            case let kind:
                throw .corrupt("\(what): TLog record \(index) has unknown kind \(kind)")
            }
            position += recordBytes
        }
        guard b.getLE(UInt8.self, at: position) == TLogRecord.endKind,
            b.getLE(UInt32.self, at: position + 28) == b.crc32c(position, position + 28),
            b.getLE(UInt32.self, at: position + 4) == UInt32(count),
            b.getLE(UInt64.self, at: position + 8) == UInt64(position),
            b.getLE(UInt32.self, at: position + 24) == b.crc32c(0, position)
        else { throw .corrupt("\(what): TLog end record missing or checksum mismatch") }
        return TLog(
            volumeID: VolumeID(high: b.getLE(UInt64.self, at: 16), low: b.getLE(UInt64.self, at: 24)),
            number: SCONumber(b.getLE(UInt64.self, at: 32)), clusterSizeBytes: b.getLE(UInt32.self, at: 40),
            records: records)
    }
}
