// Opening a volume: recovery after a clean stop, a kill -9, a power loss, or the loss of the local flash directory.
//
// The volume's history is a sequence of epochs. An epoch is known from its TLog (local file, else the backend
// object) or, for epochs that were not sealed yet, from a scan of its local journal. Recovery:
//  1. walks the epochs from the first: TLog epochs are complete; a journal is scanned to its longest valid prefix;
//     the walk ends at the first journal without a seal marker (the open journal at the crash) or at a gap;
//  2. checks the map's checkpoint against that history: a map ahead of the durable journal (possible after a power
//     loss) is rebuilt from scratch rather than trusted;
//  3. replays every epoch from the checkpoint into the map (TLogs, then journal batches);
//  4. seals every journal it scanned (the last at its valid prefix), writes their TLogs, moves files beyond the end
//     of the history aside (never deletes them), and starts a new journal with a number never used before;
//  5. queues the sealed epochs the backend does not have yet for upload.
// With no local flash at all this is a restart from the backend: every TLog comes from the backend.

import BlockMap
package import FlashIO
package import Logging
import NIOCore
import NIOPosix
package import ObjectStore
import Scrubber
package import SCOCache
import Synchronization
import TransactionLog
package import VolumeCore

extension Volume {
    /// Opens (recovering as needed) a volume. `progress` receives human-readable progress of long rebuilds.
    package static func open(
        config: VolumeConfig, layout: VolumeLayout, options: VolumeOptions, backend: any ObjectStore, cache: FlashCache,
        env: Environment, logger: Logger, parent: Volume? = nil,
        progress: @escaping @Sendable (String) -> Void = { _ in }
    ) async throws(VDError) -> Volume {
        try options.validate()
        if let link = config.parent {
            guard let parent, parent.name == link.volume else {
                throw VDError(
                    .notFound,
                    "volume \(config.name) is a clone of \(link.volume)@\(link.snapshot), which is not open on this router (attach it first)")
            }
            guard parent.snapshotTable.snapshot(named: link.snapshot)?.epoch == link.epoch else {
                throw VDError(
                    .corrupt, "volume \(config.name) reads through \(link.volume)@\(link.snapshot), which no longer exists")
            }
        }
        let fs = env.fs
        try fs.makeDirectories(layout.scoDirectory)
        try fs.makeDirectories(layout.tlogDirectory)
        // Fetched backend data is tracked in memory only: start empty.
        try fs.removeTree(layout.fetchedDirectory)
        try fs.makeDirectories(layout.fetchedDirectory)
        let hadMap = env.keyValueStores.exists(path: layout.mapDirectory)
        var database = try env.keyValueStores.open(path: layout.mapDirectory)
        do {
            var recovery = Recovery(
                config: config, layout: layout, options: options, backend: backend, env: env, logger: logger,
                progress: progress)
            try await recovery.discover()
            try await recovery.loadSnapshots()
            try await recovery.loadScrubResults()
            var map = BlockMap(database: database, cacheEntries: options.mapCacheEntries)
            if try !recovery.checkpointIsTrustworthy(map: map, hadMap: hadMap) {
                if hadMap { logger.warning("the map of volume \(config.name) is ahead of its durable journal; rebuilding it") }
                database.close()
                try env.keyValueStores.destroy(path: layout.mapDirectory)
                database = try env.keyValueStores.open(path: layout.mapDirectory)
                map = BlockMap(database: database, cacheEntries: options.mapCacheEntries)
            }
            try await recovery.replay(into: map)
            let journal = try await recovery.sealAndStartJournal(map: map)
            let (storedThrough, pending) = recovery.uploadState()
            var unstored = UInt64(SCOFormat.blockBytes)
            for (_, length) in pending { unstored += length }
            let volume = Volume(
                config: config, layout: layout, options: options, backend: backend, cache: cache, map: map, env: env,
                logger: logger, journal: journal, storedThrough: storedThrough, unstoredBytes: unstored,
                snapshots: recovery.snapshots, snapshotsUploadedVersion: recovery.snapshotsUploadedVersion,
                parent: parent.map { ($0, config.parent!.epoch) })
            recovery.registerCache(cache, volume: volume, storedThrough: storedThrough)
            cache.add(volume.cacheKey(journal.sco), file: journal.file, footprintBytes: options.scoSizeBytes)
            volume.uploads.withLock { state in
                for (sco, length) in pending { state.sealed[sco] = length }
            }
            volume.scrubState.withLock { $0.results = recovery.scrubResults }
            volume.startBackground { await $0.uploadLoop() }
            volume.startBackground { await $0.ageLoop() }
            volume.startBackground { await $0.scrubLoop() }
            cache.evictIfNeeded()
            return volume
        } catch {
            database.close()
            throw error
        }
    }
}

/// The state of one recovery (see the file comment).
struct Recovery {
    let config: VolumeConfig
    let layout: VolumeLayout
    let options: VolumeOptions
    let backend: any ObjectStore
    let env: Environment
    let logger: Logger
    let progress: @Sendable (String) -> Void

    var localSCOs: [SCONumber] = []
    var localTLogs: Set<SCONumber> = []
    var backendTLogs: Set<SCONumber> = []
    var highestNumberSeen = SCONumber(0)
    var firstEpoch: SCONumber?
    /// The last epoch of the history (nil: the volume has none).
    var lastEpoch: SCONumber?
    /// Scans of local journals without a TLog, up to `lastEpoch`.
    var scans: [SCONumber: JournalScan] = [:]
    var checkpoint: MapCheckpoint?
    var sealedNow: [SCONumber: UInt64] = [:]
    var snapshots = SnapshotTable()
    var snapshotsUploadedVersion: UInt64 = 0
    var scrubResults: [UInt64: ScrubResult] = [:]

    init(
        config: VolumeConfig, layout: VolumeLayout, options: VolumeOptions, backend: any ObjectStore, env: Environment,
        logger: Logger, progress: @escaping @Sendable (String) -> Void
    ) {
        self.config = config
        self.layout = layout
        self.options = options
        self.backend = backend
        self.env = env
        self.logger = logger
        self.progress = progress
    }

    /// Step 1: what exists locally and on the backend, and where the history ends.
    mutating func discover() async throws(VDError) {
        localSCOs = VolumeLayout.numbers(inFiles: try env.fs.listDirectory(layout.scoDirectory), suffix: ".sco")
        localTLogs = Set(VolumeLayout.numbers(inFiles: try env.fs.listDirectory(layout.tlogDirectory), suffix: ".tlog"))
        let tlogNames = try await backend.list(prefix: layout.tlogPrefix).map(\.name)
        let scoNames = try await backend.list(prefix: layout.scoPrefix).map(\.name)
        backendTLogs = Set(VolumeLayout.numbers(in: tlogNames, prefix: layout.tlogPrefix))
        // SCOs written by scrubs have numbers of their own (top bit set): they take no part in the epoch sequence.
        let backendSCOs = VolumeLayout.numbers(in: scoNames, prefix: layout.scoPrefix).filter { !ScrubResult.isScrubSCO($0) }
        let all = localSCOs + Array(localTLogs) + Array(backendTLogs) + backendSCOs
        highestNumberSeen = all.max() ?? SCONumber(0)
        firstEpoch = (localSCOs + Array(localTLogs) + Array(backendTLogs)).min()
        guard var epoch = firstEpoch else { return }
        let localSCOSet = Set(localSCOs)
        while true {
            if localTLogs.contains(epoch) || (backendTLogs.contains(epoch) && !localSCOSet.contains(epoch)) {
                lastEpoch = epoch
                epoch = epoch.next
                continue
            }
            guard localSCOSet.contains(epoch) else { break }
            let scan: JournalScan
            do throws(VDError) {
                let file = try env.fs.open(layout.scoPath(epoch), options: .readOnly)
                defer { file.close() }
                scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: epoch, clusterSizeBytes: config.clusterSizeBytes)
            } catch where error.code == .corrupt {
                // A journal whose header never became durable: it holds nothing.
                logger.warning("ignoring SCO file \(layout.scoPath(epoch)): \(error.message)")
                break
            }
            scans[epoch] = scan
            lastEpoch = epoch
            if !scan.isSealed { break }
            epoch = epoch.next
        }
        if let lastEpoch {
            let beyond = localSCOs.filter { $0 > lastEpoch } + localTLogs.filter { $0 > lastEpoch }
            if !beyond.isEmpty {
                logger.warning(
                    "volume \(config.name): local files past the end of its history (epoch \(lastEpoch.hex)) are moved aside: \(beyond.map(\.hex))"
                )
            }
        }
    }

    /// The snapshot table: the local copy, else the backend's newest; snapshots past the history are dropped.
    mutating func loadSnapshots() async throws(VDError) {
        if let local = try Volume.loadLocalTable(layout: layout, fs: env.fs) {
            snapshots = local
        } else if let remote = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: backend) {
            snapshots = remote
            snapshotsUploadedVersion = remote.version
        }
        let last = lastEpoch?.rawValue ?? 0
        let beyond = snapshots.snapshots.filter { $0.epoch > last }
        if !beyond.isEmpty {
            logger.warning(
                "volume \(config.name): snapshots past the end of its history are dropped: \(beyond.map(\.name).joined(separator: ", "))")
            snapshots.snapshots.removeAll { $0.epoch > last }
            snapshots.version += 1
        }
        try Volume.saveTable(snapshots, layout: layout, fs: env.fs)
    }

    /// Every scrub result of the namespace (the history may apply any of them).
    mutating func loadScrubResults() async throws(VDError) {
        scrubResults = try await Volume.loadScrubResults(layout: layout, backend: backend, volumeID: config.id).results
    }

    /// Step 2: the map may be reused only if its checkpoint lies within the durable history.
    mutating func checkpointIsTrustworthy(map: BlockMap, hadMap: Bool) throws(VDError) -> Bool {
        guard hadMap else { return false }
        guard let raw = try map.metadata(MapCheckpoint.key), let checkpoint = MapCheckpoint.decode(raw) else {
            return false
        }
        guard let lastEpoch else { return checkpoint.offset <= UInt64(SCOFormat.blockBytes) }
        if checkpoint.sco > lastEpoch.next { return false }
        if checkpoint.sco == lastEpoch.next {
            guard checkpoint.offset <= UInt64(SCOFormat.blockBytes) else { return false }
        } else if let scan = scans[checkpoint.sco], checkpoint.offset > UInt64(SCOFormat.blockBytes) {
            let boundary = scan.batches.contains { batch in
                batch.payloadOffset + UInt64(batch.header.payloadClusters * Int(config.clusterSizeBytes)) == checkpoint.offset
                    && batch.storedCRC == checkpoint.chainCRC
            }
            guard boundary else { return false }
        }
        self.checkpoint = checkpoint
        return true
    }

    /// Step 3: replays every epoch from the checkpoint (or the first) through the last into the map.
    func replay(into map: BlockMap) async throws(VDError) {
        guard let lastEpoch, var epoch = checkpoint?.sco ?? firstEpoch else { return }
        var startOffset = checkpoint?.offset ?? 0
        let total = lastEpoch.rawValue >= epoch.rawValue ? lastEpoch.rawValue - epoch.rawValue + 1 : 0
        var done: UInt64 = 0
        var lastReport = env.clock.now()
        while epoch <= lastEpoch {
            var changes = MapChanges(
                map: map, retainedEpochs: snapshots.retainedEpochs, isClone: config.parent != nil)
            changes.scrubResults = scrubResults
            if let scan = scans[epoch] {
                for batch in scan.batches where batch.offset >= startOffset {
                    try changes.add(
                        entries: batch.header.entries, sco: epoch, payloadOffset: batch.payloadOffset,
                        clusterBytes: Int(config.clusterSizeBytes))
                    let end = batch.payloadOffset + UInt64(batch.header.payloadClusters * Int(config.clusterSizeBytes))
                    try changes.finish(checkpoint: MapCheckpoint(sco: epoch, offset: end, chainCRC: batch.storedCRC))
                }
                if scan.isSealed { try changes.finish(checkpoint: MapCheckpoint(sco: epoch.next, offset: 0, chainCRC: 0)) }
            } else {
                try changes.add(tlog: try await loadTLog(epoch))
                try changes.finish(checkpoint: MapCheckpoint(sco: epoch.next, offset: 0, chainCRC: 0))
            }
            done += 1
            let now = env.clock.now()
            if lastReport.duration(to: now) > .seconds(2) || (done == total && total > 16) {
                lastReport = now
                progress("volume \(config.name): replayed \(done) of \(total) epochs")
            }
            epoch = epoch.next
            startOffset = 0
        }
    }

    /// A TLog from local flash, else from the backend; verified either way.
    func loadTLog(_ epoch: SCONumber) async throws(VDError) -> TLog {
        if localTLogs.contains(epoch) {
            do throws(VDError) {
                if let tlog = try TLogFiles.read(epoch, directory: layout.tlogDirectory, fs: env.fs) {
                    try check(tlog, epoch, what: layout.tlogDirectory + "/" + TLogFiles.fileName(epoch))
                    return tlog
                }
            } catch where backendTLogs.contains(epoch) {
                logger.error("local TLog \(epoch.hex) of volume \(config.name) is unreadable (\(error)); using the backend copy")
            }
        }
        let object = layout.tlogObject(epoch)
        let tlog = try TLog.decode(try await backend.get(object), what: object)
        try check(tlog, epoch, what: object)
        return tlog
    }

    private func check(_ tlog: TLog, _ epoch: SCONumber, what: String) throws(VDError) {
        guard tlog.volumeID == config.id, tlog.number == epoch, tlog.clusterSizeBytes == config.clusterSizeBytes else {
            throw .corrupt("\(what) belongs to volume \(tlog.volumeID) epoch \(tlog.number.hex), not \(config.id) \(epoch.hex)")
        }
    }

    /// Step 4: seals scanned journals, moves files past the history aside, starts a new journal.
    mutating func sealAndStartJournal(map: BlockMap) async throws(VDError) -> JournalState {
        let fs = env.fs
        for epoch in scans.keys.sorted() {
            let path = layout.scoPath(epoch)
            let file = try fs.open(path)
            defer { file.close() }
            var scan = scans[epoch]!
            if !scan.isSealed {
                let marker = BatchHeader(
                    volumeID: config.id, sco: epoch, offset: scan.validLength, previousCRC: scan.chainCRC,
                    flags: BatchHeader.flagSealed, entries: [])
                try marker.encode().withUnsafeReadableBytes { (raw) throws(VDError) in try file.write(raw, at: scan.validLength) }
                try file.dataSync()
                scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: epoch, clusterSizeBytes: config.clusterSizeBytes)
                guard scan.isSealed else { throw .corrupt("\(path): cannot seal the recovered journal") }
            }
            let tlog = TLog(
                volumeID: config.id, number: epoch, clusterSizeBytes: config.clusterSizeBytes, records: scan.tlogRecords())
            try TLogFiles.write(tlog, directory: layout.tlogDirectory, fs: fs)
            try file.truncate(to: scan.validLength)
            var update = MapUpdate()
            update.metadata.append((MapChanges.epochBytesKey(epoch), [UInt8](littleEndian64: scan.validLength)))
            try map.apply(update)
            localTLogs.insert(epoch)
            sealedNow[epoch] = scan.validLength
        }
        if let lastEpoch {
            let aside = layout.flashDirectory + "/discarded"
            for sco in localSCOs where sco > lastEpoch {
                try fs.makeDirectories(aside)
                try fs.rename(layout.scoPath(sco), aside + "/" + sco.hex + ".sco")
            }
            for tlog in localTLogs where tlog > lastEpoch {
                try fs.makeDirectories(aside)
                try fs.rename(
                    layout.tlogDirectory + "/" + TLogFiles.fileName(tlog), aside + "/" + TLogFiles.fileName(tlog))
                localTLogs.remove(tlog)
            }
            localSCOs.removeAll { $0 > lastEpoch }
        } else {
            // No history: any local file is a journal that never got a durable header.
            for sco in localSCOs { try fs.unlinkIfPresent(layout.scoPath(sco)) }
            localSCOs = []
        }
        let next = max(highestNumberSeen, lastEpoch ?? SCONumber(0)).next
        let (file, headerCRC) = try Volume.createJournalFile(
            fs: fs, layout: layout, volumeID: config.id, sco: next, clusterSizeBytes: config.clusterSizeBytes,
            sizeBytes: options.scoSizeBytes)
        var update = MapUpdate()
        update.metadata.append(
            (MapCheckpoint.key, MapCheckpoint(sco: next, offset: UInt64(SCOFormat.blockBytes), chainCRC: headerCRC).encode()))
        try map.apply(update)
        try map.persist()
        return JournalState(sco: next, file: file, writeOffset: UInt64(SCOFormat.blockBytes), chainCRC: headerCRC)
    }

    /// Step 5: what is stored, and which sealed epochs still need uploading (with their SCO lengths).
    func uploadState() -> (SCONumber, [(SCONumber, UInt64)]) {
        let pending = localTLogs.filter { !backendTLogs.contains($0) }.sorted()
        let storedThrough: SCONumber
        if let first = pending.first {
            storedThrough = SCONumber(first.rawValue - 1)
        } else {
            storedThrough = max(backendTLogs.max() ?? SCONumber(0), lastEpoch ?? SCONumber(0))
        }
        let lengths = pending.map { sco -> (SCONumber, UInt64) in
            if let length = sealedNow[sco] { return (sco, length) }
            let size = (try? env.fs.open(layout.scoPath(sco), options: .readOnly)).flatMap { file -> UInt64? in
                defer { file.close() }
                return try? file.size()
            }
            return (sco, size ?? 0)
        }
        return (storedThrough, lengths)
    }

    /// Puts the local sealed SCOs in the flash cache.
    func registerCache(_ cache: FlashCache, volume: Volume, storedThrough: SCONumber) {
        for sco in localSCOs {
            guard let file = try? env.fs.open(layout.scoPath(sco), options: .readOnly),
                let size = try? file.size()
            else { continue }
            let key = volume.cacheKey(sco)
            cache.add(key, file: file, footprintBytes: size)
            cache.sealed(key, footprintBytes: size)
            if sco <= storedThrough && backendTLogs.contains(sco) { cache.markEvictable(key) }
        }
    }
}
