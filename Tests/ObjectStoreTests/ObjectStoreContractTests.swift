// The ObjectStore contract, run against every store: the in-memory twin, the local directory and S3: Ceph RGW with
// signature V4 (AsyncHTTPClient) and V2 (libs3), and rclone serve s3 (an independent V4-only implementation). A
// behaviour one store has and another lacks is a bug in one of them.

import Foundation
import NIOCore
import ObjectStore
import Testing
import VolumeCore

enum StoreKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case memory, local
    /// Ceph RGW, signature V4.
    case s3
    /// Ceph RGW, signature V2 (libs3).
    case s3v2
    /// rclone serve s3, signature V4.
    case s3rclone
    var testDescription: String { rawValue }

    /// Every kind, less S3 when VD_SKIP_S3=1.
    static let underTest: [StoreKind] = S3TestEnvironment.isSkipped ? [.memory, .local] : allCases
}

/// A store for one test and how to dispose of it.
struct StoreUnderTest {
    let store: any ObjectStore
    let cleanup: () async -> Void

    static func make(_ kind: StoreKind) async throws -> StoreUnderTest {
        switch kind {
        case .memory:
            return StoreUnderTest(store: MemoryStore(), cleanup: {})
        case .local:
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
                "vd-store-\(UInt64.random(in: 0...UInt64.max))"
            ).path
            return StoreUnderTest(
                store: try LocalDirectoryStore(root: directory),
                cleanup: { try? FileManager.default.removeItem(atPath: directory) })
        case .s3, .s3v2, .s3rclone:
            let store: S3Store
            switch kind {
            case .s3v2: store = try await S3TestEnvironment.makeStore { $0.signature = .v2 }
            case .s3rclone: store = try await S3TestEnvironment.makeRcloneStore()
            default: store = try await S3TestEnvironment.makeStore()
            }
            return StoreUnderTest(
                store: store,
                cleanup: {
                    // memstore keeps objects in RAM: remove what the test left.
                    if let left = try? await store.list(prefix: "") {
                        await withTaskGroup(of: Void.self) { group in
                            for (index, object) in left.enumerated() {
                                if index >= 16 { await group.next() }
                                group.addTask { try? await store.delete(object.name) }
                            }
                        }
                    }
                    store.shutdown()
                })
        }
    }
}

func withStore(_ kind: StoreKind, _ body: (any ObjectStore) async throws -> Void) async throws {
    let subject = try await StoreUnderTest.make(kind)
    do {
        try await body(subject.store)
    } catch {
        await subject.cleanup()
        throw error
    }
    await subject.cleanup()
}

@Suite("ObjectStore contract")
struct ObjectStoreContractTests {
    @Test(arguments: StoreKind.underTest)
    func putGetHeadDelete(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let data = testBytes(100_000, seed: 1)
            try await store.put("volume/sco/0001", data: data)
            #expect(try await store.get("volume/sco/0001") == data)
            #expect(try await store.head("volume/sco/0001") == ObjectInfo(name: "volume/sco/0001", sizeBytes: 100_000))
            try await store.delete("volume/sco/0001")
            #expect(try await store.head("volume/sco/0001") == nil)
            let error = await vdError { _ = try await store.get("volume/sco/0001") }
            #expect(error?.code == .notFound)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func emptyObject(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            try await store.put("empty", data: ByteBuffer())
            #expect(try await store.get("empty").readableBytes == 0)
            #expect(try await store.head("empty")?.sizeBytes == 0)
            #expect(try await store.get("empty", range: 0..<0).readableBytes == 0)
            let error = await vdError { _ = try await store.get("empty", range: 0..<1) }
            #expect(error?.code == .outOfRange)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func rangeReads(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let size = 10_000
            let data = testBytes(size, seed: 2)
            try await store.put("ranges", data: data)
            func expected(_ range: Range<Int>) -> ByteBuffer {
                data.getSlice(at: range.lowerBound, length: range.count)!
            }
            #expect(try await store.get("ranges", range: 0..<1) == expected(0..<1))
            #expect(try await store.get("ranges", range: 4321..<5678) == expected(4321..<5678))
            #expect(try await store.get("ranges", range: 9999..<10_000) == expected(9999..<10_000))
            #expect(try await store.get("ranges", range: 0..<10_000) == data)
            #expect(try await store.get("ranges", range: 10_000..<10_000).readableBytes == 0)
            for range: Range<UInt64> in [10_000..<10_001, 9_000..<10_001, 20_000..<20_100] {
                let error = await vdError { _ = try await store.get("ranges", range: range) }
                #expect(error?.code == .outOfRange, "range \(range): \(String(describing: error))")
            }
            let missing = await vdError { _ = try await store.get("no-such-object", range: 0..<10) }
            #expect(missing?.code == .notFound)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func missingObjects(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            #expect(await vdError { _ = try await store.get("missing/object") }?.code == .notFound)
            #expect(try await store.head("missing/object") == nil)
            try await store.delete("missing/object")
            #expect(try await store.list(prefix: "missing/").isEmpty)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func listWithPrefixAndPagination(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let count = 1_100  // more than one S3 LIST page (1000 keys)
            try await putMany(store, names: (0..<count).map { "vol/sco/\(String(format: "%05d", $0))" }, bytes: 16)
            for name in ["vol/tlog/1", "vol/tlog/2", "volx/sco/1", "other"] {
                try await store.put(name, data: ByteBuffer(string: name))
            }
            let scos = try await store.list(prefix: "vol/sco/")
            #expect(scos.count == count)
            #expect(scos.map(\.name) == (0..<count).map { "vol/sco/\(String(format: "%05d", $0))" })
            #expect(scos.allSatisfy { $0.sizeBytes == 16 })
            #expect(try await store.list(prefix: "vol/tlog/").map(\.name) == ["vol/tlog/1", "vol/tlog/2"])
            let vol = try await store.list(prefix: "vol")
            #expect(vol.count == count + 3)
            #expect(vol.map(\.name) == vol.map(\.name).sorted())
            // Without the S3 store's own probe objects (`vd-probe/`, written and deleted by its first PUT): rclone's
            // listing still shows the deleted probe for a while (its directory cache).
            let all = try await store.list(prefix: "").map(\.name).filter { !$0.hasPrefix("vd-probe/") }
            let expected = Set(vol.map(\.name) + ["other"])
            #expect(
                all.count == count + 4,
                "list of everything: \(all.count) names; missing \(expected.subtracting(all).sorted().prefix(5)), extra \(Set(all).subtracting(expected).sorted().prefix(5)), duplicates \(all.count - Set(all).count)"
            )
            #expect(try await store.list(prefix: "nothing-here").isEmpty)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func largeObject(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let size = 64 << 20
            let data = testBytes(size, seed: 3)
            try await store.put("large/sco", data: data)
            #expect(try await store.head("large/sco")?.sizeBytes == UInt64(size))
            let whole = try await store.get("large/sco")
            #expect(whole.readableBytes == size)
            #expect(whole == data)
            let tail = try await store.get("large/sco", range: UInt64(size - 4096)..<UInt64(size))
            #expect(tail == data.getSlice(at: size - 4096, length: 4096)!)
            try await store.delete("large/sco")
        }
    }

    @Test(arguments: StoreKind.underTest)
    func concurrentOperations(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let count = 64
            let names = (0..<count).map { "parallel/\($0)" }
            try await putMany(store, names: names, bytes: 200_000, concurrency: count)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, name) in names.enumerated() {
                    group.addTask {
                        let expected = testBytes(200_000, seed: UInt64(index) + 1000)
                        let whole = try await store.get(name)
                        #expect(whole == expected, "object \(name)")
                        let part = try await store.get(name, range: 1000..<2000)
                        #expect(part == expected.getSlice(at: 1000, length: 1000)!, "range of \(name)")
                    }
                }
                try await group.waitForAll()
            }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for name in names { group.addTask { try await store.delete(name) } }
                try await group.waitForAll()
            }
            #expect(try await store.list(prefix: "parallel/").isEmpty)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func namesWithPunctuation(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let names = [
                "vol-1_a.b/sco_0000000000000001.dat", "name.with.many.dots", "-leading-dash", "_leading_underscore",
                "a/b/c/d/e/f", "snap@2024-01-01", "x..y/z", "UPPER.lower-123",
            ]
            for (index, name) in names.enumerated() {
                try await store.put(name, data: ByteBuffer(string: "\(index):\(name)"))
            }
            for (index, name) in names.enumerated() {
                #expect(String(buffer: try await store.get(name)) == "\(index):\(name)", "object \(name)")
                #expect(try await store.head(name)?.name == name)
            }
            #expect(try await store.list(prefix: "").map(\.name) == names.sorted())
            #expect(try await store.list(prefix: "vol-1_a.b/").map(\.name) == ["vol-1_a.b/sco_0000000000000001.dat"])
        }
    }

    @Test(arguments: StoreKind.underTest)
    func invalidNamesAreRejected(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            for name in ["", "/abs", "a//b", "a/../b", "a/./b", "with space", "trailing/", "q?x"] {
                let error = await vdError { try await store.put(name, data: ByteBuffer(string: "x")) }
                #expect(error?.code == .invalidArgument, "name '\(name)'")
            }
        }
    }

    /// PUT never replaces other bytes under an existing name on any store that can refuse it: the same bytes again
    /// succeed (a repeated upload), other bytes get `.alreadyExists` and the object keeps its first bytes. S3 V2
    /// (libs3 sends no If-None-Match) says it cannot.
    @Test(arguments: StoreKind.underTest)
    func putIsCreateOnly(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            if kind == .s3v2 || kind == .s3rclone {
                // libs3 cannot send If-None-Match; rclone's server ignores it (the probe finds out).
                #expect(try await store.confirmsCreateOnly() == false)
                return
            }
            #expect(try await store.confirmsCreateOnly())
            let name = "create-only/\(UInt64.random(in: 0...UInt64.max))"
            let first = ByteBuffer(string: "first body")
            try await store.put(name, data: first)
            await #expect { try await store.put(name, data: ByteBuffer(string: "another body")) } throws: {
                ($0 as? VDError)?.code == .alreadyExists
            }
            #expect(try await store.get(name) == first)
            try await store.put(name, data: first)
            // `replace` is the one way to change an object in place.
            try await store.replace(name, data: ByteBuffer(string: "replaced"))
            #expect(try await store.get(name) == ByteBuffer(string: "replaced"))
            // Uploads from a local file are create-only too.
            let file = FileManager.default.temporaryDirectory.appendingPathComponent(
                "vd-co-\(UInt64.random(in: 0...UInt64.max))")
            try Data("from a file".utf8).write(to: file)
            defer { try? FileManager.default.removeItem(at: file) }
            await #expect { try await store.put(name, contentsOf: file.path, length: 11) } throws: {
                ($0 as? VDError)?.code == .alreadyExists
            }
            let second = name + "-file"
            try await store.put(second, contentsOf: file.path, length: 11)
            try await store.put(second, contentsOf: file.path, length: 11)
            #expect(try await store.get(second) == ByteBuffer(string: "from a file"))
            #expect(try await store.list(prefix: "create-only/").count == 2)
        }
    }

    /// Compare-and-swap by create-only names (what ownership records need): of writers that read the same version,
    /// exactly one writes the next; old versions are pruned behind.
    @Test(arguments: StoreKind.underTest)
    func sequencedRecordCompareAndSwap(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            let record = SequencedRecord(store: store, prefix: "cas-\(UInt64.random(in: 0...UInt64.max))/owner/")
            if kind == .s3v2 || kind == .s3rclone {
                await #expect { try await record.write(ByteBuffer(string: "a"), after: nil) } throws: {
                    ($0 as? VDError)?.code == .unsupported
                }
                return
            }
            #expect(try await record.read() == nil)
            #expect(try await record.write(ByteBuffer(string: "node a 1"), after: nil) == 1)
            let one = try #require(try await record.read())
            #expect(one.version == 1 && one.data == ByteBuffer(string: "node a 1"))
            await #expect { try await record.write(ByteBuffer(string: "node b 1"), after: nil) } throws: {
                ($0 as? VDError)?.code == .conflict
            }
            #expect(try await record.write(ByteBuffer(string: "node a 2"), after: 1) == 2)
            await #expect { try await record.write(ByteBuffer(string: "node b 2"), after: 1) } throws: {
                ($0 as? VDError)?.code == .conflict
            }
            // Eight writers race from version 2: exactly one writes version 3, and the record holds its bytes.
            let outcomes = await withTaskGroup(of: (Int, Bool).self) { group in
                for index in 0..<8 {
                    group.addTask {
                        do {
                            _ = try await record.write(ByteBuffer(string: "racer \(index)"), after: 2)
                            return (index, true)
                        } catch {
                            return (index, false)
                        }
                    }
                }
                var all: [(Int, Bool)] = []
                for await outcome in group { all.append(outcome) }
                return all
            }
            let winners = outcomes.filter(\.1).map(\.0)
            #expect(winners.count == 1, "winners: \(winners)")
            let three = try #require(try await record.read())
            #expect(three.version == 3)
            if let winner = winners.first { #expect(three.data == ByteBuffer(string: "racer \(winner)")) }
            var newest: UInt64 = 3
            for step in 0..<6 {
                newest = try await record.write(ByteBuffer(string: "node a \(step + 4)"), after: newest)
            }
            try await record.prune(newest: newest)
            #expect(try await record.versions() == Array((newest - SequencedRecord.keptVersions)...newest))
            #expect(try await record.read()?.version == newest)
            // A stale writer (it last saw version 2) re-creates a pruned version: it must still lose.
            await #expect { try await record.write(ByteBuffer(string: "stale writer"), after: 2) } throws: {
                ($0 as? VDError)?.code == .conflict
            }
            #expect(try await record.read()?.version == newest)
        }
    }

    @Test(arguments: StoreKind.underTest)
    func verifyAccessSucceeds(kind: StoreKind) async throws {
        try await withStore(kind) { store in
            try await store.verifyAccess()
        }
    }
}

/// PUTs `names` (object i holds `testBytes(bytes, seed: i + 1000)`), at most `concurrency` at once.
func putMany(_ store: any ObjectStore, names: [String], bytes: Int, concurrency: Int = 32) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        for (index, name) in names.enumerated() {
            if index >= concurrency { try await group.next() }
            group.addTask { try await store.put(name, data: testBytes(bytes, seed: UInt64(index) + 1000)) }
        }
        try await group.waitForAll()
    }
}
