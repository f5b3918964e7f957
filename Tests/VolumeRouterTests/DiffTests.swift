import FlashIO
import Foundation
import Logging
import NIOCore
import ObjectStore
import Testing
import VolumeCore

@testable import VolumeRouter

/// Changed extents between versions (incremental backup), checked against a model that knows, for every cluster,
/// which version of it each snapshot holds.
@Suite struct DiffTests {
    static let size = 4 << 20
    static let cluster = 4096

    /// Bytes, and per cluster a token naming the version it holds (0: zeroes; every write that leaves data makes a
    /// new token). A diff must report exactly the clusters whose token differs.
    struct Model {
        var bytes = [UInt8](repeating: 0, count: DiffTests.size)
        var tokens = [UInt64](repeating: 0, count: DiffTests.size / DiffTests.cluster)
        var nextToken: UInt64 = 1

        mutating func touch(_ offset: Int, _ length: Int) {
            for cluster in (offset / DiffTests.cluster)...((offset + length - 1) / DiffTests.cluster) {
                let range = (cluster * DiffTests.cluster)..<((cluster + 1) * DiffTests.cluster)
                if bytes[range].allSatisfy({ $0 == 0 }) {
                    tokens[cluster] = 0
                } else {
                    tokens[cluster] = nextToken
                    nextToken += 1
                }
            }
        }

        mutating func write(_ offset: Int, _ data: ByteBuffer) {
            bytes.replaceSubrange(offset..<(offset + data.readableBytes), with: data.readableBytesView)
            touch(offset, data.readableBytes)
        }

        mutating func zero(_ offset: Int, _ length: Int) {
            bytes.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
            touch(offset, length)
        }

        /// The extents a diff from `older` to `newer` must report.
        static func expected(from older: [UInt64], to newer: [UInt64]) -> [DiffExtent] {
            var extents: [DiffExtent] = []
            for cluster in 0..<newer.count where older[cluster] != newer[cluster] {
                let zero = newer[cluster] == 0
                let offset = UInt64(cluster * DiffTests.cluster)
                if let last = extents.last, last.zero == zero, last.offset + last.length == offset {
                    extents[extents.count - 1].length += UInt64(DiffTests.cluster)
                } else {
                    extents.append(DiffExtent(offset: offset, length: UInt64(DiffTests.cluster), zero: zero))
                }
            }
            return extents
        }
    }

    /// Writes (whole clusters, partial clusters, all-zero data), zeroing and trims of whole clusters.
    func randomChanges(
        _ volume: Volume, _ model: inout Model, count: Int, seed: UInt64, hot: Range<Int>? = nil
    )
        async throws
    {
        var generator = SeededGenerator(seed: seed)
        let span = hot ?? 0..<Self.size
        for i in 0..<count {
            let length = [100, 512, 4096, 8192, 65536][Int(generator.next() % 5)]
            let offset = span.lowerBound + Int(generator.next() % UInt64(span.count - length))
            switch i % 9 {
            case 3:
                try await volume.writeZeroes(offset: UInt64(offset), length: UInt32(length), fua: false, mayUnmap: true)
                model.zero(offset, length)
            case 6:
                let data = ByteBuffer(repeating: 0, count: length)
                try await volume.write(offset: UInt64(offset), data: data, fua: false)
                model.write(offset, data)
            default:
                let data = pattern(length, seed: seed &* 1000 &+ UInt64(i))
                try await volume.write(offset: UInt64(offset), data: data, fua: false)
                model.write(offset, data)
            }
        }
    }

    @Test func theChangedClusterBitmapMatchesASetModel() {
        var generator = SeededGenerator(seed: 5)
        var bitmap = ClusterBitmap()
        var model = Set<UInt64>()
        let space: UInt64 = 3 * ClusterBitmap.chunkClusters + 77
        for _ in 0..<300 {
            let start = generator.next() % space
            let count = [1, 2, 63, 64, 65, 200, 70_000][Int(generator.next() % 7)]
            let end = min(start + UInt64(count), space)
            bitmap.insert(start..<end)
            for address in start..<end { model.insert(address) }
        }
        var members: [UInt64] = []
        var previousEnd: UInt64?
        for chunk in bitmap.chunkIndices {
            for range in bitmap.ranges(inChunk: chunk) {
                #expect(!range.isEmpty)
                if let previousEnd { #expect(range.lowerBound >= previousEnd) }
                previousEnd = range.upperBound
                members += Array(range)
            }
        }
        #expect(members == model.sorted())
        #expect(bitmap.clusterCount == model.count)
        #expect((0..<space).allSatisfy { bitmap.contains($0) == model.contains($0) })
    }

    @Test func diffsBetweenSnapshotsAndTheLiveVolumeMatchTheModel() async throws {
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20)
        defer { Task { await h.shutdown() } }
        var model = Model()
        try await randomChanges(h.volume, &model, count: 120, seed: 1)
        let s1 = try await h.volume.createSnapshot(named: "s1")
        let atS1 = model.tokens
        #expect(try await h.volume.diff(from: .nothing, to: s1.epoch) == Model.expected(from: Model().tokens, to: atS1))
        // A few changes in a small region: the diff is exactly them, whatever else the volume holds.
        try await randomChanges(h.volume, &model, count: 40, seed: 2, hot: 1 << 20..<(1 << 20) + (256 << 10))
        let s2 = try await h.volume.createSnapshot(named: "s2")
        let atS2 = model.tokens
        let expected12 = Model.expected(from: atS1, to: atS2)
        #expect(!expected12.isEmpty)
        #expect(try await h.volume.diff(from: .epoch(s1.epoch), to: s2.epoch) == expected12)
        #expect(try await h.volume.diff(from: .epoch(s2.epoch), to: s2.epoch) == [])
        // The live volume, with changes still in the open journal.
        try await randomChanges(h.volume, &model, count: 30, seed: 3)
        #expect(
            try await h.volume.diff(from: .epoch(s1.epoch), to: nil) == Model.expected(from: atS1, to: model.tokens))
        #expect(
            try await h.volume.diff(from: .epoch(s2.epoch), to: nil) == Model.expected(from: atS2, to: model.tokens))

        // The same from the backend alone (the TLogs are fetched), and after a rollback to s1 plus new changes: the
        // clusters the rollback returned to s1's version are not changes.
        try await h.restart(drain: true)
        _ = await h.volume.close(drainTimeoutSeconds: 30)
        try Syscall.removeTree(h.root + "/flash")
        try await h.open()
        #expect(try await h.volume.diff(from: .epoch(s1.epoch), to: s2.epoch) == expected12)
        _ = try await h.volume.rollback(toSnapshot: "s1")
        model.tokens = atS1
        model.bytes = Array(try await h.volume.read(offset: 0, length: UInt32(Self.size)).readableBytesView)
        #expect(try await h.volume.diff(from: .epoch(s1.epoch), to: nil) == [])
        try await randomChanges(h.volume, &model, count: 25, seed: 4)
        let s3 = try await h.volume.createSnapshot(named: "s3")
        #expect(
            try await h.volume.diff(from: .epoch(s1.epoch), to: s3.epoch)
                == Model.expected(from: atS1, to: model.tokens))
        await #expect(throws: VDError.self) { _ = try await h.volume.diff(from: .epoch(s3.epoch), to: s1.epoch) }
        await #expect(throws: VDError.self) { _ = try await h.volume.diff(from: .cloneBase, to: nil) }
    }

    /// Applying a full diff of s1 and then the s1 → s2 increment onto an empty volume gives s2 byte for byte.
    @Test func aFullCopyPlusTheIncrementRebuildsTheNewerSnapshot() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store)
        defer { Task { await h.shutdown() } }
        var model = Model()
        try await randomChanges(h.volume, &model, count: 100, seed: 7)
        let s1 = try await h.volume.createSnapshot(named: "s1")
        try await randomChanges(h.volume, &model, count: 60, seed: 8)
        let s2 = try await h.volume.createSnapshot(named: "s2")
        try await randomChanges(h.volume, &model, count: 20, seed: 9)

        let target = try await Volume.open(
            config: VolumeConfig(name: try VolumeName(validating: "copy"), sizeBytes: UInt64(Self.size)),
            layout: VolumeLayout(flashDirectory: h.root + "/flash-copy", namespace: "copy"), options: h.options,
            backend: store, cache: h.cache, env: h.env, logger: Logger(label: "test"))
        func apply(_ extents: [DiffExtent], at epoch: UInt64) async throws {
            for extent in extents {
                if extent.zero {
                    try await target.writeZeroes(
                        offset: extent.offset, length: UInt32(extent.length), fua: false, mayUnmap: true)
                } else {
                    let data = try await h.volume.read(
                        offset: extent.offset, length: UInt32(extent.length), atEpoch: epoch)
                    try await target.write(offset: extent.offset, data: data, fua: false)
                }
            }
        }
        try await apply(try await h.volume.diff(from: .nothing, to: s1.epoch), at: s1.epoch)
        let copyS1 = try await target.read(offset: 0, length: UInt32(Self.size))
        #expect(copyS1 == (try await h.volume.read(offset: 0, length: UInt32(Self.size), atEpoch: s1.epoch)))
        try await apply(try await h.volume.diff(from: .epoch(s1.epoch), to: s2.epoch), at: s2.epoch)
        let copyS2 = try await target.read(offset: 0, length: UInt32(Self.size))
        #expect(copyS2 == (try await h.volume.read(offset: 0, length: UInt32(Self.size), atEpoch: s2.epoch)))
        _ = await target.close()
    }

    @Test func aCloneDiffsAgainstItsParentSnapshot() async throws {
        let store = MemoryStore()
        let h = try await VolumeHarness(sizeBytes: UInt64(Self.size), scoSizeBytes: 1 << 20, backend: store)
        defer { Task { await h.shutdown() } }
        var parentModel = Model()
        try await randomChanges(h.volume, &parentModel, count: 80, seed: 20)
        let base = try await h.volume.createSnapshot(named: "base")
        try h.volume.setClone("clone1", ofSnapshot: "base", present: true)
        let clone = try await Volume.open(
            config: VolumeConfig(
                name: try VolumeName(validating: "clone1"), sizeBytes: UInt64(Self.size),
                parent: .init(volume: h.volume.name, snapshot: "base", epoch: base.epoch)),
            layout: VolumeLayout(flashDirectory: h.root + "/flash-clone1", namespace: "clone1"), options: h.options,
            backend: store, cache: h.cache, env: h.env, logger: Logger(label: "test"), parent: h.volume)
        // The parent changes after the snapshot: not the clone's business.
        try await randomChanges(h.volume, &parentModel, count: 30, seed: 21)
        var cloneModel = Model()
        cloneModel.bytes = Array(
            try await h.volume.read(offset: 0, length: UInt32(Self.size), atEpoch: base.epoch).readableBytesView)
        // Tokens of the base: any non-zero cluster holds the parent's version (distinct from every clone write).
        for cluster in 0..<cloneModel.tokens.count {
            let range = (cluster * Self.cluster)..<((cluster + 1) * Self.cluster)
            cloneModel.tokens[cluster] =
                cloneModel.bytes[range].allSatisfy { $0 == 0 } ? 0 : UInt64.max - UInt64(cluster)
        }
        cloneModel.nextToken = 1
        let atBase = cloneModel.tokens
        try await randomChanges(clone, &cloneModel, count: 60, seed: 22)
        let c1 = try await clone.createSnapshot(named: "c1")
        let atC1 = cloneModel.tokens
        #expect(try await clone.diff(from: .cloneBase, to: c1.epoch) == Model.expected(from: atBase, to: atC1))
        #expect(try await clone.diff(from: .nothing, to: c1.epoch) == Model.expected(from: Model().tokens, to: atC1))
        try await randomChanges(clone, &cloneModel, count: 20, seed: 23)
        #expect(
            try await clone.diff(from: .epoch(c1.epoch), to: nil) == Model.expected(from: atC1, to: cloneModel.tokens))
        _ = await clone.close()
    }
}
