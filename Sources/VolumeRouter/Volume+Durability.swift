// The volume's side of the journal: the map kept in step with every batch and roll (JournalDelegate), flushes
// (GroupCommit), and seals.
//
// Seal: after a roll, the old journal is fdatasynced, read back and verified end to end (every header and payload
// CRC: what goes to the backend, and the CRC its TLog records, are what flash really holds), its TLog written
// (temporary file, fsync, rename), the file trimmed to its length, the map persisted when enough was sealed since
// the last time, and the epoch queued for upload.

import BlockMap
import FlashIO
import Logging
import NIOCore
import SCOCache
import Synchronization
import TransactionLog
package import VolumeCore

extension Volume: JournalDelegate {
    func journalCommitted(
        _ batches: [PendingBatches.Batch], epoch: UInt64, sco: SCONumber, start: MapCheckpoint, end: MapCheckpoint
    ) throws(VDError) {
        var changes = mapChanges()
        changes.dirtyCheckpoint = start.dirty(until: end.offset)
        for batch in batches {
            try changes.add(
                entries: batch.header.entries, sco: sco, epoch: epoch,
                payloadOffset: batch.header.offset + UInt64(SCOFormat.blockBytes), clusterBytes: clusterBytes)
        }
        try changes.finish(checkpoint: end)
    }

    func journalRolled(epoch: UInt64, sco: SCONumber, file: FlashFile, checkpoint: MapCheckpoint) throws(VDError) {
        let next = journal.state.sco
        uploader.journalCreated(next)
        cache.add(cacheKey(next), file: journal.state.file, footprintBytes: options.scoSizeBytes)
        var update = MapUpdate()
        update.metadata.append((MapCheckpoint.key, checkpoint.encode()))
        try map.apply(update)
        env.tasks.failpoint("roll-after-checkpoint")
        let tableVersion = catalog.table.version
        startBackground { volume in await volume.seal(sco, epoch: epoch, file: file, tableVersion: tableVersion) }
    }
}

extension Volume {
    package func flush() async throws(VDError) {
        let start = env.clock.now()
        do {
            try checkOwnership()
            if let mirror = journal.mirror {
                // The peer's sync and the local fdatasync run at once: a flush costs the slower of the two.
                async let peer: Void = mirror.flush()
                try await flusher.flush()
                await peer
                try mirror.checkRecorded()
            } else {
                try await flusher.flush()
            }
            try checkOwnership()
        } catch {
            metrics.flush.record(since: start, now: env.clock.now(), failed: true)
            throw error
        }
        metrics.flush.record(since: start, now: env.clock.now())
    }

    /// The volume's metrics.
    var metrics: VolumeMetrics { journal.metrics }

    /// Stops writes for good after a failure that may have lost acknowledged data on local flash.
    func markFailed(_ error: VDError) { journal.markFailed(error) }

    /// Runs blocking file work off the cooperative threads (the router's I/O thread pool).
    func blocking<T: Sendable>(_ body: @escaping @Sendable () throws(VDError) -> T) async throws(VDError) -> T {
        try await env.tasks.blocking(body)
    }

    /// Seals a rolled journal (see the file comment) and queues it for upload. `tableVersion`: the snapshot table
    /// version the epoch's TLog may depend on (uploaded before it).
    func seal(_ sco: SCONumber, epoch: UInt64, file: FlashFile, tableVersion: UInt64) async {
        let config = self.config
        let layout = self.layout
        let map = self.map
        let fs = env.fs
        let clock = env.clock
        let metrics = self.metrics
        let sealStart = clock.now()
        do {
            let length = try await blocking { () throws(VDError) -> UInt64 in
                let start = clock.now()
                try file.dataSync()
                metrics.fdatasync.record(since: start, now: clock.now())
                let scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes)
                guard scan.isSealed, scan.header.epoch == epoch else {
                    throw VDError(
                        .corrupt,
                        "SCO \(sco.hex) of volume \(config.name) does not verify up to its seal marker (\(file.path)): local flash returned different data than was written"
                    )
                }
                let tlog = TLog(
                    volumeID: config.id, number: SCONumber(epoch), clusterSizeBytes: config.clusterSizeBytes,
                    records: scan.tlogRecords())
                try TLogFiles.write(tlog, directory: layout.tlogDirectory, fs: fs)
                try file.truncate(to: scan.validLength)
                file.dropCache()
                var update = MapUpdate()
                update.metadata.append((MapChanges.epochBytesKey(sco), [UInt8](littleEndian64: scan.validLength)))
                try map.apply(update)
                return scan.validLength
            }
            // The map is persisted (a RocksDB memtable flush) every `mapPersistBytes` of sealed journal or every
            // `mapPersistSeconds`, not at every seal: each flush makes a small SST file whose compaction cost more
            // CPU than anything else on the write path (a third of it with sequential writes). Nothing depends on it
            // for safety: RocksDB may flush any prefix of the updates on its own, and recovery replays from the
            // checkpoint the persisted map holds (local journals, else TLogs); this only bounds that replay.
            let now = clock.now()
            let persistDue = mapPersist.withLock { state -> Bool in
                state.bytes += length
                guard
                    state.bytes >= options.mapPersistBytes
                        || state.at.duration(to: now) >= .seconds(double: options.mapPersistSeconds)
                else { return false }
                state = (0, now)
                return true
            }
            if persistDue { try await blocking { () throws(VDError) in try map.persist() } }
            metrics.seal.record(since: sealStart, now: clock.now())
            journal.tlogWritten(epoch)
            journal.sealedFile(file)
            cache.sealed(cacheKey(sco), footprintBytes: length)
            uploader.queue(
                epoch: SCONumber(epoch), SealedEpoch(sco: sco, lengthBytes: length, tableVersion: tableVersion))
        } catch {
            markFailed(VDError(error.code, "cannot seal SCO \(sco.hex) of volume \(config.name): \(error.message)"))
        }
    }
}
