import Foundation
import NIOCore
import ObjectStore
import Synchronization
import Testing
import VolumeCore

@testable import VolumeRouter

/// A taker trusts the peer only if the volume's DTL record says `in_sync`. So a record PUT that the client gave up on
/// (a timeout) and that the store applies only after a later `degraded` record must not bring `in_sync` back. Each
/// test replays a store write exactly as it was first made, after newer records, as such a late PUT would arrive.
@Suite struct DTLRecordVersionTests {
    /// Forwards to a store and keeps every write made through it, to make it again later.
    final class CapturingStore: ObjectStore {
        enum Write: Sendable {
            case put(String, ByteBuffer)
            case replace(String, ByteBuffer)
        }
        let wrapped = MemoryStore()
        let writes = Mutex<[Write]>([])

        var description: String { "capturing " + wrapped.description }
        func confirmsCreateOnly() async throws(VDError) -> Bool { true }
        func put(_ name: String, data: ByteBuffer) async throws(VDError) {
            writes.withLock { $0.append(.put(name, data)) }
            try await wrapped.put(name, data: data)
        }
        func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
            writes.withLock { $0.append(.replace(name, data)) }
            try await wrapped.replace(name, data: data)
        }
        func get(_ name: String) async throws(VDError) -> ByteBuffer { try await wrapped.get(name) }
        func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
            try await wrapped.get(name, range: range)
        }
        func head(_ name: String) async throws(VDError) -> ObjectInfo? { try await wrapped.head(name) }
        func list(prefix: String) async throws(VDError) -> [ObjectInfo] { try await wrapped.list(prefix: prefix) }
        func delete(_ name: String) async throws(VDError) { try await wrapped.delete(name) }
        func verifyAccess() async throws(VDError) {}

        /// The writes made since `count` writes had been made.
        func writes(since count: Int) -> [Write] { writes.withLock { Array($0[count...]) } }
        var writeCount: Int { writes.withLock { $0.count } }

        /// Makes `write` again, as a late delivery of the original request: a create-only PUT the store refuses
        /// (the version exists with other bytes) changes nothing, as on a real store.
        func replay(_ write: Write) async throws(VDError) {
            switch write {
            case .put(let name, let data):
                do {
                    try await wrapped.put(name, data: data)
                } catch  where error.code == .alreadyExists {}
            case .replace(let name, let data): try await wrapped.replace(name, data: data)
            }
        }
    }

    let layout = VolumeLayout(flashDirectory: "/unused", namespace: "vol")

    func record(_ state: DTLState, at seconds: Double = 0) -> DTLRecord {
        DTLRecord(
            mode: .sync, peer: "b", state: state, generation: 3, changedAt: Date(timeIntervalSince1970: seconds),
            storedThrough: 7)
    }

    @Test func aLatePutOfAnInSyncRecordNeverReplacesALaterDegradedOne() async throws {
        let store = CapturingStore()
        try await record(.inSync).write(layout: layout, backend: store)
        let before = store.writeCount
        try await record(.inSync, at: 1).write(layout: layout, backend: store)
        let late = store.writes(since: before)
        #expect(!late.isEmpty)
        try await record(.degraded, at: 2).write(layout: layout, backend: store)
        for write in late { try await store.replay(write) }
        #expect(try await DTLRecord.load(layout: layout, backend: store)?.state == .degraded)

        // Also once the late version number was pruned: the PUT creates it again, and an older version is ignored.
        for second in 3..<(3 + Int(SequencedRecord.keptVersions) + 2) {
            try await record(.degraded, at: Double(second)).write(layout: layout, backend: store)
        }
        for write in late { try await store.replay(write) }
        let loaded = try await DTLRecord.load(layout: layout, backend: store)
        #expect(loaded?.state == .degraded)
        #expect(loaded?.changedAt == Date(timeIntervalSince1970: Double(3 + SequencedRecord.keptVersions + 1)))
        // Pruned behind the writer: a few versions are kept, not all.
        let kept = try await store.list(prefix: layout.dtlRecordPrefix).count
        #expect(kept <= Int(SequencedRecord.keptVersions) + 2)
    }

    @Test func aRecordFromBeforeVersionsIsReadUntilTheFirstVersionReplacesIt() async throws {
        let store = CapturingStore()
        #expect(try await DTLRecord.load(layout: layout, backend: store) == nil)
        try await store.replace(
            layout.legacyDTLObject, data: try MetadataRecord.encode(record(.inSync), kind: .dtlRecord))
        #expect(try await DTLRecord.load(layout: layout, backend: store) == record(.inSync))
        try await record(.degraded, at: 1).write(layout: layout, backend: store)
        #expect(try await DTLRecord.load(layout: layout, backend: store) == record(.degraded, at: 1))
        #expect(try await store.head(layout.legacyDTLObject) == nil)
    }

    @Test func aDamagedRecordIsRefusedNotReplacedByAnOlderOne() async throws {
        let store = CapturingStore()
        try await record(.inSync).write(layout: layout, backend: store)
        try await record(.degraded, at: 1).write(layout: layout, backend: store)
        let newest = try #require(try await store.list(prefix: layout.dtlRecordPrefix).last?.name)
        var bytes = try await store.get(newest)
        let flipped = bytes.getInteger(at: bytes.readerIndex + 20, as: UInt8.self)! ^ 0xFF
        bytes.setInteger(flipped, at: bytes.readerIndex + 20)
        try await store.delete(newest)
        try await store.put(newest, data: bytes)
        let error = await #expect(throws: VDError.self) { try await DTLRecord.load(layout: layout, backend: store) }
        #expect(error?.code == .corrupt)
    }
}
