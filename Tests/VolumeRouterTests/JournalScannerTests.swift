import FlashIO
import Foundation
import NIOCore
import Testing
import TransactionLog
import VolumeCore

/// The journal format on its own: chained batches, torn tails, stale data, and the two scan modes agreeing.
@Suite struct JournalScannerTests {
    let volumeID = VolumeID.random()
    let sco = SCONumber(7)

    /// Writes a journal of `batches` batches (each with `perBatch` data clusters and one unmap) and returns the file.
    func makeJournal(at path: String, batches: Int, perBatch: Int, sealed: Bool) throws -> (FlashFile, [UInt64]) {
        let file = try FlashFile(path: path, options: [.create, .truncate])
        let header = SCOHeader(volumeID: volumeID, sco: sco, clusterSizeBytes: 4096, epoch: sco.rawValue).encode()
        try header.withUnsafeReadableBytes { try file.write($0, at: 0) }
        var chain = BatchHeader.storedCRC(of: header)
        var offset = UInt64(SCOFormat.blockBytes)
        var ends: [UInt64] = []
        for b in 0..<batches {
            var entries: [BatchEntry] = []
            var payload: [UInt8] = []
            for c in 0..<perBatch {
                let cluster = [UInt8](repeating: UInt8(truncatingIfNeeded: b * 31 + c + 1), count: 4096)
                entries.append(.data(address: UInt64(b * 100 + c), crc: CRC32C.checksum(cluster)))
                payload += cluster
            }
            entries.append(.unmap(address: 5000, count: 3))
            let batch = BatchHeader(volumeID: volumeID, sco: sco, offset: offset, previousCRC: chain, entries: entries)
            let encoded = batch.encode()
            try encoded.withUnsafeReadableBytes { try file.write($0, at: offset) }
            try file.write(payload, at: offset + 4096)
            chain = BatchHeader.storedCRC(of: encoded)
            offset += 4096 + UInt64(payload.count)
            ends.append(offset)
        }
        if sealed {
            let marker = BatchHeader(
                volumeID: volumeID, sco: sco, offset: offset, previousCRC: chain, flags: BatchHeader.flagSealed, entries: [])
            try marker.encode().withUnsafeReadableBytes { try file.write($0, at: offset) }
            ends.append(offset + 4096)
        }
        return (file, ends)
    }

    func tempPath() -> String { NSTemporaryDirectory() + "vd-journal-" + UUID().uuidString }

    @Test func fullAndHeaderOnlyScansAgree() throws {
        let path = tempPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (file, ends) = try makeJournal(at: path, batches: 5, perBatch: 3, sealed: true)
        let full = try JournalScanner.scan(file: file, volumeID: volumeID, sco: sco, clusterSizeBytes: 4096)
        let quick = try JournalScanner.scan(
            file: file, volumeID: volumeID, sco: sco, clusterSizeBytes: 4096, verifyPayloads: false)
        #expect(full.isSealed && quick.isSealed)
        #expect(full.validLength == ends.last!)
        #expect(quick.validLength == full.validLength)
        #expect(quick.contentCRC == full.contentCRC)
        #expect(quick.tlogRecords() == full.tlogRecords())
        // The content CRC is the CRC of the file's first validLength bytes.
        let bytes = try file.readExactly(Int(full.validLength), at: 0)
        #expect(full.contentCRC == CRC32C.checksum(bytes))
    }

    @Test func tornPayloadEndsTheValidPrefix() throws {
        let path = tempPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (file, ends) = try makeJournal(at: path, batches: 4, perBatch: 2, sealed: false)
        // Flip one byte in the third batch's second payload.
        let flipAt = ends[1] + 4096 + 4096 + 17
        var byte = try file.readExactly(1, at: flipAt)
        byte[0] ^= 0x40
        try file.write(byte, at: flipAt)
        let scan = try JournalScanner.scan(file: file, volumeID: volumeID, sco: sco, clusterSizeBytes: 4096)
        #expect(scan.batches.count == 2)
        #expect(scan.validLength == ends[1])
        #expect(!scan.isSealed)
    }

    @Test func staleBatchBeyondARewriteDoesNotChain() throws {
        let path = tempPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (file, ends) = try makeJournal(at: path, batches: 3, perBatch: 1, sealed: false)
        // Rewrite batch 2 (same offset, same size) with different content: batch 3 still verifies on its own but
        // chains to the old batch 2, so it must not be accepted.
        let scan0 = try JournalScanner.scan(file: file, volumeID: volumeID, sco: sco, clusterSizeBytes: 4096)
        #expect(scan0.batches.count == 3)
        let cluster = [UInt8](repeating: 0xEE, count: 4096)
        let rewrite = BatchHeader(
            volumeID: volumeID, sco: sco, offset: ends[0], previousCRC: scan0.batches[0].storedCRC,
            entries: [.data(address: 999, crc: CRC32C.checksum(cluster))])
        try rewrite.encode().withUnsafeReadableBytes { try file.write($0, at: ends[0]) }
        try file.write(cluster, at: ends[0] + 4096)
        let scan = try JournalScanner.scan(file: file, volumeID: volumeID, sco: sco, clusterSizeBytes: 4096)
        #expect(scan.batches.count == 2)
        #expect(scan.batches[1].header.entries == [.data(address: 999, crc: CRC32C.checksum(cluster))])
    }

    @Test func anotherVolumesJournalIsRejected() throws {
        let path = tempPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (file, _) = try makeJournal(at: path, batches: 1, perBatch: 1, sealed: true)
        #expect(throws: VDError.self) {
            _ = try JournalScanner.scan(file: file, volumeID: VolumeID.random(), sco: sco, clusterSizeBytes: 4096)
        }
    }
}
