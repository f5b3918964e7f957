// Snapshots, rollback and the snapshot table of a volume.
//
// A snapshot is an epoch boundary: the request goes through the journal leader like a write, the leader seals the
// open SCO, and the snapshot covers every epoch up to the one just sealed. So every write replied before the request
// is in it and none issued after; it costs one roll whatever the volume's size.
//
// A rollback writes a rollback entry into the journal (so the TLogs, and any replay of them, carry it) and the map
// returns every cluster changed since the snapshot to its value at the snapshot. Snapshots taken after it go.
//
// The table lives in a local file (FLASH/NAME/snapshots, written atomically) and on the backend as versioned
// objects NAME/snapshots/<version>, uploaded by the uploader; a restore takes the newest and keeps the snapshots
// its TLogs reach.

import BlockMap
import FlashIO
import Logging
import NIOCore
import ObjectStore
import Synchronization
import TransactionLog
package import VolumeCore

final class SnapshotRequest: @unchecked Sendable {
    enum Kind {
        case create(name: String)
        case rollback(name: String)
    }
    let kind: Kind
    var result: Result<SnapshotRecord, VDError> = .failure(VDError(.shutdown, "the request was not processed"))
    init(_ kind: Kind) { self.kind = kind }
}

struct SnapshotState {
    var table: SnapshotTable
    var uploadedVersion: UInt64
}

extension Volume {
    static let snapshotTableFile = "snapshots"

    package var snapshotTable: SnapshotTable { snapshotState.withLock { $0.table } }

    func mapChanges() -> MapChanges {
        var changes = MapChanges(
            map: map, retainedEpochs: snapshotState.withLock { $0.table.retainedEpochs }, isClone: config.parent != nil)
        changes.scrubResults = scrubState.withLock { $0.results }
        changes.chunkClusters = options.mapChangeChunkClusters
        let tasks = env.tasks
        changes.failpoint = { tasks.failpoint($0) }
        return changes
    }

    // MARK: operations

    package func createSnapshot(named name: String) async throws(VDError) -> SnapshotRecord {
        try SnapshotTable.validateName(name)
        if snapshotTable.snapshot(named: name) != nil {
            throw VDError(.alreadyExists, "volume \(config.name) already has a snapshot named \(name)")
        }
        let request = SnapshotRequest(.create(name: name))
        try await submit(.snapshot(request))
        let record = try request.result.get()
        // A snapshot that was replied to survives power loss, so its epoch must be on stable storage.
        try await flush()
        logger.info("snapshot \(name) of \(config.name) taken at epoch \(record.epoch)")
        return record
    }

    package func rollback(toSnapshot name: String) async throws(VDError) -> SnapshotRecord {
        guard let target = snapshotTable.snapshot(named: name) else {
            throw VDError(.notFound, "volume \(config.name) has no snapshot named \(name)")
        }
        let blocking = snapshotTable.snapshots.filter { $0.epoch > target.epoch && !$0.clones.isEmpty }
        if !blocking.isEmpty {
            let clones = blocking.flatMap { snapshot in snapshot.clones.map { "\($0) (of \(snapshot.name))" } }
            throw VDError(
                .busy,
                "rolling \(config.name) back to \(name) would delete later snapshots that clones read through: \(clones.joined(separator: ", ")); delete those clones first"
            )
        }
        let request = SnapshotRequest(.rollback(name: name))
        try await submit(.snapshot(request))
        let record = try request.result.get()
        try await flush()
        logger.notice("volume \(config.name) rolled back to snapshot \(name) (epoch \(record.epoch))")
        return record
    }

    /// Removes a snapshot from the table. Frees nothing by itself: the scrubber reclaims what only it referenced.
    package func deleteSnapshot(named name: String) throws(VDError) {
        try updateTable { table throws(VDError) in
            guard let index = table.snapshots.firstIndex(where: { $0.name == name }) else {
                throw VDError(.notFound, "volume \(config.name) has no snapshot named \(name)")
            }
            let clones = table.snapshots[index].clones
            guard clones.isEmpty else {
                throw VDError(
                    .busy,
                    "snapshot \(name) of \(config.name) has clones: \(clones.joined(separator: ", ")); delete them first")
            }
            table.snapshots.remove(at: index)
        }
        startBackground { await $0.dropDeadHistory() }
    }

    /// Removes kept older cluster versions that no snapshot (nor rollback target) reads any more. They could never
    /// be read again; a replay of the TLogs would not keep them either.
    ///
    /// A snapshot taken while this runs is at or after the epoch open now, minus one; only versions superseded before
    /// that are dropped, so no such snapshot can need one.
    func dropDeadHistory() async {
        let openEpoch = writer.withLock { $0.openEpoch }
        let retained = snapshotTable.retainedEpochs
        do throws(VDError) {
            var drop: [(ClusterAddress, UInt64)] = []
            try map.forEachLiveVersion(snapshotEpochs: retained, { _, _, _ throws(VDError) in }) {
                address, value, successor throws(VDError) in
                if openEpoch > 0 && successor < openEpoch - 1 { drop.append((address, value.epoch)) }
            }
            for start in stride(from: 0, to: drop.count, by: 65536) {
                var update = MapUpdate()
                update.dropHistory = Array(drop[start..<min(start + 65536, drop.count)])
                try map.apply(update)
            }
            if !drop.isEmpty { logger.info("dropped \(drop.count) cluster version(s) no snapshot reads any more") }
        } catch {
            logger.warning("cannot drop unread cluster versions: \(error)")
        }
    }

    /// Records that `clone` reads through snapshot `name` (or no longer does).
    package func setClone(_ clone: String, ofSnapshot name: String, present: Bool) throws(VDError) {
        try updateTable { table throws(VDError) in
            guard let index = table.snapshots.firstIndex(where: { $0.name == name }) else {
                throw VDError(.notFound, "volume \(config.name) has no snapshot named \(name)")
            }
            table.snapshots[index].clones.removeAll { $0 == clone }
            if present { table.snapshots[index].clones.append(clone) }
        }
    }

    // MARK: leader side

    /// Runs a snapshot request inside the journal leader (after `pending` writes were committed).
    func performSnapshotRequest(_ request: SnapshotRequest) async throws(VDError) {
        switch request.kind {
        case .create(let name):
            // The table first (the snapshot ends the epoch open now), then a snapshot entry in that epoch's journal,
            // then the roll that seals it: the epoch's TLog records the snapshot and is uploaded only after this
            // table version. If the entry or the roll fails, the snapshot is taken out of the table again.
            try await makeRoomForEntries()
            let epoch = journal.epoch
            var created: SnapshotRecord?
            do {
                try updateTable { table throws(VDError) in
                    guard table.snapshot(named: name) == nil else {
                        throw VDError(.alreadyExists, "volume \(config.name) already has a snapshot named \(name)")
                    }
                    let record = SnapshotRecord(id: table.nextID, name: name, epoch: epoch, createdAt: env.clock.wallNow())
                    table.nextID += 1
                    table.snapshots.append(record)
                    created = record
                }
            } catch {
                request.result = .failure(error)
                return
            }
            do {
                try await writeEntries([.snapshot(snapshotID: created!.id)])
                try await roll()
                precondition(journal.epoch == epoch + 1, "a snapshot must end its epoch")
                request.result = .success(created!)
            } catch {
                try? updateTable { table throws(VDError) in table.snapshots.removeAll { $0.id == created!.id } }
                throw error
            }
        case .rollback(let name):
            guard let target = snapshotTable.snapshot(named: name) else {
                request.result = .failure(VDError(.notFound, "volume \(config.name) has no snapshot named \(name)"))
                return
            }
            // The table first: if the journal entry never lands, the table only keeps more history than needed.
            let at = journal.epoch
            try updateTable { table throws(VDError) in
                table.snapshots.removeAll { $0.epoch > target.epoch }
                table.rollbacks.append(RollbackRecord(atEpoch: at, toEpoch: target.epoch))
            }
            try await writeEntries([.rollback(toEpoch: target.epoch)])
            try await roll()
            request.result = .success(target)
        }
    }

    /// Changes the table, saves it locally (atomically, durably) and queues it for upload.
    func updateTable(_ change: (inout SnapshotTable) throws(VDError) -> Void) throws(VDError) {
        try snapshotState.withLock { (state) throws(VDError) in
            var table = state.table
            try change(&table)
            table.version += 1
            try Self.saveTable(table, layout: layout, fs: env.fs)
            state.table = table
        }
        wakeUploaderForTable()
    }

    static func saveTable(_ table: SnapshotTable, layout: VolumeLayout, fs: any FileSystem) throws(VDError) {
        try MetadataRecord.encode(table, kind: .snapshotTable).withUnsafeReadableBytes { (raw) throws(VDError) in
            try fs.replaceDurably(directory: layout.flashDirectory, name: snapshotTableFile, with: raw)
        }
    }

    static func loadLocalTable(layout: VolumeLayout, fs: any FileSystem) throws(VDError) -> SnapshotTable? {
        let path = layout.flashDirectory + "/" + snapshotTableFile
        guard let bytes = try fs.readWholeFile(path) else { return nil }
        return try MetadataRecord.decode(SnapshotTable.self, from: ByteBuffer(bytes: bytes), kind: .snapshotTable, what: path)
    }

    /// Uploads the table if it changed since the last upload, then removes older copies (keeping one).
    func uploadTableIfNeeded() async -> Bool {
        let (table, uploaded) = snapshotState.withLock { ($0.table, $0.uploadedVersion) }
        guard table.version > uploaded else { return true }
        do throws(VDError) {
            let object = layout.snapshotsPrefix + SCONumber(table.version).hex
            try await backend.put(object, data: try MetadataRecord.encode(table, kind: .snapshotTable))
            snapshotState.withLock { $0.uploadedVersion = max($0.uploadedVersion, table.version) }
            let old = try await backend.list(prefix: layout.snapshotsPrefix).map(\.name).sorted().dropLast(2)
            for name in old { try await backend.delete(name) }
            return true
        } catch {
            logger.warning("cannot upload the snapshot table of \(config.name): \(error); retrying")
            return false
        }
    }
}

/// Space figures of a volume, from its map and epoch records.
package struct VolumeSpace: Sendable {
    /// Bytes of SCOs written over the volume's life.
    package var writtenBytes: UInt64
    /// Bytes of clusters the volume reads now plus those only its snapshots read.
    package var referencedBytes: UInt64
    package var epochBytes: [(epoch: UInt64, bytes: UInt64)]
}

extension Volume {
    /// Bytes written in each sealed epoch, from metadata the sealing keeps (no map scan: cheap at any size).
    package func epochBytes() throws(VDError) -> [(epoch: UInt64, bytes: UInt64)] {
        var epochs: [(epoch: UInt64, bytes: UInt64)] = []
        for (key, value) in try map.metadata(withPrefix: "epoch-bytes-") {
            guard let sco = SCONumber(hex: key.dropFirst("epoch-bytes-".count)), let bytes = value.littleEndianUInt64
            else { continue }
            epochs.append((sco.rawValue, bytes))
        }
        return epochs
    }

    /// Written, referenced (a scan of every live cluster version: proportional to the data) and per-epoch space.
    package func space() throws(VDError) -> VolumeSpace {
        let epochs = try epochBytes()
        var scrubBytes: UInt64 = 0
        for (_, value) in try map.metadata(withPrefix: "scrub-sco-bytes-") { scrubBytes += value.littleEndianUInt64 ?? 0 }
        var live: UInt64 = 0
        try map.forEachLiveVersion(snapshotEpochs: snapshotTable.snapshots.map(\.epoch)) { _, _, _ throws(VDError) in live += 1 }
        let open = writer.withLock { $0.openJournalBytes }
        return VolumeSpace(
            writtenBytes: epochs.reduce(open + scrubBytes) { $0 + $1.1 },
            referencedBytes: live * UInt64(clusterBytes), epochBytes: epochs)
    }
}
