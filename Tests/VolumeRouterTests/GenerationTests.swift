import FlashIO
import Foundation
import Logging
import NIOCore
import NIOPosix
import ObjectStore
import SCOCache
import Scrubber
import Testing
import VolumeCore

@testable import VolumeRouter

/// Objects named by owner generation (GenerationChain): an owner that was fenced can keep uploading, and nothing it
/// uploads after the new owner listed the backend collides with the new owner's objects or becomes history.
@Suite struct GenerationTests {
    static let cluster = 4096

    /// One router's view: a flash directory of its own on a shared backend, opened in an owner generation.
    final class Node: @unchecked Sendable {
        let root: String
        let env: Environment
        let pool: NIOThreadPool
        var volume: Volume!

        init(env: Environment, pool: NIOThreadPool) throws {
            root = NSTemporaryDirectory() + "vd-gen-" + UUID().uuidString
            try Syscall.makeDirectories(root)
            self.env = env
            self.pool = pool
        }

        func open(
            _ config: VolumeConfig, backend: any ObjectStore, generation: UInt64, node: String, options: VolumeOptions
        ) async throws {
            volume = try await Volume.open(
                config: config, layout: VolumeLayout(flashDirectory: root + "/flash", namespace: "vol1"),
                options: options, backend: backend,
                cache: FlashCache(capacityBytes: 1 << 30, aio: nil, logger: Logger(label: "test")), env: env,
                logger: Logger(label: "test"), generation: OwnerGeneration(generation: generation, node: node))
        }

        /// Writes `count` clusters of `seed` from cluster `first` in batches that roll SCOs, then waits for the
        /// backend to hold every sealed epoch.
        func write(first: Int, count: Int, seed: UInt64) async throws {
            for i in 0..<count {
                try await volume.write(
                    offset: UInt64((first + i) * GenerationTests.cluster),
                    data: pattern(GenerationTests.cluster, seed: seed &+ UInt64(i)), fua: false)
            }
            try await volume.flush()
            _ = try await volume.createSnapshot(named: "s\(seed)")
            let target = SCONumber(volume.journal.openEpoch - 1)
            let deadline = Date().addingTimeInterval(60)
            while volume.uploadStatus.storedThrough < target {
                guard Date() < deadline else { throw VDError(.timeout, "uploads stuck: \(volume.uploadStatus)") }
                try await Task.sleep(for: .milliseconds(10))
            }
        }

        func close() async {
            _ = await volume?.close()
            volume = nil
        }

        func remove() { try? Syscall.removeTree(root) }
    }

    /// A thread pool, options with 1 MiB SCOs and fast retries, and a 16 MiB volume vol1 created on an in-memory backend.
    static func world() async throws -> (
        NIOThreadPool, Environment, VolumeOptions, VolumeConfig, VolumeLayout, MemoryStore
    ) {
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        var options = VolumeOptions()
        options.scoSizeBytes = 1 << 20
        options.uploadRetryDelaySeconds = 0.01
        options.uploadRetryDelaySecondsMax = 0.05
        let config = VolumeConfig(name: try VolumeName(validating: "vol1"), sizeBytes: 16 << 20)
        let layout = VolumeLayout(flashDirectory: "", namespace: "vol1")
        let backend = MemoryStore()
        try await backend.put(layout.configObject, data: try MetadataRecord.encode(config, kind: .volumeConfig))
        return (pool, .live(pool: pool), options, config, layout, backend)
    }

    /// `vd check` of the namespace (its work directory under `root`).
    static func check(
        _ config: VolumeConfig, backend: any ObjectStore, env: Environment, in root: String
    ) async throws -> CheckReport {
        try Syscall.makeDirectories(root + "/check")
        var check = NamespaceCheck()
        check.workDirectory = root + "/check"
        return try await check.run(volume: config.name, backend: backend, env: env, progress: { _ in })
    }

    static func copy(_ from: MemoryStore) async throws -> MemoryStore {
        let to = MemoryStore()
        for info in try await from.list(prefix: "") { try await to.put(info.name, data: try await from.get(info.name)) }
        return to
    }

    static func expect(
        _ volume: Volume, first: Int, count: Int, seed: UInt64, _ comment: Comment
    ) async throws {
        for i in 0..<count {
            let got = try await volume.read(offset: UInt64((first + i) * cluster), length: UInt32(cluster))
            #expect(got == pattern(cluster, seed: seed &+ UInt64(i)), comment)
        }
    }

    @Test func aFencedOwnersLateUploadsNeverCollideNorBecomeHistory() async throws {
        let (pool, env, options, config, layout, backend) = try await Self.world()

        // A owns generation 1 and stores clusters 0..<100 (seed 1).
        let a = try Node(env: env, pool: pool)
        let b = try Node(env: env, pool: pool)
        let c = try Node(env: env, pool: pool)
        defer {
            a.remove()
            b.remove()
            c.remove()
        }
        try await a.open(config, backend: backend, generation: 1, node: "a", options: options)
        try await a.write(first: 0, count: 100, seed: 1)
        // What B finds when it takes the volume over.
        let atTakeover = try await Self.copy(backend)
        // A, not knowing it was fenced, goes on: clusters 0..<100 again (seed 2) and 100..<150, all uploaded.
        try await a.write(first: 0, count: 100, seed: 2)
        try await a.write(first: 100, count: 50, seed: 3)
        await a.close()
        let before = Set(try await atTakeover.list(prefix: "").map(\.name))
        let late = try await backend.list(prefix: "").map(\.name).filter {
            !before.contains($0) && ($0.hasPrefix(layout.tlogPrefix) || $0.hasPrefix(layout.scoPrefix))
        }
        #expect(late.contains { $0.hasPrefix(layout.tlogPrefix) } && late.contains { $0.hasPrefix(layout.scoPrefix) })

        // B takes generation 2 from the backend as it was, and writes clusters 50..<80 (seed 4).
        try await b.open(config, backend: atTakeover, generation: 2, node: "b", options: options)
        let chain = try await NamespaceObjects.loadGenerationChain(layout: layout, backend: atTakeover)
        let start = try #require(chain.start(of: 2))
        #expect(start.node == "b")
        #expect(start.firstEpoch == b.volume.journal.openEpoch, "generation 2 starts with the epoch B opened")
        try await b.write(first: 50, count: 30, seed: 4)
        let tagged = try await atTakeover.list(prefix: layout.tlogPrefix).map(\.name).filter {
            $0.hasSuffix(".0000000000000002")
        }
        #expect(!tagged.isEmpty, "B's TLogs carry generation 2 in their names")
        let bSCOs = try await atTakeover.list(prefix: layout.scoPrefix).compactMap {
            SCONumber(hex: $0.name.dropFirst(layout.scoPrefix.count))
        }.filter { $0.rawValue >= GenerationChain.numberBase(of: 2) }
        #expect(!bSCOs.isEmpty, "B's SCO numbers are in generation 2's range")

        // A's late uploads arrive now: create-only, and none of them takes a name B uses.
        for name in late {
            try await atTakeover.put(name, data: try await backend.get(name))
        }

        // What B serves, and what B serves after a restart, and a restore from the backend alone (C, same
        // generation as a new process of B's would have): A's later writes are nowhere.
        let comment: Comment = "reads B's history: A's writes after the takeover are not part of it"
        try await Self.expect(b.volume, first: 0, count: 50, seed: 1, comment)
        try await Self.expect(b.volume, first: 50, count: 30, seed: 4, comment)
        try await Self.expect(b.volume, first: 80, count: 20, seed: 1 &+ 80, comment)
        await b.close()
        try await b.open(config, backend: atTakeover, generation: 2, node: "b", options: options)
        try await Self.expect(b.volume, first: 0, count: 50, seed: 1, "after B's restart")
        try await Self.expect(b.volume, first: 50, count: 30, seed: 4, "after B's restart")
        #expect(
            try await b.volume.read(offset: UInt64(100 * Self.cluster), length: UInt32(Self.cluster))
                == ByteBuffer(repeating: 0, count: Self.cluster))
        await b.close()
        try await c.open(config, backend: atTakeover, generation: 2, node: "b", options: options)
        try await Self.expect(c.volume, first: 0, count: 50, seed: 1, "restored from the backend")
        try await Self.expect(c.volume, first: 50, count: 30, seed: 4, "restored from the backend")
        #expect(c.volume.snapshotTable.snapshot(named: "s3") == nil, "A's later snapshot is not in the table")
        #expect(c.volume.snapshotTable.snapshot(named: "s4") != nil)
        await c.close()

        // The scrubber's and the check's view: the same history; A's late TLogs are orphans.
        let report = try await Self.check(config, backend: atTakeover, env: env, in: c.root)
        #expect(report.problems.isEmpty, "\(report.problems)")
        let lateTLogs = late.filter { $0.hasPrefix(layout.tlogPrefix) }
        #expect(Set(lateTLogs).isSubset(of: Set(report.orphans)), "\(report.orphans)")
        try await pool.shutdownGracefully()
    }

    /// An owner that took generation 2 but wrote its start only after generation 3 had started (it stalled, and lost
    /// the volume meanwhile): its late start must not rewrite the history generation 3 serves.
    @Test func aLateGenerationStartCountsForNothing() async throws {
        let (pool, env, options, config, layout, backend) = try await Self.world()
        let a = try Node(env: env, pool: pool)
        let c = try Node(env: env, pool: pool)
        defer {
            a.remove()
            c.remove()
        }
        try await a.open(config, backend: backend, generation: 1, node: "a", options: options)
        try await a.write(first: 0, count: 40, seed: 1)
        try await a.write(first: 40, count: 40, seed: 2)
        await a.close()
        try await c.open(config, backend: backend, generation: 3, node: "c", options: options)
        try await c.write(first: 20, count: 10, seed: 3)
        // The late start of generation 2: it found fewer epochs than generation 3 did.
        let late = GenerationStart(generation: 2, firstEpoch: 2, node: "b")
        try await backend.put(layout.generationObject(2), data: try MetadataRecord.encode(late, kind: .generationStart))
        let chain = try await NamespaceObjects.loadGenerationChain(layout: layout, backend: backend)
        #expect(chain.start(of: 2) == nil && chain.start(of: 3) != nil)
        await c.close()
        try await c.open(config, backend: backend, generation: 3, node: "c", options: options)
        try await Self.expect(c.volume, first: 0, count: 20, seed: 1, "after a restart of generation 3")
        try await Self.expect(c.volume, first: 20, count: 10, seed: 3, "after a restart of generation 3")
        try await Self.expect(c.volume, first: 40, count: 40, seed: 2, "after a restart of generation 3")
        await c.close()
        let report = try await Self.check(config, backend: backend, env: env, in: c.root)
        #expect(report.problems.isEmpty, "\(report.problems)")
        try await pool.shutdownGracefully()
    }

    @Test func chainNamesAndParsing() throws {
        let layout = VolumeLayout(flashDirectory: "", namespace: "v")
        let chain = GenerationChain([
            GenerationStart(generation: 3, firstEpoch: 20, node: "c"),
            GenerationStart(generation: 2, firstEpoch: 10, node: "b"),
        ])
        #expect(chain.generation(ofEpoch: 9) == 0)
        #expect(chain.generation(ofEpoch: 10) == 2)
        #expect(chain.generation(ofEpoch: 19) == 2)
        #expect(chain.generation(ofEpoch: 20) == 3)
        #expect(chain.tlogObject(5, layout: layout) == "v/tlog/0000000000000005")
        #expect(chain.tlogObject(12, layout: layout) == "v/tlog/000000000000000c.0000000000000002")
        let names = [
            "v/tlog/0000000000000009", "v/tlog/000000000000000a", "v/tlog/000000000000000a.0000000000000002",
            "v/tlog/0000000000000014.0000000000000002", "v/tlog/0000000000000014.0000000000000003", "v/tlog/junk",
        ]
        #expect(chain.historyTLogs(in: names, layout: layout) == [9, 10, 20])
        #expect(
            chain.foreignTLogs(in: names, layout: layout) == [
                "v/tlog/000000000000000a", "v/tlog/0000000000000014.0000000000000002",
            ])
        // The chain is walked from the highest generation through `previous`.
        let found = [
            GenerationStart(generation: 2, firstEpoch: 10, node: "b"),
            GenerationStart(generation: 3, firstEpoch: 13, node: "c", previous: nil),
            GenerationStart(generation: 4, firstEpoch: 15, node: "d", previous: 3),
        ]
        let linked = try GenerationChain.linked(found, what: "test")
        #expect(linked.starts.map(\.generation) == [3, 4])
        #expect(linked.unlinked(found).map(\.generation) == [2])
        #expect(try GenerationChain.linked([], what: "test").starts.isEmpty)
        // A link to a start that is not there, or not older: damage, never a shorter history.
        #expect(throws: VDError.self) {
            try GenerationChain.linked(
                [GenerationStart(generation: 4, firstEpoch: 15, node: "d", previous: 3)], what: "test")
        }
        #expect(throws: VDError.self) {
            try GenerationChain.linked(
                [
                    GenerationStart(generation: 3, firstEpoch: 13, node: "c"),
                    GenerationStart(generation: 4, firstEpoch: 15, node: "d", previous: 4),
                ], what: "test")
        }
        #expect(throws: VDError.self) {
            try GenerationChain([
                GenerationStart(generation: 2, firstEpoch: 10, node: "b"),
                GenerationStart(generation: 3, firstEpoch: 9, node: "c"),
            ]).validate(what: "test")
        }
    }
}
