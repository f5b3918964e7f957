// Every on-disk and on-object record: it round-trips, and any flipped byte is rejected (magic, version and CRC are
// checked before use).

import NIOCore
import Testing
import VolumeCore

@Suite struct RecordTests {
    static let volume = VolumeID(high: 0x0123_4567_89ab_cdef, low: 42)

    /// Every single-byte corruption of `bytes` must make `decodes` fail (return false).
    func everyFlipIsRejected(_ bytes: ByteBuffer, stride: Int = 1, _ decodes: (ByteBuffer) -> Bool) {
        #expect(decodes(bytes), "the intact record decodes")
        var index = 0
        while index < bytes.readableBytes {
            var corrupt = bytes
            let byte = corrupt.getInteger(at: corrupt.readerIndex + index, as: UInt8.self)!
            corrupt.setInteger(byte ^ 0x5a, at: corrupt.readerIndex + index)
            #expect(!decodes(corrupt), "a flipped byte at \(index) went unnoticed")
            index += stride
        }
    }

    @Test func scoHeaderRoundTripsAndRejectsCorruption() throws {
        let header = SCOHeader(volumeID: Self.volume, sco: SCONumber(7), clusterSizeBytes: 4096, epoch: 5)
        let decoded = try SCOHeader.decode(header.encode(), what: "test")
        #expect(decoded == header)
        everyFlipIsRejected(header.encode(), stride: 7) { (try? SCOHeader.decode($0, what: "test")) != nil }
    }

    @Test func batchHeaderRoundTripsChainsAndRejectsCorruption() {
        let entries: [BatchEntry] = [
            .data(address: 5, crc: 0xdead_beef), .unmap(address: 100, count: 16), .rollback(toEpoch: 3),
            .data(address: 6, crc: 1),
        ]
        let header = BatchHeader(
            volumeID: Self.volume, sco: SCONumber(9), offset: 8192, previousCRC: 0x1234, flags: BatchHeader.flagSealed,
            entries: entries)
        let bytes = header.encode()
        let decoded = BatchHeader.decode(
            bytes, volumeID: Self.volume, sco: SCONumber(9), offset: 8192, previousCRC: 0x1234)
        #expect(decoded?.entries == entries)
        #expect(decoded?.isSealed == true)
        #expect(decoded?.payloadClusters == 2)
        // Wrong place in the chain, wrong SCO, wrong offset, another volume: not a header of this journal.
        #expect(BatchHeader.decode(bytes, volumeID: Self.volume, sco: SCONumber(9), offset: 8192, previousCRC: 1) == nil)
        #expect(BatchHeader.decode(bytes, volumeID: Self.volume, sco: SCONumber(8), offset: 8192, previousCRC: 0x1234) == nil)
        #expect(BatchHeader.decode(bytes, volumeID: Self.volume, sco: SCONumber(9), offset: 4096, previousCRC: 0x1234) == nil)
        #expect(
            BatchHeader.decode(
                bytes, volumeID: VolumeID(high: 1, low: 2), sco: SCONumber(9), offset: 8192, previousCRC: 0x1234) == nil)
        everyFlipIsRejected(bytes, stride: 13) {
            BatchHeader.decode($0, volumeID: Self.volume, sco: SCONumber(9), offset: 8192, previousCRC: 0x1234) != nil
        }
    }

    @Test func tlogRoundTripsAndRejectsCorruptionAndTruncation() throws {
        let records: [TLogRecord] = [
            .write(address: 1, location: ClusterLocation(sco: SCONumber(3), offset: 8192, crc: 77)),
            .unmap(address: 10, count: 5), .scoSealed(sco: SCONumber(3), lengthBytes: 1 << 20, crc: 99),
            .snapshot(snapshotID: 4), .rollback(toEpoch: 2), .scrubApplied(resultID: 11),
        ]
        let tlog = TLog(volumeID: Self.volume, number: SCONumber(3), clusterSizeBytes: 4096, records: records)
        let bytes = tlog.encode()
        #expect(try TLog.decode(bytes, what: "test") == tlog)
        everyFlipIsRejected(bytes, stride: 3) { (try? TLog.decode($0, what: "test")) != nil }
        // A TLog cut anywhere is rejected, not read as a shorter history.
        for length in Swift.stride(from: 0, to: bytes.readableBytes, by: 16) {
            #expect((try? TLog.decode(bytes.getSlice(at: 0, length: length)!, what: "test")) == nil)
        }
    }

    @Test func metadataRecordRoundTripsAndChecksKind() throws {
        struct Payload: Codable, Equatable { var name: String; var size: UInt64 }
        let payload = Payload(name: "vol1", size: 20 << 30)
        let bytes = try MetadataRecord.encode(payload, kind: .volumeConfig)
        #expect(try MetadataRecord.decode(Payload.self, from: bytes, kind: .volumeConfig, what: "test") == payload)
        #expect(throws: VDError.self) {
            _ = try MetadataRecord.decode(Payload.self, from: bytes, kind: .snapshotTable, what: "test")
        }
        everyFlipIsRejected(bytes) {
            (try? MetadataRecord.decode(Payload.self, from: $0, kind: .volumeConfig, what: "test")) == payload
        }
    }
}
