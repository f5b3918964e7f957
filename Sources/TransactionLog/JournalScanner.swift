// Reads an SCO journal back: the SCO header, then chained batches, verifying every header and every payload CRC.
// The scan stops at the first batch that does not verify: that is the torn tail after a crash (or the end of a
// sealed SCO, marked by the SEALED flag). What it returns is the longest valid prefix; nothing after it is used.

package import FlashIO
import NIOCore
package import VolumeCore

/// One verified batch of a journal.
package struct ScannedBatch: Sendable {
    package var offset: UInt64
    package var header: BatchHeader
    /// CRC stored in this batch's header (the chain value for the next batch).
    package var storedCRC: UInt32
    /// Offset of the first payload cluster.
    package var payloadOffset: UInt64 { offset + UInt64(SCOFormat.blockBytes) }
}

/// The valid prefix of an SCO journal.
package struct JournalScan: Sendable {
    package var header: SCOHeader
    package var batches: [ScannedBatch]
    /// Bytes of the valid prefix (the SCO's length once sealed).
    package var validLength: UInt64
    /// Chain value after the last valid batch (what the next batch must carry).
    package var chainCRC: UInt32
    /// The last valid batch carries the SEALED flag.
    package var isSealed: Bool
    /// CRC32C of the bytes `[0, validLength)`.
    package var contentCRC: UInt32

    /// The TLog records describing this SCO: every write and unmap in order, then the SCO-sealed record.
    package func tlogRecords() -> [TLogRecord] {
        var records: [TLogRecord] = []
        let clusterBytes = UInt64(header.clusterSizeBytes)
        for batch in batches {
            var payload = batch.payloadOffset
            for entry in batch.header.entries {
                switch entry {
                case .data(let address, let crc):
                    records.append(
                        .write(
                            address: address,
                            location: ClusterLocation(sco: header.sco, offset: UInt32(payload), crc: crc)))
                    payload += clusterBytes
                case .unmap(let address, let count):
                    records.append(.unmap(address: address, count: count))
                case .rollback(let epoch):
                    records.append(.rollback(toEpoch: epoch))
                case .scrubApplied(let id):
                    records.append(.scrubApplied(resultID: id))
                case .snapshot(let id):
                    records.append(.snapshot(snapshotID: id))
                }
            }
        }
        records.append(.scoSealed(sco: header.sco, lengthBytes: validLength, crc: contentCRC))
        return records
    }
}

package enum JournalScanner {
    /// Scans the journal in `file`. The SCO header must name this volume, SCO and cluster size (else `.corrupt`:
    /// the file is not this volume's SCO). With `startOffset` > 0 the scan starts at that batch boundary expecting
    /// `startChain` (and `contentCRC` then covers only the header and the scanned batches).
    ///
    /// With `verifyPayloads` false only batch headers are read: payload CRCs are taken from the headers and
    /// `contentCRC` is derived from them by CRC combination. Use that only for a journal this process wrote and
    /// synced (sealing); recovery must verify payloads, since a torn batch can have a valid header.
    package static func scan(
        file: FlashFile, volumeID: VolumeID, sco: SCONumber, clusterSizeBytes: UInt32, startOffset: UInt64 = 0,
        startChain: UInt32 = 0, verifyPayloads: Bool = true
    ) throws(VDError) -> JournalScan {
        let fileLength = try file.size()
        let what = file.path
        guard fileLength >= UInt64(SCOFormat.blockBytes) else {
            throw .corrupt("\(what): shorter than an SCO header (\(fileLength) bytes)")
        }
        let headerBytes = try file.readExactly(SCOFormat.blockBytes, at: 0)
        let headerBuffer = ByteBuffer(bytes: headerBytes)
        let header = try SCOHeader.decode(headerBuffer, what: what)
        guard header.volumeID == volumeID, header.sco == sco, header.clusterSizeBytes == clusterSizeBytes else {
            throw .corrupt(
                "\(what): SCO header names volume \(header.volumeID) SCO \(header.sco) cluster size \(header.clusterSizeBytes); expected \(volumeID) \(sco) \(clusterSizeBytes)"
            )
        }
        var contentCRC = CRC32C.checksum(headerBytes)
        var chain = BatchHeader.storedCRC(of: headerBuffer)
        var offset = UInt64(SCOFormat.blockBytes)
        if startOffset > offset {
            offset = startOffset
            chain = startChain
        }
        var batches: [ScannedBatch] = []
        var sealed = false
        let clusterBytes = Int(clusterSizeBytes)
        var block = [UInt8](repeating: 0, count: SCOFormat.blockBytes)
        var payload: [UInt8] = []
        scanning: while !sealed && offset + UInt64(SCOFormat.blockBytes) <= fileLength {
            let n = try VDError.catching { try block.withUnsafeMutableBytes { try file.read(into: $0, at: offset) } }
            guard n == SCOFormat.blockBytes else { break }
            let blockBuffer = ByteBuffer(bytes: block)
            guard
                let batch = BatchHeader.decode(
                    blockBuffer, volumeID: volumeID, sco: sco, offset: offset, previousCRC: chain)
            else { break }
            let payloadBytes = batch.payloadClusters * clusterBytes
            let payloadStart = offset + UInt64(SCOFormat.blockBytes)
            guard payloadStart + UInt64(payloadBytes) <= fileLength else { break }
            if !verifyPayloads {
                let stored = BatchHeader.storedCRC(of: blockBuffer)
                contentCRC = CRC32C.combine(contentCRC, CRC32C.checksum(block), lengthB: UInt64(SCOFormat.blockBytes))
                for entry in batch.entries {
                    if case .data(_, let crc) = entry {
                        contentCRC = CRC32C.combine(contentCRC, crc, lengthB: UInt64(clusterBytes))
                    }
                }
                batches.append(ScannedBatch(offset: offset, header: batch, storedCRC: stored))
                chain = stored
                offset = payloadStart + UInt64(payloadBytes)
                sealed = batch.isSealed
                continue
            }
            if payload.count < payloadBytes { payload = [UInt8](repeating: 0, count: payloadBytes) }
            if payloadBytes > 0 {
                let got = try VDError.catching {
                    try payload.withUnsafeMutableBytes {
                        try file.read(
                            into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<payloadBytes]), at: payloadStart)
                    }
                }
                guard got == payloadBytes else { break }
            }
            // Every payload must match its entry's CRC, or the batch is torn.
            var index = 0
            for entry in batch.entries {
                guard case .data(_, let crc) = entry else { continue }
                let actual = payload.withUnsafeBytes {
                    CRC32C.checksum(
                        UnsafeRawBufferPointer(rebasing: $0[(index * clusterBytes)..<((index + 1) * clusterBytes)]))
                }
                if actual != crc { break scanning }
                index += 1
            }
            let stored = BatchHeader.storedCRC(of: blockBuffer)
            contentCRC = CRC32C.checksum(block, seed: contentCRC)
            if payloadBytes > 0 {
                contentCRC = payload.withUnsafeBytes {
                    CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<payloadBytes]), seed: contentCRC)
                }
            }
            batches.append(ScannedBatch(offset: offset, header: batch, storedCRC: stored))
            chain = stored
            offset = payloadStart + UInt64(payloadBytes)
            sealed = batch.isSealed
        }
        return JournalScan(
            header: header, batches: batches, validLength: offset, chainCRC: chain, isSealed: sealed,
            contentCRC: contentCRC)
    }
}
