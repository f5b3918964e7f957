import FlashIO
import Foundation
import NIOCore
import ObjectStore
import SnappyCodec
import Testing
import VolumeTesting
import VolumeCore
@testable import VolumeRouter

@Suite struct VolumeTests {
    @Test func unwrittenSpaceReadsAsZeroes() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        let data = try await h.volume.read(offset: 12345, length: 100_000)
        #expect(data.readableBytes == 100_000)
        #expect(data.readableBytesView.allSatisfy { $0 == 0 })
    }

    @Test func alignedAndUnalignedWritesReadBack() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        var model = [UInt8](repeating: 0, count: 1 << 20)
        let writes: [(UInt64, Int)] = [(0, 4096), (4096 * 3, 8192), (100, 50), (5000, 10000), (4095, 2), (65536 - 10, 30)]
        for (index, (offset, length)) in writes.enumerated() {
            let data = pattern(length, seed: UInt64(index))
            try await h.volume.write(offset: offset, data: data, fua: false)
            model.replaceSubrange(Int(offset)..<(Int(offset) + length), with: data.readableBytesView)
        }
        let all = try await h.volume.read(offset: 0, length: 1 << 20)
        #expect(Array(all.readableBytesView) == model)
        let middle = try await h.volume.read(offset: 4000, length: 3000)
        #expect(Array(middle.readableBytesView) == Array(model[4000..<7000]))
    }

    @Test func outOfRangeRequestsFailAndChangeNothing() async throws {
        let h = try await VolumeHarness(sizeBytes: 1 << 20)
        defer { Task { await h.shutdown() } }
        await #expect(throws: VDError.self) {
            try await h.volume.write(offset: (1 << 20) - 10, data: pattern(20, seed: 1), fua: false)
        }
        await #expect(throws: VDError.self) { _ = try await h.volume.read(offset: 1 << 20, length: 1) }
        do {
            _ = try await h.volume.read(offset: (1 << 20) - 1, length: 2)
            Issue.record("expected out-of-range")
        } catch {
            #expect(error.code == .outOfRange)
        }
        let tail = try await h.volume.read(offset: (1 << 20) - 4096, length: 4096)
        #expect(tail.readableBytesView.allSatisfy { $0 == 0 })
    }

    @Test func trimAndWriteZeroesUnmap() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        try await h.volume.write(offset: 0, data: pattern(64 * 1024, seed: 7), fua: false)
        // Trim whole clusters 1..3; partial edges are left alone by trim.
        try await h.volume.trim(offset: 4096 + 100, length: 4 * 4096, fua: false)
        let afterTrim = try await h.volume.read(offset: 0, length: 64 * 1024)
        let original = pattern(64 * 1024, seed: 7)
        #expect(Array(afterTrim.readableBytesView[0..<8192]).allSatisfy { _ in true })
        #expect(afterTrim.getSlice(at: 0, length: 4096 + 100) == original.getSlice(at: 0, length: 4096 + 100))
        #expect(afterTrim.readableBytesView[(2 * 4096)..<(5 * 4096)].allSatisfy { $0 == 0 })
        // Write zeroes over an unaligned range zeroes exactly that range.
        try await h.volume.writeZeroes(offset: 10 * 4096 + 7, length: 3 * 4096, fua: true, mayUnmap: true)
        let afterZero = try await h.volume.read(offset: 0, length: 64 * 1024)
        #expect(afterZero.readableBytesView[(10 * 4096 + 7)..<(13 * 4096 + 7)].allSatisfy { $0 == 0 })
        #expect(afterZero.getSlice(at: 10 * 4096, length: 7) == original.getSlice(at: 10 * 4096, length: 7))
        #expect(afterZero.getSlice(at: 13 * 4096 + 7, length: 100) == original.getSlice(at: 13 * 4096 + 7, length: 100))
        let extents = try await h.volume.allocation(offset: 0, length: 64 * 1024)
        #expect(extents.reduce(0) { $0 + $1.lengthBytes } == 64 * 1024)
        #expect(extents.contains { $0.isHole })
    }

    @Test func sparseReadsReportHolesThatAgreeWithAllocationAndReadAsZeroes() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        try await h.volume.write(offset: 0, data: pattern(64 * 1024, seed: 3), fua: false)
        try await h.volume.trim(offset: 3 * 4096, length: 2 * 4096, fua: false)
        try await h.volume.write(offset: 100 * 4096 + 17, data: pattern(5000, seed: 4), fua: false)
        var generator = SeededGenerator(seed: 99)
        for _ in 0..<50 {
            let offset = generator.next() % (120 * 4096)
            let length = UInt32(1 + generator.next() % (40 * 4096))
            try await checkSparse(h.volume, offset: offset, length: length)
        }
        // A whole unwritten cluster is one hole; a written one none.
        #expect(try await h.volume.readSparse(offset: 50 * 4096, length: 4096).holes == [0..<4096])
        #expect(try await h.volume.readSparse(offset: 0, length: 4096).holes.isEmpty)
        #expect(try await h.volume.readSparse(offset: 0, length: 8 * 4096).holes == [(3 * 4096)..<(5 * 4096)])
    }

    @Test func dataSurvivesCleanRestart() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        let data = pattern(3 << 20, seed: 42)
        try await h.volume.write(offset: 1 << 20, data: data, fua: false)
        try await h.restart()
        let back = try await h.volume.read(offset: 1 << 20, length: 3 << 20)
        #expect(back == data)
    }

    @Test func sealedSCOsReachTheBackendAndRestoreWithoutFlash() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: 32 << 20, backend: store)
        defer { Task { await h.shutdown() } }
        var model = [UInt8](repeating: 0, count: 32 << 20)
        for i in 0..<40 {
            let offset = UInt64((i * 7919 % 8000) * 4096)
            let data = pattern(16384, seed: UInt64(i))
            try await h.volume.write(offset: offset, data: data, fua: false)
            model.replaceSubrange(Int(offset)..<(Int(offset) + 16384), with: data.readableBytesView)
        }
        try await h.volume.write(offset: 0, data: pattern(5 << 20, seed: 99), fua: false)
        model.replaceSubrange(0..<(5 << 20), with: pattern(5 << 20, seed: 99).readableBytesView)
        // Drain: everything sealed and uploaded.
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        let tlogs = store.allNames.filter { $0.hasPrefix("vol1/tlog/") }
        let scos = store.allNames.filter { $0.hasPrefix("vol1/sco/") }
        #expect(tlogs.count >= 5)
        #expect(tlogs.count == scos.count)
        // Lose the local flash entirely.
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        let back = try await h.volume.read(offset: 0, length: 32 << 20)
        #expect(Array(back.readableBytesView) == model)
        // And it keeps working: new writes after the restore.
        try await h.volume.write(offset: 4096, data: pattern(4096, seed: 5), fua: true)
        let again = try await h.volume.read(offset: 4096, length: 4096)
        #expect(again == pattern(4096, seed: 5))
    }

    @Test func evictedSCOsAreReadFromTheBackendAndCorruptionIsReported() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: 16 << 20, backend: store, cacheCapacityBytes: 2 << 20)
        defer { Task { await h.shutdown() } }
        let data = pattern(8 << 20, seed: 3)
        try await h.volume.write(offset: 0, data: data, fua: false)
        try await h.volume.journal.submit(.roll)
        try await h.waitUntilStored()
        #expect(h.cache.statistics.evictedCount > 0)
        let back = try await h.volume.read(offset: 0, length: 8 << 20)
        #expect(back == data)
        // Flip a byte in an evicted SCO on the backend: the read must fail, naming the object.
        let firstSCO = store.allNames.first { $0.hasPrefix("vol1/sco/") }!
        var object = try await store.get(firstSCO)
        let flipAt = 4096 * 2 + 100
        object.setInteger(object.getInteger(at: flipAt, as: UInt8.self)! ^ 0xFF, at: flipAt)
        store.overwriteForTesting(firstSCO, data: object)
        do {
            _ = try await h.volume.read(offset: 0, length: 1 << 20)
            Issue.record("a corrupted object was returned as data")
        } catch {
            #expect(error.code == .corrupt)
            #expect(error.message.contains(firstSCO))
        }
    }

    @Test func concurrentWritersMatchAModel() async throws {
        let h = try await VolumeHarness(sizeBytes: 8 << 20, scoSizeBytes: 1 << 20)
        defer { Task { await h.shutdown() } }
        let clusters = (8 << 20) / 4096
        // Each task owns a disjoint set of clusters (overlapping in-flight writes have no defined order).
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    var generator = SeededGenerator(seed: UInt64(worker))
                    for round in 0..<60 {
                        let cluster = Int(generator.next() % UInt64(clusters / 8)) * 8 + worker
                        let seed = UInt64(worker * 1000 + round)
                        try await h.volume.write(offset: UInt64(cluster * 4096), data: pattern(4096, seed: seed), fua: round % 10 == 0)
                    }
                }
            }
            try await group.waitForAll()
        }
        // Rebuild the model deterministically: last write per cluster wins.
        var expected: [Int: UInt64] = [:]
        for worker in 0..<8 {
            var generator = SeededGenerator(seed: UInt64(worker))
            for round in 0..<60 {
                let cluster = Int(generator.next() % UInt64(clusters / 8)) * 8 + worker
                expected[cluster] = UInt64(worker * 1000 + round)
            }
        }
        try await h.restart()
        for (cluster, seed) in expected {
            let back = try await h.volume.read(offset: UInt64(cluster * 4096), length: 4096)
            #expect(back == pattern(4096, seed: seed), "cluster \(cluster)")
        }
    }

    @Test func concurrentPartialWritesToOneClusterBothLand() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for sector in 0..<8 {
                group.addTask {
                    try await h.volume.write(
                        offset: UInt64(sector * 512), data: ByteBuffer(repeating: UInt8(sector + 1), count: 512), fua: false)
                }
            }
            try await group.waitForAll()
        }
        let back = try await h.volume.read(offset: 0, length: 4096)
        for sector in 0..<8 {
            #expect(back.readableBytesView[(sector * 512)..<((sector + 1) * 512)].allSatisfy { $0 == UInt8(sector + 1) })
        }
    }
}

@Suite struct CompressionTests {
    @Test func compressedSCORoundTripsAnyAlignedRange() throws {
        // A fake SCO: compressible blocks, incompressible blocks, zero blocks.
        var sco = ByteBuffer()
        var generator = SeededGenerator(seed: 9)
        for block in 0..<64 {
            switch block % 3 {
            case 0: sco.writeRepeatingByte(UInt8(block), count: 4096)
            case 1: sco.writeBytes((0..<4096).map { _ in UInt8.random(in: 0...255, using: &generator) })
            default: sco.writeBytes((0..<4096).map { UInt8(truncatingIfNeeded: $0 / 16) })
            }
        }
        let id = VolumeID.random()
        let object = CompressedSCO.compress(sco, volumeID: id, number: SCONumber(3), originalCRC: CRC32C.checksum(sco))
        #expect(object.readableBytes < sco.readableBytes)
        let header = try CompressedSCOHeader.decode(object, what: "test")
        #expect(header.originalLength == UInt64(sco.readableBytes))
        let index = object.getSlice(at: Int(header.indexOffset), length: header.indexBytes)!
        let offsets = try CompressedSCO.decodeIndex(index, header: header, what: "test")
        for (start, count) in [(0, 1), (5, 3), (63, 1), (0, 64), (17, 20)] {
            let range = UInt64(start * 4096)..<UInt64((start + count) * 4096)
            let objectRange = CompressedSCO.objectRange(of: range, offsets: offsets)
            let part = object.getSlice(at: Int(objectRange.lowerBound), length: objectRange.count)!
            let plain = try CompressedSCO.decompress(part, range: range, offsets: offsets, what: "test")
            #expect(plain == sco.getSlice(at: Int(range.lowerBound), length: range.count)!)
        }
        // A damaged index is refused.
        var bad = index
        bad.setInteger(UInt8(0xFF), at: 3)
        #expect(throws: VDError.self) { _ = try CompressedSCO.decodeIndex(bad, header: header, what: "test") }
    }

    @Test func compressedUploadsServeReadsAfterFlashLoss() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: 16 << 20, backend: store) { $0.compressUploads = true }
        defer { Task { await h.shutdown() } }
        // Half compressible, half random.
        try await h.volume.write(offset: 0, data: ByteBuffer(repeating: 0x5A, count: 2 << 20), fua: false)
        try await h.volume.write(offset: 2 << 20, data: pattern(2 << 20, seed: 77), fua: false)
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        let scoBytes = store.allNames.filter { $0.hasPrefix("vol1/sco/") }
        var stored = 0
        for name in scoBytes { stored += try await store.get(name).readableBytes }
        #expect(stored < 4 << 20, "compressed SCOs take \(stored) bytes for 4 MiB of data")
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        let back = try await h.volume.read(offset: 0, length: 4 << 20)
        #expect(back.getSlice(at: 0, length: 2 << 20) == ByteBuffer(repeating: 0x5A, count: 2 << 20))
        #expect(back.getSlice(at: 2 << 20, length: 2 << 20) == pattern(2 << 20, seed: 77))
        // The reads warmed the flash cache: a second read needs no backend.
        #expect(h.cache.statistics.footprintBytes > 0)
    }
}

@Suite struct BackendOutageTests {
    /// With the backend refusing every upload: writes keep landing on flash up to the pending bound, then wait;
    /// flush still works (local durability); when the backend returns, uploads resume, the waiting writes finish,
    /// and the backend alone restores every acknowledged write.
    @Test func writesWaitAtTheBoundAndResumeWhenTheBackendReturns() async throws {
        let memory = MemoryStore()
        let faulty = FaultyObjectStore(wrapping: memory)
        let h = try await VolumeHarness(sizeBytes: 64 << 20, scoSizeBytes: 1 << 20, backend: faulty) {
            $0.uploadPendingBytesMax = 8 << 20
        }
        defer { Task { await h.shutdown() } }
        faulty.failRandomly(probability: 1, with: VDError(.backend, "HTTP 503 SlowDown"), on: [.put])
        // Below the bound: writes and flushes complete although nothing reaches the backend.
        for i in 0..<5 {
            try await h.volume.write(offset: UInt64(i) << 20, data: pattern(1 << 20, seed: UInt64(i)), fua: false)
        }
        try await h.volume.flush()
        #expect(memory.allNames.filter { $0.contains("/tlog/") }.isEmpty)
        // Past the bound: a write waits.
        let blocked = Task {
            for i in 5..<16 {
                try await h.volume.write(offset: UInt64(i) << 20, data: pattern(1 << 20, seed: UInt64(i)), fua: false)
            }
        }
        // Writes proceed until the bound, then stop there.
        let deadline = Date().addingTimeInterval(60)
        while h.volume.uploadStatus.unstoredBytes < 7 << 20 && Date() < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(h.volume.uploadStatus.unstoredBytes >= 7 << 20)
        #expect(h.volume.uploadStatus.lastError != nil)
        try await Task.sleep(for: .milliseconds(500))
        // One more request may have passed the check just before the bound was reached.
        #expect(h.volume.uploadStatus.unstoredBytes <= (8 << 20) + (1 << 20) + 3 * 4096, "writes did not stop at the bound")
        // The backend comes back.
        faulty.clearFaults()
        try await blocked.value
        try await h.volume.flush()
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        for i in 0..<16 {
            let back = try await h.volume.read(offset: UInt64(i) << 20, length: 1 << 20)
            #expect(back == pattern(1 << 20, seed: UInt64(i)), "MiB \(i)")
        }
    }
}

@Suite struct ZeroAheadTests {
    /// Slow writes (the zeroer runs ahead of them) across several rolls: the zeroer never zeroes written data, and
    /// nothing it writes ever reaches a sealed SCO.
    @Test func zeroingAheadNeverTouchesWrittenData() async throws {
        let h = try await VolumeHarness(sizeBytes: 8 << 20, scoSizeBytes: 1 << 20)
        defer { Task { await h.shutdown() } }
        var expected: [Int: UInt64] = [:]
        for i in 0..<300 {
            let cluster = (i * 37) % 2048
            try await h.volume.write(offset: UInt64(cluster * 4096), data: pattern(4096, seed: UInt64(i)), fua: i % 3 == 0)
            expected[cluster] = UInt64(i)
            if i % 10 == 0 { try await Task.sleep(for: .milliseconds(15)) }
        }
        for (cluster, seed) in expected {
            #expect(try await h.volume.read(offset: UInt64(cluster * 4096), length: 4096) == pattern(4096, seed: seed))
        }
        try await h.restart(drain: true)
        for (cluster, seed) in expected {
            #expect(try await h.volume.read(offset: UInt64(cluster * 4096), length: 4096) == pattern(4096, seed: seed))
        }
        // Sealed SCOs on the backend are exactly their recorded length (nothing appended after sealing).
        let store = h.backend as! MemoryStore
        // Each TLog names its epoch's SCO (SCO numbers and epochs are separate sequences: not paired by number).
        let tlogs = store.allNames.filter { $0.contains("/tlog/") }
        #expect(!tlogs.isEmpty)
        for name in tlogs {
            let tlog = try TLog.decode(try await store.get(name), what: name)
            guard case .scoSealed(let sco, let length, let crc)? = tlog.records.last else {
                Issue.record("TLog \(name) without a sealed record")
                continue
            }
            let object = try await store.get(h.volume.layout.scoObject(sco))
            #expect(UInt64(object.readableBytes) == length)
            #expect(CRC32C.checksum(object) == crc)
        }
    }
}

@Suite struct MultiConnectionFlushTests {
    /// CAN_MULTI_CONN's promise at the engine level: a flush from any client makes durable every write any client
    /// had completed, because it syncs up to the write generation current when it starts.
    @Test func aFlushCoversWritesCompletedOnOtherConnections() async throws {
        let h = try await VolumeHarness()
        defer { Task { await h.shutdown() } }
        let writer = Task { try await h.volume.write(offset: 0, data: pattern(8192, seed: 1), fua: false) }
        try await writer.value
        let written = h.volume.journal.writtenGeneration
        let flusher = Task { try await h.volume.flush() }
        try await flusher.value
        #expect(h.volume.flusher.syncedGeneration >= written)
        #expect(h.volume.journal.shared.withLock { $0.unsyncedFiles.isEmpty })
    }
}

/// Checks one sparse read against a plain read and the allocation map: same bytes, holes read as zeroes, and the hole
/// bytes are exactly the ones allocation reports as holes.
func checkSparse(_ device: some BlockDevice, offset: UInt64, length: UInt32) async throws {
    let sparse = try await device.readSparse(offset: offset, length: length)
    let plain = try await device.read(offset: offset, length: length)
    #expect(sparse.data == plain)
    var previousEnd = -1
    for hole in sparse.holes {
        #expect(hole.lowerBound > previousEnd && hole.upperBound <= Int(length), "holes ascending, disjoint, inside")
        previousEnd = hole.upperBound
        #expect(plain.readableBytesView[(plain.readerIndex + hole.lowerBound)..<(plain.readerIndex + hole.upperBound)]
            .allSatisfy { $0 == 0 })
    }
    var holeBytes: [Bool] = Array(repeating: false, count: Int(length))
    for hole in sparse.holes { for i in hole { holeBytes[i] = true } }
    var expected: [Bool] = []
    var position = offset
    while position < offset + UInt64(length) {
        let extents = try await device.allocation(offset: position, length: UInt32(offset + UInt64(length) - position))
        for extent in extents {
            let take = Int(min(extent.lengthBytes, offset + UInt64(length) - position))
            expected += Array(repeating: extent.isHole && extent.isZero, count: take)
            position += UInt64(take)
        }
    }
    #expect(holeBytes == expected, "holes of [\(offset), +\(length)) disagree with allocation")
}
