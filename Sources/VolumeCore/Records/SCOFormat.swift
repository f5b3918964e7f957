// The SCO (storage container object) format. An SCO is the local write journal of one epoch and, once sealed, an
// immutable object on the backend. An SCO's number names it and is never reused; the epoch it holds is in its header
// (epochs are contiguous, SCO numbers need not be: a journal that never became part of the history leaves its number
// unused for ever). Layout (little-endian):
//
//   [SCO header block, 4096 B] [batch] [batch] ... [batch with the SEALED flag]
//   batch = [batch header block, 4096 B] [payload cluster] * payloadClusters
//
// Each batch header lists up to `BatchHeader.entriesMax` entries: a data entry names the cluster address and the
// CRC32C of one payload cluster (payloads follow the header in entry order); an unmap entry names a run of clusters
// that now read as zeroes. Payloads start on 4096-byte boundaries so sealed SCOs can be read with O_DIRECT.
//
// Torn tails: a batch counts only if its header verifies (magic, version, CRC, SCO number, volume, own offset, and
// the CRC of the previous header, which chains the batches) and every payload CRC matches. Recovery keeps the longest valid prefix. The file after the prefix may hold anything
// (zeroes, an older SCO's bytes in a recycled file, a torn batch): the checks above reject all of it.

public import NIOCore

public enum SCOFormat {
    /// Size of the SCO header block and of every batch header block.
    public static let blockBytes = 4096
    /// Version of batch headers.
    public static let version: UInt16 = 1
    /// Version of the SCO header: 2 adds the epoch (version 1 headers hold epoch = SCO number).
    public static let headerVersion: UInt16 = 2
    static let scoMagic: [UInt8] = Array("VDSCOHDR".utf8)
    static let batchMagic: [UInt8] = Array("VDBATCH1".utf8)
}

/// The first block of every SCO.
public struct SCOHeader: Sendable, Hashable {
    public var volumeID: VolumeID
    public var sco: SCONumber
    public var clusterSizeBytes: UInt32
    /// The epoch whose journal this SCO is (0 for SCOs a scrub wrote: they belong to no epoch).
    public var epoch: UInt64

    public init(volumeID: VolumeID, sco: SCONumber, clusterSizeBytes: UInt32, epoch: UInt64) {
        self.volumeID = volumeID
        self.sco = sco
        self.clusterSizeBytes = clusterSizeBytes
        self.epoch = epoch
    }

    public func encode() -> ByteBuffer {
        var b = ByteBuffer.zeroes(SCOFormat.blockBytes)
        b.setBytes(SCOFormat.scoMagic, at: 0)
        b.setLE(SCOFormat.headerVersion, at: 8)
        b.setLE(UInt32(SCOFormat.blockBytes), at: 12)
        b.setLE(volumeID.high, at: 16)
        b.setLE(volumeID.low, at: 24)
        b.setLE(sco.rawValue, at: 32)
        b.setLE(clusterSizeBytes, at: 40)
        b.setLE(epoch, at: 48)
        b.setLE(b.crc32c(0, SCOFormat.blockBytes - 4), at: SCOFormat.blockBytes - 4)
        return b
    }

    /// Decodes and verifies a header block; `what` names the file or object in errors.
    public static func decode(_ b: ByteBuffer, what: String) throws(VDError) -> SCOHeader {
        guard b.readableBytes >= SCOFormat.blockBytes, b.hasMagic(SCOFormat.scoMagic) else {
            throw .corrupt("\(what): not an SCO (bad magic)")
        }
        let version = b.getLE(UInt16.self, at: 8)
        guard version == 1 || version == SCOFormat.headerVersion else {
            throw .corrupt("\(what): unsupported SCO version \(version)")
        }
        guard b.getLE(UInt32.self, at: SCOFormat.blockBytes - 4) == b.crc32c(0, SCOFormat.blockBytes - 4) else {
            throw .corrupt("\(what): SCO header checksum mismatch")
        }
        let sco = SCONumber(b.getLE(UInt64.self, at: 32))
        return SCOHeader(
            volumeID: VolumeID(high: b.getLE(UInt64.self, at: 16), low: b.getLE(UInt64.self, at: 24)), sco: sco,
            clusterSizeBytes: b.getLE(UInt32.self, at: 40),
            epoch: version == 1 ? sco.rawValue : b.getLE(UInt64.self, at: 48))
    }
}

/// One entry of a batch header.
public enum BatchEntry: Sendable, Hashable {
    /// One cluster payload follows in the batch; `crc` is its CRC32C.
    case data(address: ClusterAddress, crc: UInt32)
    /// `count` clusters from `address` now read as zeroes.
    case unmap(address: ClusterAddress, count: UInt32)
    /// The volume's content becomes what it was at the end of epoch `toEpoch` (a snapshot).
    case rollback(toEpoch: UInt64)
    /// The relocations of scrub result `resultID` take effect here.
    case scrubApplied(resultID: UInt64)
    /// Snapshot `snapshotID` (of the volume's snapshot table) is taken at the end of this epoch.
    case snapshot(snapshotID: UInt64)

    static let dataKind: UInt32 = 1
    static let unmapKind: UInt32 = 2
    static let rollbackKind: UInt32 = 3
    static let scrubAppliedKind: UInt32 = 4
    static let snapshotKind: UInt32 = 5
    static let entryBytes = 16
}

/// A batch header block.
public struct BatchHeader: Sendable, Hashable {
    public static let flagSealed: UInt16 = 1
    /// How many entries fit in one header block.
    public static let entriesMax = (SCOFormat.blockBytes - 48 - 4) / BatchEntry.entryBytes

    public var volumeID: VolumeID
    public var sco: SCONumber
    /// Byte offset of this header in the SCO (so a block copied or left elsewhere never verifies).
    public var offset: UInt64
    public var flags: UInt16
    /// The stored CRC of the previous batch header (of the SCO header for the first batch).
    public var previousCRC: UInt32
    public var entries: [BatchEntry]

    public init(
        volumeID: VolumeID, sco: SCONumber, offset: UInt64, previousCRC: UInt32, flags: UInt16 = 0,
        entries: [BatchEntry]
    ) {
        precondition(entries.count <= BatchHeader.entriesMax, "too many entries for one batch header")
        self.volumeID = volumeID
        self.sco = sco
        self.offset = offset
        self.previousCRC = previousCRC
        self.flags = flags
        self.entries = entries
    }

    public var isSealed: Bool { flags & BatchHeader.flagSealed != 0 }

    /// Number of payload clusters following the header.
    public var payloadClusters: Int {
        entries.reduce(0) { count, entry in
            if case .data = entry { return count + 1 }
            return count
        }
    }

    public func encode() -> ByteBuffer {
        var b = ByteBuffer.zeroes(SCOFormat.blockBytes)
        encode(into: &b)
        return b
    }

    /// Writes the header into the first 4096 readable bytes of `b` (which must be zeroed).
    public func encode(into b: inout ByteBuffer) {
        b.setBytes(SCOFormat.batchMagic, at: b.readerIndex)
        b.setLE(SCOFormat.version, at: 8)
        b.setLE(UInt16(entries.count), at: 10)
        b.setLE(UInt32(payloadClusters), at: 12)
        b.setLE(sco.rawValue, at: 16)
        b.setLE(offset, at: 24)
        b.setLE(volumeID.high ^ volumeID.low, at: 32)
        b.setLE(flags, at: 40)
        b.setLE(previousCRC, at: 44)
        var position = 48
        for entry in entries {
            switch entry {
            case .data(let address, let crc):
                b.setLE(address, at: position)
                b.setLE(crc, at: position + 8)
                b.setLE(BatchEntry.dataKind, at: position + 12)
            case .unmap(let address, let count):
                b.setLE(address, at: position)
                b.setLE(count, at: position + 8)
                b.setLE(BatchEntry.unmapKind, at: position + 12)
            case .rollback(let epoch):
                b.setLE(epoch, at: position)
                b.setLE(BatchEntry.rollbackKind, at: position + 12)
            case .scrubApplied(let id):
                b.setLE(id, at: position)
                b.setLE(BatchEntry.scrubAppliedKind, at: position + 12)
            case .snapshot(let id):
                b.setLE(id, at: position)
                b.setLE(BatchEntry.snapshotKind, at: position + 12)
            }
            position += BatchEntry.entryBytes
        }
        b.setLE(b.crc32c(0, SCOFormat.blockBytes - 4), at: SCOFormat.blockBytes - 4)
    }

    /// The CRC stored in an encoded header block (what the next batch chains to).
    public static func storedCRC(of b: ByteBuffer) -> UInt32 { b.getLE(UInt32.self, at: SCOFormat.blockBytes - 4) }

    /// Decodes a header block, or returns nil when it is not a valid batch header for this SCO at this offset
    /// following a header whose CRC is `previousCRC` (the end of the valid prefix of a journal).
    public static func decode(
        _ b: ByteBuffer, volumeID: VolumeID, sco: SCONumber, offset: UInt64, previousCRC: UInt32
    ) -> BatchHeader? {
        guard b.readableBytes >= SCOFormat.blockBytes, b.hasMagic(SCOFormat.batchMagic) else { return nil }
        guard b.getLE(UInt16.self, at: 8) == SCOFormat.version,
            b.getLE(UInt32.self, at: SCOFormat.blockBytes - 4) == b.crc32c(0, SCOFormat.blockBytes - 4),
            b.getLE(UInt64.self, at: 16) == sco.rawValue,
            b.getLE(UInt64.self, at: 24) == offset,
            b.getLE(UInt64.self, at: 32) == volumeID.high ^ volumeID.low,
            b.getLE(UInt32.self, at: 44) == previousCRC
        else { return nil }
        let count = Int(b.getLE(UInt16.self, at: 10))
        guard count <= entriesMax else { return nil }
        var entries: [BatchEntry] = []
        entries.reserveCapacity(count)
        var position = 48
        for _ in 0..<count {
            let address = b.getLE(UInt64.self, at: position)
            let value = b.getLE(UInt32.self, at: position + 8)
            switch b.getLE(UInt32.self, at: position + 12) {
            case BatchEntry.dataKind: entries.append(.data(address: address, crc: value))
            case BatchEntry.unmapKind: entries.append(.unmap(address: address, count: value))
            case BatchEntry.rollbackKind: entries.append(.rollback(toEpoch: address))
            case BatchEntry.scrubAppliedKind: entries.append(.scrubApplied(resultID: address))
            case BatchEntry.snapshotKind: entries.append(.snapshot(snapshotID: address))
            default: return nil
            }
            position += BatchEntry.entryBytes
        }
        let header = BatchHeader(
            volumeID: volumeID, sco: sco, offset: offset, previousCRC: previousCRC, flags: b.getLE(UInt16.self, at: 40),
            entries: entries)
        guard header.payloadClusters == Int(b.getLE(UInt32.self, at: 12)) else { return nil }
        return header
    }
}
