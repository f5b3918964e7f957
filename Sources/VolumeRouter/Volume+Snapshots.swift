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

extension Volume {
    package var snapshotTable: SnapshotTable { catalog.table }

    // MARK: operations

    package func createSnapshot(named name: String) async throws(VDError) -> SnapshotRecord {
        try checkOwnership()
        try SnapshotTable.validateName(name)
        if snapshotTable.snapshot(named: name) != nil {
            throw VDError(.alreadyExists, "volume \(config.name) already has a snapshot named \(name)")
        }
        let catalog = self.catalog
        let volume = config.name
        let now = env.clock.wallNow()
        let created = Mutex<SnapshotRecord?>(nil)
        try await journal.exclusive { (leader) throws(VDError) in
            // The table first (the snapshot ends the epoch open now), then a snapshot entry in that epoch's
            // journal, then the roll that seals it: the epoch's TLog records the snapshot and is uploaded only after
            // this table version. If the entry or the roll fails, the snapshot is taken out of the table again.
            try await leader.makeRoomForEntries()
            let epoch = leader.epoch
            var record: SnapshotRecord?
            try catalog.update { table throws(VDError) in
                guard table.snapshot(named: name) == nil else {
                    throw VDError(.alreadyExists, "volume \(volume) already has a snapshot named \(name)")
                }
                record = SnapshotRecord(id: table.nextID, name: name, epoch: epoch, createdAt: now)
                table.nextID += 1
                table.snapshots.append(record!)
            }
            do throws(VDError) {
                try await leader.writeEntries([.snapshot(snapshotID: record!.id)])
                try await leader.roll()
                precondition(leader.epoch == epoch + 1, "a snapshot must end its epoch")
                created.withLock { $0 = record }
            } catch {
                try? catalog.update { table throws(VDError) in table.snapshots.removeAll { $0.id == record!.id } }
                throw error
            }
        }
        guard let record = created.withLock({ $0 }) else { throw VDError(.shutdown, "the snapshot was not taken") }
        // A snapshot that was replied to survives power loss, so its epoch must be on stable storage.
        try await flush()
        logger.info("snapshot \(name) of \(config.name) taken at epoch \(record.epoch)")
        return record
    }

    package func rollback(toSnapshot name: String) async throws(VDError) -> SnapshotRecord {
        try checkOwnership()
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
        let catalog = self.catalog
        let volume = config.name
        try await journal.exclusive { (leader) throws(VDError) in
            guard let target = catalog.table.snapshot(named: name) else {
                throw VDError(.notFound, "volume \(volume) has no snapshot named \(name)")
            }
            // The table first: if the journal entry never lands, the table only keeps more history than needed. Room
            // first, so the entry lands in the epoch the table names (a roll to make room would move it to the next).
            try await leader.makeRoomForEntries()
            let at = leader.epoch
            try catalog.update { table throws(VDError) in
                // Checked again here: a clone of another router may have been recorded meanwhile (not under the
                // lifecycle lock), and its snapshot must not go.
                let blocking = table.snapshots.filter { $0.epoch > target.epoch && !$0.clones.isEmpty }
                guard blocking.isEmpty else {
                    throw VDError(
                        .busy,
                        "rolling \(volume) back to \(name) would delete later snapshots that clones read through: \(blocking.flatMap(\.clones).joined(separator: ", ")); delete those clones first"
                    )
                }
                table.snapshots.removeAll { $0.epoch > target.epoch }
                table.rollbacks.append(RollbackRecord(atEpoch: at, toEpoch: target.epoch))
            }
            try await leader.writeEntries([.rollback(toEpoch: target.epoch)])
            try await leader.roll()
        }
        try await flush()
        logger.notice("volume \(config.name) rolled back to snapshot \(name) (epoch \(target.epoch))")
        return target
    }

    /// Removes a snapshot from the table. Frees nothing by itself: the scrubber reclaims what only it referenced.
    package func deleteSnapshot(named name: String) throws(VDError) {
        try checkOwnership()
        try catalog.update { table throws(VDError) in
            guard let index = table.snapshots.firstIndex(where: { $0.name == name }) else {
                throw VDError(.notFound, "volume \(config.name) has no snapshot named \(name)")
            }
            let clones = table.snapshots[index].clones
            guard clones.isEmpty else {
                throw VDError(
                    .busy,
                    "snapshot \(name) of \(config.name) has clones: \(clones.joined(separator: ", ")); delete them first"
                )
            }
            table.snapshots.remove(at: index)
        }
        startBackground { await $0.dropDeadHistory() }
    }

    /// Removes kept older cluster versions that no snapshot (nor rollback target) reads any more. They could never
    /// be read again; a replay of the TLogs would not keep them either.
    ///
    /// Read from one consistent view of the map (writes go on meanwhile). A snapshot taken while this runs is at or
    /// after the epoch open now, minus one; only versions superseded before that are dropped, so no such snapshot can
    /// need one.
    func dropDeadHistory() async {
        env.tasks.failpoint("drop-dead-history")
        let openEpoch = journal.openEpoch
        let retained = snapshotTable.retainedEpochs
        do throws(VDError) {
            var drop: [(ClusterAddress, UInt64)] = []
            var dropped = 0
            try map.forEachLiveVersion(snapshotEpochs: retained, { _, _, _ throws(VDError) in }) {
                address, value, successor throws(VDError) in
                // No successor (`.max`): the cluster has no current key, so nothing reads its history any more.
                guard successor == .max || (openEpoch > 0 && successor < openEpoch - 1) else { return }
                drop.append((address, value.epoch))
                if drop.count == 65536 {
                    var update = MapUpdate()
                    update.dropHistory = drop
                    try map.apply(update)
                    dropped += drop.count
                    drop = []
                }
            }
            var update = MapUpdate()
            update.dropHistory = drop
            try map.apply(update)
            dropped += drop.count
            if dropped > 0 { logger.info("dropped \(dropped) cluster version(s) no snapshot reads any more") }
        } catch {
            logger.warning("cannot drop unread cluster versions: \(error)")
        }
    }

    /// Records that `clone` reads through snapshot `name` (or no longer does).
    package func setClone(_ clone: String, ofSnapshot name: String, present: Bool) throws(VDError) {
        // Registering protects a snapshot, so it needs the lease; forgetting a deleted clone does not (the table
        // reaches the backend only under a valid lease anyway).
        if present { try checkOwnership() }
        try catalog.update { table throws(VDError) in
            guard let index = table.snapshots.firstIndex(where: { $0.name == name }) else {
                throw VDError(.notFound, "volume \(config.name) has no snapshot named \(name)")
            }
            table.snapshots[index].clones.removeAll { $0 == clone }
            if present { table.snapshots[index].clones.append(clone) }
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
        for (_, value) in try map.metadata(withPrefix: "scrub-sco-bytes-") {
            scrubBytes += value.littleEndianUInt64 ?? 0
        }
        var live: UInt64 = 0
        try map.forEachLiveVersion(snapshotEpochs: snapshotTable.snapshots.map(\.epoch)) { _, _, _ throws(VDError) in
            live += 1
        }
        let open = journal.openJournalBytes
        return VolumeSpace(
            writtenBytes: epochs.reduce(open + scrubBytes) { $0 + $1.1 },
            referencedBytes: live * UInt64(clusterBytes), epochBytes: epochs)
    }
}
