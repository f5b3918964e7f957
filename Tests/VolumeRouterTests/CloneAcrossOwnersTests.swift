import FlashIO
import Foundation
import Logging
import NIOCore
import ObjectStore
import SCOCache
import Scrubber
import Testing
import VolumeCore

@testable import VolumeRouter

/// A clone whose parent another router owns reads the parent's snapshot from the backend alone
/// (`BackendParentView`), and keeps reading it right while the owner scrubs the snapshot's SCOs away.
@Suite struct CloneAcrossOwnersTests {
    static let cluster = 4096
    static let size = 8 << 20

    /// The parent, owned "elsewhere" (its own harness and flash), with a snapshot s1 whose SCOs are half garbage:
    /// clusters 0..<256 hold `seed 1`, 256..<512 were written and overwritten before s1 (dead), and after s1 the
    /// parent overwrites 0..<128 (the snapshot still reads seed 1 there).
    static func parentWithSnapshot(_ store: MemoryStore) async throws -> (VolumeHarness, SnapshotRecord) {
        let parent = try await VolumeHarness(sizeBytes: UInt64(size), scoSizeBytes: 1 << 20, backend: store) {
            $0.scrubDeleteGraceSeconds = 0
            $0.scrubPollSeconds = 3600
        }
        for i in 0..<512 {
            // Interleaved so every SCO holds live and dead clusters alike.
            let address = i % 2 == 0 ? i / 2 : 256 + i / 2
            try await parent.volume.write(
                offset: UInt64(address * cluster), data: pattern(cluster, seed: 1000 + UInt64(address)), fua: false)
        }
        for address in 256..<512 {
            try await parent.volume.write(
                offset: UInt64(address * cluster), data: pattern(cluster, seed: 9000 + UInt64(address)), fua: false)
        }
        let snapshot = try await parent.volume.createSnapshot(named: "s1")
        for address in 0..<128 {
            try await parent.volume.write(
                offset: UInt64(address * cluster), data: pattern(cluster, seed: 5000 + UInt64(address)), fua: false)
        }
        try await parent.volume.journal.submit(.roll)
        try await parent.waitUntilStored()
        return (parent, snapshot)
    }

    static func scrub(_ store: any ObjectStore) async throws -> ScrubSummary {
        var options = ScrubOptions()
        options.liveFractionThreshold = 0.9
        options.scoSizeBytes = 2 << 20
        return try await Scrubber(
            volume: try VolumeName(validating: "vol1"), backend: store, options: options, env: .live(pool: .singleton),
            logger: Logger(label: "scrub")
        ).run()
    }

    /// What the clone must read: seed 1 below 256 (from s1) except its own writes at 64..<80 (seed 7), zeroes
    /// elsewhere (256..<512 were overwritten before s1 with seed 9000: s1 reads those).
    static func expected(_ address: Int) -> ByteBuffer {
        if (64..<80).contains(address) { return pattern(cluster, seed: 7000 + UInt64(address)) }
        if address < 256 { return pattern(cluster, seed: 1000 + UInt64(address)) }
        if address < 512 { return pattern(cluster, seed: 9000 + UInt64(address)) }
        return ByteBuffer.zeroes(cluster)
    }

    static func verify(_ clone: Volume, _ comment: Comment) async throws {
        var wrong: [Int] = []
        for address in 0..<600 {
            let got = try await clone.read(offset: UInt64(address * cluster), length: UInt32(cluster))
            if got != expected(address) { wrong.append(address) }
        }
        #expect(wrong.isEmpty, "\(comment): \(wrong.count) wrong clusters, first \(wrong.prefix(5))")
    }

    @Test func aCloneReadsItsParentFromTheBackendThroughTheOwnersScrub() async throws {
        let store = MemoryStore()
        let (parent, snapshot) = try await Self.parentWithSnapshot(store)
        defer { Task { await parent.shutdown() } }
        let root = NSTemporaryDirectory() + "vd-clone-view-" + UUID().uuidString
        defer { try? Syscall.removeTree(root) }
        let cache = FlashCache(capacityBytes: 1 << 30, aio: nil, logger: Logger(label: "test"))
        let link = VolumeConfig.Parent(volume: parent.config.name, snapshot: "s1", epoch: snapshot.epoch)
        let view = try await BackendParentView.load(
            name: parent.config.name, snapshot: "s1", epoch: snapshot.epoch, backend: store, cache: cache,
            workDirectory: root + "/views", options: parent.options, env: parent.env, logger: Logger(label: "test")
        ) { (_) async throws(VDError) -> any CloneParentSource in throw VDError(.notFound, "no grandparent") }
        #expect(view.snapshotTable.snapshot(named: "s1")?.epoch == snapshot.epoch)

        // The clone, on its own flash, with its own namespace on the same backend.
        let config = VolumeConfig(
            name: try VolumeName(validating: "clone1"), sizeBytes: UInt64(Self.size), parent: link)
        try await store.put(
            VolumeLayout(flashDirectory: "", namespace: "clone1").configObject,
            data: try MetadataRecord.encode(config, kind: .volumeConfig))
        var clone = try await Volume.open(
            config: config, layout: VolumeLayout(flashDirectory: root + "/clone", namespace: "clone1"),
            options: parent.options, backend: store, cache: cache, env: parent.env, logger: Logger(label: "test"),
            parent: view)
        for address in 64..<80 {
            try await clone.write(
                offset: UInt64(address * Self.cluster), data: pattern(Self.cluster, seed: 7000 + UInt64(address)),
                fua: false)
        }
        try await Self.verify(clone, "through the view")
        let extents = try await clone.allocation(offset: 0, length: UInt32(4 << 20))
        #expect(extents.first?.isHole == false && extents.first!.lengthBytes >= 512 * UInt64(Self.cluster))

        // The owner scrubs: s1's clusters move to new SCOs and the sources are deleted.
        let before = Set(store.allNames.filter { $0.hasPrefix("vol1/sco/") })
        let summary = try await Self.scrub(store)
        #expect(summary.rewrittenSCOs > 0, "\(summary)")
        await parent.volume.scrubPass()
        try await parent.volume.journal.submit(.roll)
        try await parent.waitUntilStored()
        await parent.volume.scrubPass()
        let deleted = before.subtracting(store.allNames)
        #expect(!deleted.isEmpty, "the scrub deleted no source SCO")
        // The view's map still points at the deleted SCOs: reading replays the parent's namespace again.
        // (Windows it fetched before are still in the flash cache, and right: drop them so the reads go out.)
        cache.forget(volume: view.reader.cacheVolume)
        try await Self.verify(clone, "after the owner's scrub")

        // A restart of the clone builds a new view from the backend as it is now.
        _ = await clone.close()
        let fresh = try await BackendParentView.load(
            name: parent.config.name, snapshot: "s1", epoch: snapshot.epoch, backend: store, cache: cache,
            workDirectory: root + "/views", options: parent.options, env: parent.env, logger: Logger(label: "test")
        ) { (_) async throws(VDError) -> any CloneParentSource in throw VDError(.notFound, "no grandparent") }
        clone = try await Volume.open(
            config: config, layout: VolumeLayout(flashDirectory: root + "/clone", namespace: "clone1"),
            options: parent.options, backend: store, cache: cache, env: parent.env, logger: Logger(label: "test"),
            parent: fresh)
        try await Self.verify(clone, "after a restart")
        _ = await clone.close()
    }

    @Test func aViewOfASnapshotNotInTheParentsTableIsRefused() async throws {
        let store = MemoryStore()
        let parent = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store)
        defer { Task { await parent.shutdown() } }
        let root = NSTemporaryDirectory() + "vd-clone-view-" + UUID().uuidString
        defer { try? Syscall.removeTree(root) }
        let cache = FlashCache(capacityBytes: 1 << 30, aio: nil, logger: Logger(label: "test"))
        try await parent.volume.write(offset: 0, data: pattern(Self.cluster, seed: 1), fua: false)
        func load(_ name: String, epoch: UInt64) async throws(VDError) -> BackendParentView {
            try await BackendParentView.load(
                name: parent.config.name, snapshot: name, epoch: epoch, backend: store, cache: cache,
                workDirectory: root + "/views", options: parent.options, env: parent.env,
                logger: Logger(label: "test")
            ) { (_) async throws(VDError) -> any CloneParentSource in throw VDError(.notFound, "no grandparent") }
        }
        await #expect(throws: VDError.self) { _ = try await load("nope", epoch: 1) }
        let snapshot = try await parent.volume.createSnapshot(named: "s1")
        try await parent.waitUntilStored()
        let view = try await load("s1", epoch: snapshot.epoch)
        view.detach()
        // The right name at another epoch (a snapshot deleted and made again) is another snapshot.
        do {
            _ = try await load("s1", epoch: snapshot.epoch + 1)
            Issue.record("a view at the wrong epoch was built")
        } catch {
            #expect(error.code == .notFound)
        }
    }
}
