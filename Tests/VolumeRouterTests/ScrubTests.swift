import FlashIO
import Foundation
import Logging
import NIOCore
import ObjectStore
import Scrubber
import Testing
import VolumeCore

@testable import VolumeRouter

/// The scrubber and the router's application of its results, end to end on the engine.
@Suite struct ScrubTests {
    static let size = 8 << 20

    func fill(_ h: VolumeHarness, seed: UInt64) async throws -> [UInt8] {
        var bytes = [UInt8]()
        for chunk in 0..<(Self.size >> 20) {
            let data = pattern(1 << 20, seed: seed &* 100 &+ UInt64(chunk))
            try await h.volume.write(offset: UInt64(chunk) << 20, data: data, fua: false)
            bytes += data.readableBytesView
        }
        return bytes
    }

    func contents(_ h: VolumeHarness, atEpoch epoch: UInt64? = nil) async throws -> [UInt8] {
        let data: ByteBuffer
        if let epoch {
            data = try await h.volume.read(offset: 0, length: UInt32(Self.size), atEpoch: epoch)
        } else {
            data = try await h.volume.read(offset: 0, length: UInt32(Self.size))
        }
        return Array(data.readableBytesView)
    }

    func scrub(_ store: any ObjectStore, threshold: Double = 0.5) async throws -> ScrubSummary {
        var options = ScrubOptions()
        options.liveFractionThreshold = threshold
        options.scoSizeBytes = 2 << 20
        return try await Scrubber(
            volume: try VolumeName(validating: "vol1"), backend: store, options: options, env: .live(pool: .singleton),
            logger: Logger(label: "scrub")
        ).run()
    }

    @Test func scrubReclaimsGarbageAndKeepsEverythingReadable() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store) {
            $0.scrubDeleteGraceSeconds = 0
            $0.scrubPollSeconds = 3600
        }
        defer { Task { await h.shutdown() } }
        func applyAndFinish() async throws {
            await h.volume.scrubPass()
            try await h.waitUntilStored()
            await h.volume.scrubPass()
        }
        func backendSCOBytes() async throws -> UInt64 {
            var total: UInt64 = 0
            for name in store.allNames where name.contains("/sco/") {
                total += UInt64(try await store.get(name).readableBytes)
            }
            return total
        }
        _ = try await fill(h, seed: 1)
        _ = try await h.volume.createSnapshot(named: "s1")
        let second = try await fill(h, seed: 2)
        _ = try await h.volume.createSnapshot(named: "s2")
        // Every other 512 KiB again: half of `second` stays live only through s2.
        var current = second
        for half in stride(from: 0, to: Self.size >> 19, by: 2) {
            let data = pattern(512 << 10, seed: 300 + UInt64(half))
            try await h.volume.write(offset: UInt64(half) << 19, data: data, fua: false)
            current.replaceSubrange((half << 19)..<((half + 1) << 19), with: data.readableBytesView)
        }
        let s3 = try await h.volume.createSnapshot(named: "s3")
        // Round 1: s1 goes; the first fill is all garbage (overwritten before s2).
        try h.volume.deleteSnapshot(named: "s1")
        // What is referenced: the volume now (8 MiB) and what only s2 still reads (the half overwritten after it).
        #expect(try h.volume.space().referencedBytes == UInt64(Self.size + Self.size / 2))
        try await h.volume.journal.submit(.roll)
        try await h.waitUntilStored()
        let stored1 = try await backendSCOBytes()
        let first = try await scrub(store)
        #expect(first.rewrittenSCOs >= Self.size >> 20, "\(first)")
        try await applyAndFinish()
        let reclaimed1 = stored1 - (try await backendSCOBytes())
        let ratio1 = Double(reclaimed1) / Double(Self.size)
        #expect(ratio1 > 0.9 && ratio1 < 1.2, "round 1 reclaimed \(reclaimed1) bytes for \(Self.size) bytes of garbage")
        #expect(try await contents(h) == current)
        // Round 2: s2 goes; half of the second fill is garbage, the other half is live and must be copied.
        try h.volume.deleteSnapshot(named: "s2")
        try await h.volume.journal.submit(.roll)
        try await h.waitUntilStored()
        let stored2 = try await backendSCOBytes()
        let second2 = try await scrub(store, threshold: 0.75)
        #expect(second2.copiedBytes >= UInt64(Self.size / 4), "\(second2)")
        try await applyAndFinish()
        let reclaimed2 = stored2 - (try await backendSCOBytes())
        let ratio2 = Double(reclaimed2) / Double(Self.size / 2)
        #expect(
            ratio2 > 0.8 && ratio2 < 1.2, "round 2 reclaimed \(reclaimed2) bytes for \(Self.size / 2) bytes of garbage")
        #expect(store.allNames.contains { $0.hasSuffix(".applied") })
        #expect(try await contents(h) == current)
        #expect(try await contents(h, atEpoch: s3.epoch) == current)
        // Scrubbing again finds nothing substantial.
        let again = try await scrub(store)
        #expect(again.copiedBytes == 0 && again.sourceBytes < 1 << 20, "\(again)")
        // Restart from the backend alone: the relocations replay.
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        #expect(try await contents(h) == current)
        #expect(try await contents(h, atEpoch: s3.epoch) == current)
    }

    @Test func writesThatRaceWithAScrubWin() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store) {
            $0.scrubDeleteGraceSeconds = 0
            $0.scrubPollSeconds = 3600
        }
        defer { Task { await h.shutdown() } }
        _ = try await fill(h, seed: 1)
        var current = try await fill(h, seed: 2)
        // Make half of each SCO dead so the scrub copies the other half.
        for chunk in stride(from: 0, to: Self.size >> 20, by: 2) {
            try await h.volume.trim(offset: UInt64(chunk) << 20, length: 1 << 20, fua: false)
            current.replaceSubrange((chunk << 20)..<((chunk + 1) << 20), with: repeatElement(0, count: 1 << 20))
        }
        try await h.volume.journal.submit(.roll)
        try await h.waitUntilStored()
        let summary = try await scrub(store, threshold: 0.99)
        #expect(summary.copiedBytes > 0)
        // A write lands after the scrub read the old data and before the router applies the result.
        let late = pattern(1 << 20, seed: 999)
        try await h.volume.write(offset: 1 << 20, data: late, fua: false)
        current.replaceSubrange((1 << 20)..<(2 << 20), with: late.readableBytesView)
        await h.volume.scrubPass()
        try await h.waitUntilStored()
        await h.volume.scrubPass()
        #expect(try await contents(h) == current)
    }

    @Test func aSecondScrubberIsRefusedWhileTheLeaseIsHeld() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: 1 << 20, backend: store)
        defer { Task { await h.shutdown() } }
        let layout = VolumeLayout(flashDirectory: "", namespace: "vol1")
        let lease = try await ScrubLease.acquire(
            layout: layout, backend: store, seconds: 60, env: .live(pool: .singleton))
        do {
            _ = try await scrub(store)
            Issue.record("a second scrubber ran")
        } catch let error as VDError {
            #expect(error.code == .busy)
            #expect(error.message.contains("being scrubbed by vd scrub (pid"))
        }
        await lease.release(backend: store)
        _ = try await scrub(store)
    }

    /// A scrub result made from a history that is not a prefix of the volume's (as when the scrubber replayed TLogs
    /// of an owner that was fenced meanwhile) is removed, never applied: its sources stay and everything reads.
    @Test func aResultFromAnotherHistoryIsRemovedNotApplied() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store) {
            $0.scrubDeleteGraceSeconds = 0
            $0.scrubPollSeconds = 3600
        }
        defer { Task { await h.shutdown() } }
        _ = try await fill(h, seed: 1)
        let current = try await fill(h, seed: 2)
        try await h.volume.journal.submit(.roll)
        try await h.waitUntilStored()
        let summary = try await scrub(store)
        let id = try #require(summary.resultID)
        let layout = h.volume.layout
        var result = try MetadataRecord.decode(
            ScrubResult.self, from: try await store.get(layout.scrubResultObject(id)), kind: .scrubResult,
            what: "result")
        #expect(result.historyEpoch != nil && result.historyTag == nil, "the scrub records the history it replayed")
        // Its last TLog named with a generation the volume's chain does not give that epoch.
        result.historyTag = 7
        try await store.replace(
            layout.scrubResultObject(id), data: try MetadataRecord.encode(result, kind: .scrubResult))
        let scos = Set(store.allNames.filter { $0.contains("/sco/") })
        await h.volume.scrubPass()
        try await h.waitUntilStored()
        await h.volume.scrubPass()
        #expect(try await store.head(layout.scrubResultObject(id)) == nil, "the result is removed")
        #expect(try await store.head(layout.scrubAppliedObject(id)) == nil, "and never marked applied")
        for source in result.sources {
            #expect(scos.contains(layout.scoObject(SCONumber(source))))
            #expect(try await store.head(layout.scoObject(SCONumber(source))) != nil, "its sources stay")
        }
        #expect(try await contents(h) == current)
        // A scrub of the volume's own history is applied as usual (once the first run's lease is released: the
        // scrubber releases it in the background as it ends).
        for _ in 0..<200 where try await store.head(layout.scrubLeaseObject) != nil {
            try await Task.sleep(for: .milliseconds(50))
        }
        let again = try await scrub(store)
        #expect(again.resultID != nil)
        await h.volume.scrubPass()
        try await h.waitUntilStored()
        await h.volume.scrubPass()
        #expect(try await store.head(layout.scrubAppliedObject(again.resultID!)) != nil)
        #expect(try await contents(h) == current)
    }
}
