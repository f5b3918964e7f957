import FlashIO
import Foundation
import Logging
import NIOCore
import ObjectStore
import Testing
import VolumeCore
@testable import VolumeRouter

/// Snapshots, rollback and clones on the engine, checked against a byte model of the volume.
@Suite struct SnapshotTests {
    /// A byte-for-byte model of a small volume.
    struct Model {
        var bytes: [UInt8]
        init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }
        mutating func write(_ offset: Int, _ data: ByteBuffer) {
            bytes.replaceSubrange(offset..<(offset + data.readableBytes), with: data.readableBytesView)
        }
        mutating func zero(_ offset: Int, _ length: Int) {
            bytes.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
        }
    }

    static let size = 4 << 20

    func randomWrites(_ h: VolumeHarness, _ model: inout Model, count: Int, seed: UInt64) async throws {
        var generator = SeededGenerator(seed: seed)
        for i in 0..<count {
            let length = [512, 4096, 8192, 65536][Int(generator.next() % 4)]
            let offset = Int(generator.next() % UInt64(Self.size - length)) / 512 * 512
            if i % 7 == 3 {
                try await h.volume.writeZeroes(offset: UInt64(offset), length: UInt32(length), fua: false, mayUnmap: true)
                model.zero(offset, length)
            } else {
                let data = pattern(length, seed: seed &* 1000 &+ UInt64(i))
                try await h.volume.write(offset: UInt64(offset), data: data, fua: false)
                model.write(offset, data)
            }
        }
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

    /// Found by tools/torture.sh (its "Bug B", seeds 10 and 24): once the only snapshot is deleted, an unmap removes a
    /// cluster's map entry but an older version kept for that snapshot stays in the history; a later snapshot then
    /// read that stale version where the volume reads zeroes.
    @Test func aSnapshotAfterAnUnmapReadsZeroesNotAVersionADeletedSnapshotKept() async throws {
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size))
        defer { Task { await h.shutdown() } }
        let first = pattern(65536, seed: 1)
        try await h.volume.write(offset: 0, data: first, fua: false)
        _ = try await h.volume.createSnapshot(named: "s1")
        try await h.volume.write(offset: 0, data: pattern(65536, seed: 2), fua: false)
        try h.volume.deleteSnapshot(named: "s1")
        try await Task.sleep(for: .milliseconds(200))  // the dead history is dropped in the background
        try await h.volume.writeZeroes(offset: 0, length: 65536, fua: false, mayUnmap: true)
        let s2 = try await h.volume.createSnapshot(named: "s2")
        let live = try await h.volume.read(offset: 0, length: 65536)
        let atSnapshot = try await h.volume.read(offset: 0, length: 65536, atEpoch: s2.epoch)
        #expect(live.readableBytesView.allSatisfy { $0 == 0 })
        #expect(atSnapshot.readableBytesView.allSatisfy { $0 == 0 }, "s2 reads data of a version only s1 kept")
        try await h.restart()
        let afterRestart = try await h.volume.read(offset: 0, length: 65536, atEpoch: s2.epoch)
        #expect(afterRestart.readableBytesView.allSatisfy { $0 == 0 })
    }

    @Test func snapshotsKeepTheirContentWhileTheVolumeChanges() async throws {
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20)
        defer { Task { await h.shutdown() } }
        var model = Model(size: Self.size)
        var expected: [(SnapshotRecord, [UInt8])] = []
        for round in 0..<6 {
            try await randomWrites(h, &model, count: 40, seed: UInt64(round))
            let snapshot = try await h.volume.createSnapshot(named: "s\(round)")
            expected.append((snapshot, model.bytes))
        }
        try await randomWrites(h, &model, count: 40, seed: 99)
        #expect(try await contents(h) == model.bytes)
        for (snapshot, bytes) in expected {
            #expect(try await contents(h, atEpoch: snapshot.epoch) == bytes, "snapshot \(snapshot.name)")
        }
        // Duplicate and bad names are refused.
        await #expect(throws: VDError.self) { _ = try await h.volume.createSnapshot(named: "s1") }
        await #expect(throws: VDError.self) { _ = try await h.volume.createSnapshot(named: "a@b") }
        // They survive a restart and a restart from the backend alone.
        try await h.restart(drain: true)
        for (snapshot, bytes) in expected {
            #expect(try await contents(h, atEpoch: snapshot.epoch) == bytes, "after restart: \(snapshot.name)")
        }
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        #expect(h.volume.snapshotTable.snapshots.map(\.name) == expected.map(\.0.name))
        #expect(try await contents(h) == model.bytes)
        for (snapshot, bytes) in expected {
            #expect(try await contents(h, atEpoch: snapshot.epoch) == bytes, "from backend: \(snapshot.name)")
        }
    }

    @Test func rollbackReturnsExactlyTheSnapshotAndSurvivesRestarts() async throws {
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20)
        defer { Task { await h.shutdown() } }
        var model = Model(size: Self.size)
        try await randomWrites(h, &model, count: 50, seed: 1)
        _ = try await h.volume.createSnapshot(named: "good")
        let good = model.bytes
        try await randomWrites(h, &model, count: 50, seed: 2)
        _ = try await h.volume.createSnapshot(named: "later")
        try await randomWrites(h, &model, count: 50, seed: 3)
        _ = try await h.volume.rollback(toSnapshot: "good")
        #expect(try await contents(h) == good)
        #expect(h.volume.snapshotTable.snapshots.map(\.name) == ["good"])
        // Writes after the rollback, then restarts: local, and from the backend alone (replaying the rollback).
        var after = Model(size: Self.size)
        after.bytes = good
        try await randomWrites(h, &after, count: 30, seed: 4)
        try await h.restart(drain: true)
        #expect(try await contents(h) == after.bytes)
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        #expect(try await contents(h) == after.bytes)
        #expect(try await contents(h, atEpoch: h.volume.snapshotTable.snapshot(named: "good")!.epoch) == good)
    }

    @Test func clonesReadThroughAndStayIsolated() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store)
        defer { Task { await h.shutdown() } }
        var parentModel = Model(size: Self.size)
        try await randomWrites(h, &parentModel, count: 60, seed: 10)
        let base = try await h.volume.createSnapshot(named: "base")
        let atBase = parentModel.bytes

        func openClone(_ name: String, of parent: Volume, snapshot: SnapshotRecord) async throws -> Volume {
            let config = VolumeConfig(
                name: try VolumeName(validating: name), sizeBytes: UInt64(Self.size),
                parent: .init(volume: parent.name, snapshot: snapshot.name, epoch: snapshot.epoch))
            try parent.setClone(name, ofSnapshot: snapshot.name, present: true)
            return try await Volume.open(
                config: config, layout: VolumeLayout(flashDirectory: h.root + "/flash-" + name, namespace: name),
                options: h.options, backend: store, cache: h.cache, env: h.env, logger: Logger(label: "test"),
                parent: parent)
        }
        let clone = try await openClone("clone1", of: h.volume, snapshot: base)
        #expect(Array(try await clone.read(offset: 0, length: UInt32(Self.size)).readableBytesView) == atBase)
        // Writes to the parent after the snapshot do not leak into the clone, and the clone's writes (and trims)
        // do not leak into the parent.
        try await randomWrites(h, &parentModel, count: 40, seed: 11)
        var cloneModel = Model(size: Self.size)
        cloneModel.bytes = atBase
        var generator = SeededGenerator(seed: 12)
        for i in 0..<40 {
            let offset = Int(generator.next() % UInt64(Self.size - 8192)) / 512 * 512
            if i % 5 == 0 {
                try await clone.trim(offset: UInt64(offset), length: 8192, fua: false)
                // Trim affects whole clusters only.
                let start = (offset + 4095) / 4096 * 4096
                let end = (offset + 8192) / 4096 * 4096
                if end > start { cloneModel.zero(start, end - start) }
            } else {
                let data = pattern(8192, seed: 500 + UInt64(i))
                try await clone.write(offset: UInt64(offset), data: data, fua: false)
                cloneModel.write(offset, data)
            }
        }
        #expect(Array(try await clone.read(offset: 0, length: UInt32(Self.size)).readableBytesView) == cloneModel.bytes)
        #expect(try await contents(h) == parentModel.bytes)
        // A clone of the clone.
        let cloneSnapshot = try await clone.createSnapshot(named: "c1")
        let grandchild = try await openClone("clone2", of: clone, snapshot: cloneSnapshot)
        #expect(Array(try await grandchild.read(offset: 0, length: UInt32(Self.size)).readableBytesView) == cloneModel.bytes)
        // The parent's snapshot cannot go while the clone exists; the error names the clone.
        do {
            try h.volume.deleteSnapshot(named: "base")
            Issue.record("deleting a snapshot with clones succeeded")
        } catch {
            #expect(error.message.contains("clone1"))
        }
        // Allocation of a clone reports the parent's data where the clone never wrote.
        let extents = try await grandchild.allocation(offset: 0, length: UInt32(Self.size))
        #expect(extents.contains { !$0.isHole })
        // Sparse reads of a clone of a clone: holes come from the clone's trims and from what no ancestor wrote.
        var generator2 = SeededGenerator(seed: 13)
        for _ in 0..<30 {
            let offset = generator2.next() % UInt64(Self.size - 1)
            let length = UInt32(1 + generator2.next() % min(UInt64(Self.size) - offset, 200_000))
            try await checkSparse(grandchild, offset: offset, length: length)
            try await checkSparse(clone, offset: offset, length: length)
        }
        _ = await grandchild.close()
        _ = await clone.close()
    }
}
