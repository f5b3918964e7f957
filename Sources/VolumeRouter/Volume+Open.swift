// Opening a volume: recovery after a clean stop, a kill -9, a power loss, or the loss of the local flash directory.
//
// The volume's history is a sequence of epochs 1, 2, 3, ... with no gap. An epoch is known from its TLog (local file,
// else the backend object) or, for epochs not sealed yet, from a scan of its local journal (the SCO whose header
// names the epoch; SCO numbers are unique and never reused, so they need not equal the epoch). Recovery:
//  1. walks the epochs from the first: TLog epochs are complete; a journal is scanned to its longest valid prefix;
//     the walk ends at the first journal without a seal marker (the open journal at the crash) or at the first epoch
//     nothing describes. Journals past that end never held anything a replied flush covered (a flush syncs every
//     journal before it, seal markers included), so they are moved aside, never used;
//  2. checks the map's checkpoint against that history: a map that may be ahead of the durable journal (possible
//     after a power loss: RocksDB flushes when it likes) is rebuilt from scratch rather than trusted;
//  3. replays every epoch from the checkpoint into the map (TLogs, then journal batches);
//  4. seals every journal it scanned (the last at its valid prefix; each synced first, as a journal sealed before a
//     process crash may be sealed in the page cache only), writes their TLogs, moves files past the end of
//     the history aside (never deletes them), and starts the next epoch in a new SCO numbered above every SCO number
//     ever seen locally or on the backend;
//  5. queues the sealed epochs the backend does not have yet for upload (each SCO's length from its TLog).
// With no local flash at all this is a restart from the backend: every TLog comes from the backend. An SCO on the
// backend without its TLog (uploaded just before the node was lost) is garbage: it is never part of the history
// and its number is never used again.

import BlockMap
package import FlashIO
package import Logging
package import NIOCore
import NIOPosix
package import ObjectStore
package import SCOCache
import Scrubber
import Synchronization
import TransactionLog
package import VolumeCore

extension Volume {
    /// Opens (recovering as needed) a volume. `progress` receives human-readable progress of long rebuilds.
    package static func open(
        config: VolumeConfig, layout: VolumeLayout, options: VolumeOptions, backend: any ObjectStore, cache: FlashCache,
        env: Environment, logger: Logger, parent: (any CloneParentSource)? = nil, generation: OwnerGeneration? = nil,
        lease: OwnerLease? = nil, peerJournals: PeerJournalSource? = nil,
        progress: @escaping @Sendable (String) -> Void = { _ in }
    ) async throws(VDError) -> Volume {
        try options.validate()
        if let link = config.parent {
            guard let parent, parent.name == link.volume else {
                throw VDError(
                    .notFound,
                    "volume \(config.name) is a clone of \(link.volume)@\(link.snapshot), which is not open on this router (attach it first)"
                )
            }
            guard parent.snapshotTable.snapshot(named: link.snapshot)?.epoch == link.epoch else {
                throw VDError(
                    .corrupt,
                    "volume \(config.name) reads through \(link.volume)@\(link.snapshot) (epoch \(link.epoch)), which no longer exists (\(link.volume) has \(parent.snapshotTable.snapshots.map { "\($0.name)@\($0.epoch)" }.joined(separator: ", ")))"
                )
            }
        }
        if let link = config.parent, let parent = parent as? Volume,
            parent.snapshotTable.snapshot(named: link.snapshot)?.clones.contains(config.name.rawValue) == false
        {
            // The parent's table lost the registration (restored from a backend copy older than the clone, after a
            // flash loss): register again before anything could delete the snapshot under the clone.
            logger.warning(
                "volume \(config.name): \(link.volume)@\(link.snapshot) did not record it as a clone; recording it again"
            )
            try parent.setClone(config.name.rawValue, ofSnapshot: link.snapshot, present: true)
        }
        let fs = env.fs
        try fs.makeDirectories(layout.scoDirectory)
        try fs.makeDirectories(layout.tlogDirectory)
        // Fetched backend data is tracked in memory only: start empty.
        try fs.removeTree(layout.fetchedDirectory)
        try fs.makeDirectories(layout.fetchedDirectory)
        let hadMap = env.keyValueStores.exists(path: layout.mapDirectory)
        var database = try env.keyValueStores.open(path: layout.mapDirectory)
        do throws(VDError) {
            var recovery = Recovery(
                config: config, layout: layout, options: options, backend: backend, env: env, logger: logger,
                progress: progress)
            recovery.parent = parent
            try await recovery.discover()
            if let peerJournals, let generation {
                if recovery.scans.isEmpty && recovery.localTLogs.isSubset(of: recovery.backendTLogs) {
                    // The fetch fences the lost owner at the peer (it can trim nothing more there); the history is
                    // read again after it, so an epoch it stored (and trimmed) just before is in that history.
                    let fetched = try await peerJournals(recovery.lastEpoch ?? 0)
                    recovery = Recovery(
                        config: config, layout: layout, options: options, backend: backend, env: env, logger: logger,
                        progress: progress)
                    recovery.parent = parent
                    try await recovery.discover()
                    let stored = recovery.lastEpoch ?? 0
                    let firstNumber = max(
                        SCONumber(GenerationChain.numberBase(of: generation.generation)), recovery.highestSCO.next)
                    let installed = try await env.tasks.blocking { () throws(VDError) -> PeerJournals.Installed in
                        try PeerJournals.install(
                            fetched.journals, after: stored, firstNumber: firstNumber, config: config, layout: layout,
                            fs: fs, logger: logger)
                    }
                    let beyond = Set(fetched.journals.map(\.epoch).filter { $0 > stored })
                    if fetched.complete && (installed.epochs.isEmpty || installed.epochs.count != beyond.count) {
                        throw VDError(
                            .dataLoss,
                            "volume \(config.name): its DTL peer \(fetched.peer ?? "") was in sync, yet holds \(installed.epochs.isEmpty ? "no journal" : "only epochs \(installed.epochs[0])-\(installed.epochs.last!)") of those after epoch \(stored) (\(beyond.sorted())): writes may be lost; `vd volume takeover \(config.name) --accept-loss` serves it with what could be recovered"
                        )
                    }
                    if let last = installed.epochs.last {
                        progress(
                            "recovered epochs \(installed.epochs[0])-\(last) (\(ByteSize.format(installed.bytes))) from the DTL peer \(fetched.peer ?? "")\(installed.lastSealed ? "" : ", the last one open at the loss")"
                        )
                        // The history again, now with the installed journals. Only what the backend held at the
                        // listing above counts from it: a TLog the lost owner uploads meanwhile for a later epoch is
                        // not history (this generation starts right after `stored`, so its TLogs carry this tag).
                        recovery = Recovery(
                            config: config, layout: layout, options: options, backend: backend, env: env,
                            logger: logger, progress: progress)
                        recovery.parent = parent
                        recovery.backendHistoryLimit = stored
                        try await recovery.discover()
                        recovery.generationFirstEpoch = stored + 1
                        recovery.epochsFromPeer = installed.epochs
                    } else if fetched.peer != nil {
                        progress("the DTL peer \(fetched.peer!) held nothing after epoch \(stored)")
                    }
                } else {
                    logger.info(
                        "volume \(config.name): local journals continue the history; the DTL peer is not needed")
                }
            }
            try await recovery.loadSnapshots()
            try recovery.applyRollbacksFromPeer()
            if let generation { try await recovery.startGeneration(generation) }
            var map = BlockMap(database: database, cacheEntries: options.mapCacheEntries)
            if try !recovery.checkpointIsTrustworthy(map: map, hadMap: hadMap) {
                if hadMap {
                    logger.warning("the map of volume \(config.name) is ahead of its durable journal; rebuilding it")
                }
                database.close()
                try env.keyValueStores.destroy(path: layout.mapDirectory)
                database = try env.keyValueStores.open(path: layout.mapDirectory)
                map = BlockMap(database: database, cacheEntries: options.mapCacheEntries)
            }
            try await recovery.replay(into: map)
            let journal = try await recovery.sealAndStartJournal(map: map)
            let (storedThrough, pending) = try recovery.uploadState()
            var unstored = UInt64(SCOFormat.blockBytes)
            for (_, sealed) in pending { unstored += sealed.lengthBytes }
            let volume = Volume(
                config: config, layout: layout, options: options, backend: backend, cache: cache, map: map, env: env,
                logger: logger, journal: journal, storedThrough: storedThrough, unstoredBytes: unstored,
                localOnlySCOs: Set(pending.map(\.1.sco)), snapshots: recovery.snapshots,
                snapshotsUploadedVersion: recovery.snapshotsUploadedVersion,
                parent: parent.map { ParentLink(source: $0, epoch: config.parent!.epoch) },
                generations: recovery.generations)
            // Before any background work: uploads, scrub deletions and I/O are checked against it from the start.
            if let lease { volume.serve(under: lease) }
            recovery.registerCache(cache, volume: volume, storedThrough: storedThrough)
            cache.add(volume.cacheKey(journal.sco), file: journal.file, footprintBytes: options.scoSizeBytes)
            let tableVersion = recovery.snapshots.version
            for (epoch, sealed) in pending {
                volume.uploader.queue(
                    epoch: epoch,
                    SealedEpoch(sco: sealed.sco, lengthBytes: sealed.lengthBytes, tableVersion: tableVersion))
            }
            volume.startBackground { await $0.uploader.run() }
            volume.startBackground { await $0.ageLoop() }
            volume.startBackground { await $0.scrubs.run() }
            cache.evictIfNeeded()
            return volume
        } catch {
            database.close()
            throw error
        }
    }
}

/// What a volume's DTL peer holds after a given epoch (fetched when the volume opens with nothing local).
package struct FetchedJournals: Sendable {
    package var journals: [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)]
    /// The peer was in sync: every epoch after the backend's history must be there, without a gap, each verifying.
    package var complete: Bool
    package var peer: String?

    package init(journals: [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)], complete: Bool, peer: String?) {
        self.journals = journals
        self.complete = complete
        self.peer = peer
    }
}

/// Fetches the journals after the given epoch from the volume's DTL peer.
package typealias PeerJournalSource = @Sendable (_ afterEpoch: UInt64) async throws(VDError) -> FetchedJournals

/// The owner generation a volume is opened in (when routers share the backend) and the node serving it.
package struct OwnerGeneration: Sendable {
    package var generation: UInt64
    package var node: String
    package init(generation: UInt64, node: String) {
        self.generation = generation
        self.node = node
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

    /// Local journal files by SCO number, with the epoch their header names (nil: no valid header of this volume).
    var localJournals: [SCONumber: UInt64?] = [:]
    /// Epochs with a local TLog file, and with a TLog on the backend.
    var localTLogs: Set<UInt64> = []
    var backendTLogs: Set<UInt64> = []
    /// The highest SCO number ever used (local files, moved-aside files, backend objects, the last TLog).
    var highestSCO = SCONumber(0)
    var firstEpoch: UInt64?
    /// The last epoch of the history (nil: the volume has none), and whether it is complete (sealed).
    var lastEpoch: UInt64?
    var lastEpochComplete = false
    /// Scans of local journals without a TLog, up to `lastEpoch`, by epoch.
    var scans: [UInt64: (sco: SCONumber, scan: JournalScan)] = [:]
    /// The SCO of every epoch whose local journal is part of the history.
    var historySCOs: [UInt64: SCONumber] = [:]
    var checkpoint: MapCheckpoint?
    var sealedNow: [UInt64: (sco: SCONumber, lengthBytes: UInt64)] = [:]
    var snapshots = SnapshotTable()
    var snapshotsUploadedVersion: UInt64 = 0
    /// For a clone, its parent (an unmap hides what the parent's view holds).
    var parent: (any CloneParentSource)?
    /// Which generation wrote which epochs: only TLogs named by it are history.
    var generations = GenerationChain()
    /// The first epoch of the generation being started, when not the one after the history (journals recovered
    /// from a DTL peer: they belong to the new generation).
    var generationFirstEpoch: UInt64?
    /// Backend TLogs of later epochs are not history (journals recovered from a DTL peer continue it).
    var backendHistoryLimit: UInt64?
    /// Epochs whose journals were recovered from a DTL peer.
    var epochsFromPeer: [UInt64] = []

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

    var discardedDirectory: String { layout.flashDirectory + "/discarded" }

    /// Step 1: what exists locally and on the backend, and where the history ends.
    mutating func discover() async throws(VDError) {
        let fs = env.fs
        for sco in VolumeLayout.numbers(inFiles: try fs.listDirectory(layout.scoDirectory), suffix: ".sco") {
            localJournals[sco] = readJournalEpoch(sco)
        }
        localTLogs = Set(
            VolumeLayout.numbers(inFiles: try fs.listDirectory(layout.tlogDirectory), suffix: ".tlog").map(\.rawValue))
        let discarded = VolumeLayout.numbers(inFiles: try fs.listDirectory(discardedDirectory), suffix: ".sco")
        generations = try await NamespaceObjects.loadGenerationChain(layout: layout, backend: backend)
        let tlogNames = try await backend.list(prefix: layout.tlogPrefix).map(\.name)
        let scoNames = try await backend.list(prefix: layout.scoPrefix).map(\.name)
        backendTLogs = generations.historyTLogs(in: tlogNames, layout: layout)
        if let limit = backendHistoryLimit { backendTLogs = backendTLogs.filter { $0 <= limit } }
        let foreign = generations.foreignTLogs(in: tlogNames, layout: layout)
        if !foreign.isEmpty {
            logger.info(
                "volume \(config.name): \(foreign.count) TLog(s) of an owner that was fenced are not part of the history (e.g. \(foreign[0]))"
            )
        }
        // SCOs written by scrubs have numbers of their own (top bit set): they take no part in the numbering.
        let backendSCOs = VolumeLayout.numbers(in: scoNames, prefix: layout.scoPrefix).filter {
            !ScrubResult.isScrubSCO($0)
        }
        highestSCO = (Array(localJournals.keys) + discarded + backendSCOs).max() ?? SCONumber(0)

        var journalByEpoch: [UInt64: SCONumber] = [:]
        for (sco, epoch) in localJournals {
            guard let epoch else { continue }
            // Two files claiming one epoch cannot both be history: the newer journal (higher number) is.
            if let other = journalByEpoch[epoch], other > sco { continue }
            journalByEpoch[epoch] = sco
        }
        firstEpoch = (Array(localTLogs) + Array(backendTLogs) + Array(journalByEpoch.keys)).min()
        guard var epoch = firstEpoch else { return }
        while true {
            if localTLogs.contains(epoch) || backendTLogs.contains(epoch) {
                if let sco = journalByEpoch[epoch] { historySCOs[epoch] = sco }
                lastEpoch = epoch
                lastEpochComplete = true
                epoch += 1
                continue
            }
            guard let sco = journalByEpoch[epoch] else { break }
            let scan: JournalScan
            do throws(VDError) {
                let file = try fs.open(layout.scoPath(sco), options: .readOnly)
                defer { file.close() }
                scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes)
            } catch  where error.code == .corrupt {
                logger.warning("ignoring SCO file \(layout.scoPath(sco)): \(error.message)")
                break
            }
            scans[epoch] = (sco, scan)
            historySCOs[epoch] = sco
            lastEpoch = epoch
            lastEpochComplete = scan.isSealed
            if !scan.isSealed { break }
            epoch += 1
        }
        // The last TLog names its SCO: a number that must never be used again even if that object is gone.
        if let lastEpoch, scans[lastEpoch] == nil {
            for record in try await loadTLog(lastEpoch).records {
                if case .scoSealed(let sco, _, _) = record, !ScrubResult.isScrubSCO(sco) {
                    highestSCO = max(highestSCO, sco)
                }
            }
        }
    }

    /// The epoch in a local journal's header, or nil when the file holds no valid header of this volume.
    private func readJournalEpoch(_ sco: SCONumber) -> UInt64? {
        guard let file = try? env.fs.open(layout.scoPath(sco), options: .readOnly) else { return nil }
        defer { file.close() }
        guard let bytes = try? file.readExactly(SCOFormat.blockBytes, at: 0),
            let header = try? SCOHeader.decode(ByteBuffer(bytes: bytes), what: file.path),
            header.volumeID == config.id, header.sco == sco, header.clusterSizeBytes == config.clusterSizeBytes
        else { return nil }
        return header.epoch
    }

    /// The snapshot table: the local copy, else the backend's newest; snapshots past the history are dropped.
    mutating func loadSnapshots() async throws(VDError) {
        if let local = try SnapshotCatalog.loadLocal(layout: layout, fs: env.fs) {
            snapshots = local
        } else if let remote = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: backend) {
            snapshots = remote
            snapshotsUploadedVersion = remote.version
        }
        // A snapshot of the epoch open at a crash is kept: that epoch is sealed below at what it held, which is
        // everything replied before the snapshot was requested.
        let last = lastEpoch ?? 0
        let beyond = snapshots.snapshots.filter { $0.epoch > last }
        if !beyond.isEmpty {
            logger.warning(
                "volume \(config.name): snapshots past the end of its history are dropped: \(beyond.map(\.name).joined(separator: ", "))"
            )
            snapshots.snapshots.removeAll { snapshot in beyond.contains { $0.id == snapshot.id } }
            snapshots.version += 1
        }
        try SnapshotCatalog.save(snapshots, layout: layout, fs: env.fs)
    }

    /// A rollback in a journal recovered from a DTL peer whose table change never reached the backend (the table is
    /// uploaded after the rollback's reply): the table is changed as the lost owner changed it (the snapshots after
    /// the target, up to the rollback, go; the rollback is recorded), or those snapshots would read versions the
    /// rollback no longer keeps.
    mutating func applyRollbacksFromPeer() throws(VDError) {
        var applied: [RollbackRecord] = []
        for epoch in epochsFromPeer.sorted() {
            guard let scan = scans[epoch]?.scan else { continue }
            for batch in scan.batches {
                for entry in batch.header.entries {
                    guard case .rollback(let target) = entry else { continue }
                    let record = RollbackRecord(atEpoch: epoch, toEpoch: target)
                    if snapshots.rollbacks.contains(record) { continue }
                    let gone = snapshots.snapshots.filter { $0.epoch > target && $0.epoch <= epoch }
                    if !gone.isEmpty {
                        logger.warning(
                            "volume \(config.name): the rollback to epoch \(target) recovered from the DTL peer deletes snapshots \(gone.map(\.name).joined(separator: ", ")) (its table never reached the backend)"
                        )
                    }
                    snapshots.snapshots.removeAll { $0.epoch > target && $0.epoch <= epoch }
                    snapshots.rollbacks.append(record)
                    applied.append(record)
                }
            }
        }
        guard !applied.isEmpty else { return }
        snapshots.version += 1
        try SnapshotCatalog.save(snapshots, layout: layout, fs: env.fs)
    }

    /// Before the volume accepts a write in owner generation `owner.generation` >= 2 (GenerationChain): its SCO
    /// numbers and snapshot table versions move to the generation's range, the table is uploaded under its first
    /// version of the range, and the generation's start (the epoch after the history found) is written, all before
    /// anything of this generation can reach the backend.
    mutating func startGeneration(_ owner: OwnerGeneration) async throws(VDError) {
        guard owner.generation >= GenerationChain.firstTagged else { return }
        guard owner.generation <= GenerationChain.maximumGeneration else {
            throw VDError(.corrupt, "volume \(config.name): generation \(owner.generation) is out of range")
        }
        if let newest = generations.newest, newest.generation > owner.generation {
            throw VDError(
                .busy,
                "volume \(config.name): generation \(newest.generation) started after this router's \(owner.generation): another router took it"
            )
        }
        let base = GenerationChain.numberBase(of: owner.generation)
        highestSCO = max(highestSCO, SCONumber(base - 1))
        if snapshots.version < base {
            snapshots.version = base
            try SnapshotCatalog.save(snapshots, layout: layout, fs: env.fs)
            let object = layout.snapshotsPrefix + SCONumber(base).hex
            do {
                try await backend.put(object, data: try MetadataRecord.encode(snapshots, kind: .snapshotTable))
            } catch  where error.code == .alreadyExists {
                // An earlier attempt of this generation uploaded its copy of the same starting table.
            }
            snapshotsUploadedVersion = base
        }
        guard generations.start(of: owner.generation) == nil else { return }
        let start = try await NamespaceObjects.startGeneration(
            GenerationStart(
                generation: owner.generation, firstEpoch: generationFirstEpoch ?? (lastEpoch ?? 0) + 1,
                node: owner.node,
                previous: generations.newest?.generation),
            layout: layout, backend: backend)
        generations.add(start)
        try generations.validate(what: layout.generationsPrefix)
        logger.info(
            "volume \(config.name): generation \(start.generation) writes the history from epoch \(start.firstEpoch) on"
        )
    }

    /// Step 2: the map may be reused only if its checkpoint lies within the durable history: at a batch boundary of
    /// a journal (with the batch it may be partly through also in the journal), within a complete epoch, or at the
    /// start of the epoch after a complete last epoch.
    mutating func checkpointIsTrustworthy(map: BlockMap, hadMap: Bool) throws(VDError) -> Bool {
        guard hadMap else { return false }
        guard let raw = try map.metadata(MapCheckpoint.key), let checkpoint = MapCheckpoint.decode(raw) else {
            return false
        }
        let blockBytes = UInt64(SCOFormat.blockBytes)
        guard let lastEpoch, let firstEpoch else {
            return checkpoint.epoch <= 1 && checkpoint.offset <= blockBytes && checkpoint.dirtyEnd == nil
        }
        guard checkpoint.epoch >= firstEpoch, checkpoint.epoch <= lastEpoch + 1 else { return false }
        if checkpoint.epoch == lastEpoch + 1 {
            // The start of the next epoch: only once the last one is sealed for good.
            guard lastEpochComplete, checkpoint.offset <= blockBytes, checkpoint.dirtyEnd == nil else { return false }
        } else if let (_, scan) = scans[checkpoint.epoch] {
            func isBoundary(_ offset: UInt64, chain: UInt32?) -> Bool {
                if offset <= blockBytes {
                    return chain == nil || chain == BatchHeader.storedCRC(of: scan.header.encode())
                }
                return scan.batches.contains { batch in
                    batch.payloadOffset + UInt64(batch.header.payloadClusters * Int(config.clusterSizeBytes)) == offset
                        && (chain == nil || batch.storedCRC == chain)
                }
            }
            guard checkpoint.offset <= blockBytes || isBoundary(checkpoint.offset, chain: checkpoint.chainCRC) else {
                return false
            }
            if let end = checkpoint.dirtyEnd {
                guard end == .max ? scan.isSealed : isBoundary(end, chain: nil) else { return false }
            }
        }
        // Otherwise the epoch has a TLog: complete, so any point in it is durable.
        self.checkpoint = checkpoint
        return true
    }

    /// Step 3: replays every epoch from the checkpoint (or the first) through the last into the map.
    func replay(into map: BlockMap) async throws(VDError) {
        guard let lastEpoch, var epoch = checkpoint?.epoch ?? firstEpoch else { return }
        var startOffset = checkpoint?.offset ?? 0
        let total = lastEpoch >= epoch ? lastEpoch - epoch + 1 : 0
        var done: UInt64 = 0
        var lastReport = env.clock.now()
        while epoch <= lastEpoch {
            var changes = MapChanges(
                map: map, retainedEpochs: snapshots.retainedEpochs, isClone: config.parent != nil)
            changes.chunkClusters = options.mapChangeChunkClusters
            if let parent {
                changes.parentAddresses = { (start, end) throws(VDError) in
                    try parent.addressesPossiblyWithData(from: start, to: end)
                }
            }
            if let (sco, scan) = scans[epoch] {
                let applies = scan.batches.flatMap { batch in
                    batch.header.entries.compactMap { entry -> UInt64? in
                        if case .scrubApplied(let id) = entry { return id }
                        return nil
                    }
                }
                changes.scrubResults = try await NamespaceObjects.resultsApplied(
                    by: applies, known: [:], layout: layout, backend: backend, volumeID: config.id)
                var clean =
                    checkpoint.flatMap {
                        $0.epoch == epoch ? MapCheckpoint(epoch: epoch, offset: $0.offset, chainCRC: $0.chainCRC) : nil
                    }
                    ?? MapCheckpoint(epoch: epoch, offset: 0, chainCRC: 0)
                for batch in scan.batches where batch.offset >= startOffset {
                    let end = batch.payloadOffset + UInt64(batch.header.payloadClusters * Int(config.clusterSizeBytes))
                    changes.dirtyCheckpoint = clean.dirty(until: end)
                    try changes.add(
                        entries: batch.header.entries, sco: sco, epoch: epoch, payloadOffset: batch.payloadOffset,
                        clusterBytes: Int(config.clusterSizeBytes))
                    clean = MapCheckpoint(epoch: epoch, offset: end, chainCRC: batch.storedCRC)
                    try changes.finish(checkpoint: clean)
                }
                if scan.isSealed {
                    try changes.finish(checkpoint: MapCheckpoint(epoch: epoch + 1, offset: 0, chainCRC: 0))
                }
            } else {
                changes.dirtyCheckpoint = MapCheckpoint(epoch: epoch, offset: 0, chainCRC: 0).dirty(until: .max)
                let tlog = try await loadTLog(epoch)
                let applies = tlog.records.compactMap { record -> UInt64? in
                    if case .scrubApplied(let id) = record { return id }
                    return nil
                }
                changes.scrubResults = try await NamespaceObjects.resultsApplied(
                    by: applies, known: [:], layout: layout, backend: backend, volumeID: config.id)
                try changes.add(tlog: tlog)
                try changes.finish(checkpoint: MapCheckpoint(epoch: epoch + 1, offset: 0, chainCRC: 0))
            }
            done += 1
            let now = env.clock.now()
            if lastReport.duration(to: now) > .seconds(2) || (done == total && total > 16) {
                lastReport = now
                progress("volume \(config.name): replayed \(done) of \(total) epochs")
            }
            epoch += 1
            startOffset = 0
        }
    }

    /// A TLog from local flash, else from the backend; verified either way.
    func loadTLog(_ epoch: UInt64) async throws(VDError) -> TLog {
        let number = SCONumber(epoch)
        if localTLogs.contains(epoch) {
            do throws(VDError) {
                if let tlog = try TLogFiles.read(number, directory: layout.tlogDirectory, fs: env.fs) {
                    try check(tlog, number, what: layout.tlogDirectory + "/" + TLogFiles.fileName(number))
                    return tlog
                }
            } catch  where backendTLogs.contains(epoch) {
                logger.error(
                    "local TLog \(number.hex) of volume \(config.name) is unreadable (\(error)); using the backend copy"
                )
            }
        }
        let object = generations.tlogObject(epoch, layout: layout)
        let tlog = try await NamespaceObjects.getVerified(object, backend: backend) { (bytes) throws(VDError) in
            try TLog.decode(bytes, what: object)
        }
        try check(tlog, number, what: object)
        return tlog
    }

    private func check(_ tlog: TLog, _ epoch: SCONumber, what: String) throws(VDError) {
        try tlog.checkBelongs(to: config, epoch: epoch, what: what)
    }

    /// Step 4: seals scanned journals, moves files past the history aside, starts the next epoch.
    mutating func sealAndStartJournal(map: BlockMap) async throws(VDError) -> JournalState {
        let fs = env.fs
        for epoch in scans.keys.sorted() {
            var (sco, scan) = scans[epoch]!
            let path = layout.scoPath(sco)
            let file = try fs.open(path)
            defer { file.close() }
            if !scan.isSealed {
                let marker = BatchHeader(
                    volumeID: config.id, sco: sco, offset: scan.validLength, previousCRC: scan.chainCRC,
                    flags: BatchHeader.flagSealed, entries: [])
                try marker.encode().withUnsafeReadableBytes { (raw) throws(VDError) in
                    try file.write(raw, at: scan.validLength)
                }
                try file.dataSync()
                scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes)
                guard scan.isSealed else { throw .corrupt("\(path): cannot seal the recovered journal") }
            } else {
                // Sealed before a process crash, maybe only in the page cache: durable before a TLog claims it.
                try file.dataSync()
            }
            let tlog = TLog(
                volumeID: config.id, number: SCONumber(epoch), clusterSizeBytes: config.clusterSizeBytes,
                records: scan.tlogRecords())
            try TLogFiles.write(tlog, directory: layout.tlogDirectory, fs: fs)
            try file.truncate(to: scan.validLength)
            var update = MapUpdate()
            update.metadata.append((MapChanges.epochBytesKey(sco), [UInt8](littleEndian64: scan.validLength)))
            try map.apply(update)
            localTLogs.insert(epoch)
            sealedNow[epoch] = (sco, scan.validLength)
        }
        try moveAsideFilesPastTheHistory()
        let epoch = (lastEpoch ?? 0) + 1
        let sco = highestSCO.next
        let (file, headerCRC) = try Journal.createJournalFile(
            fs: fs, layout: layout, volumeID: config.id, sco: sco, epoch: epoch,
            clusterSizeBytes: config.clusterSizeBytes,
            sizeBytes: options.scoSizeBytes)
        var update = MapUpdate()
        update.metadata.append(
            (
                MapCheckpoint.key,
                MapCheckpoint(epoch: epoch, offset: UInt64(SCOFormat.blockBytes), chainCRC: headerCRC).encode()
            ))
        try map.apply(update)
        try map.persist()
        return JournalState(
            epoch: epoch, sco: sco, highestSCO: sco, file: file, writeOffset: UInt64(SCOFormat.blockBytes),
            chainCRC: headerCRC)
    }

    /// Local journals and TLogs that are not part of the history go to flash/NAME/discarded/ (never deleted), durably.
    private mutating func moveAsideFilesPastTheHistory() throws(VDError) {
        let fs = env.fs
        let inHistory = Set(historySCOs.values)
        let journals = localJournals.keys.sorted().filter { !inHistory.contains($0) }
        let tlogs = localTLogs.sorted().filter { $0 > (lastEpoch ?? 0) }
        guard !journals.isEmpty || !tlogs.isEmpty else { return }
        try fs.makeDirectories(discardedDirectory)
        let existing = Set(try fs.listDirectory(discardedDirectory))
        func target(_ name: String) -> String {
            var candidate = name
            while existing.contains(candidate) { candidate = name + "." + env.random.hexToken() }
            return discardedDirectory + "/" + candidate
        }
        var described: [String] = []
        for sco in journals {
            let path = layout.scoPath(sco)
            var what = "SCO \(sco.hex)"
            if let epoch = localJournals[sco] ?? nil {
                what += " (epoch \(epoch)"
                if let file = try? fs.open(path, options: .readOnly) {
                    if let scan = try? JournalScanner.scan(
                        file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes)
                    {
                        what += ", \(scan.batches.count) batch(es), \(scan.validLength) bytes"
                    }
                    file.close()
                }
                what += ")"
            } else {
                what += " (no valid header)"
            }
            described.append(what)
            try fs.rename(path, target(sco.hex + ".sco"))
        }
        for epoch in tlogs {
            let name = TLogFiles.fileName(SCONumber(epoch))
            described.append("TLog of epoch \(epoch)")
            try fs.rename(layout.tlogDirectory + "/" + name, target(name))
            localTLogs.remove(epoch)
        }
        try fs.syncDirectory(discardedDirectory)
        try fs.syncDirectory(layout.scoDirectory)
        try fs.syncDirectory(layout.tlogDirectory)
        logger.warning(
            "volume \(config.name): files past the end of its history (epoch \(lastEpoch.map(String.init) ?? "none")) moved to \(discardedDirectory): \(described.joined(separator: "; ")) (no replied flush covered them)"
        )
    }

    /// Step 5: what is stored, and which sealed epochs still need uploading (their SCO and its length from the TLog).
    func uploadState() throws(VDError) -> (SCONumber, [(SCONumber, (sco: SCONumber, lengthBytes: UInt64))]) {
        let pending = localTLogs.filter { !backendTLogs.contains($0) && $0 <= (lastEpoch ?? 0) }.sorted()
        let storedThrough: UInt64
        if let first = pending.first {
            storedThrough = first - 1
        } else {
            storedThrough = max(backendTLogs.max() ?? 0, lastEpoch ?? 0)
        }
        var result: [(SCONumber, (sco: SCONumber, lengthBytes: UInt64))] = []
        for epoch in pending {
            if let sealed = sealedNow[epoch] {
                result.append((SCONumber(epoch), sealed))
                continue
            }
            guard let tlog = try TLogFiles.read(SCONumber(epoch), directory: layout.tlogDirectory, fs: env.fs),
                let sealed = tlog.records.lazy.compactMap({ record -> (SCONumber, UInt64)? in
                    if case .scoSealed(let sco, let length, _) = record { return (sco, length) }
                    return nil
                }).last
            else {
                throw VDError(.corrupt, "local TLog of epoch \(epoch) of volume \(config.name) names no SCO")
            }
            result.append((SCONumber(epoch), (sealed.0, sealed.1)))
        }
        return (SCONumber(storedThrough), result)
    }

    /// Puts the local sealed SCOs of the history in the flash cache.
    func registerCache(_ cache: FlashCache, volume: Volume, storedThrough: SCONumber) {
        for (epoch, sco) in historySCOs {
            guard let file = try? env.fs.open(layout.scoPath(sco), options: .readOnly) else { continue }
            let length = sealedNow[epoch]?.lengthBytes ?? (try? file.size()) ?? 0
            let key = volume.cacheKey(sco)
            cache.add(key, file: file, footprintBytes: length)
            cache.sealed(key, footprintBytes: length)
            if epoch <= storedThrough.rawValue { cache.markEvictable(key) }
        }
    }
}

extension TLog {
    /// A TLog read from flash or the backend must be this volume's TLog of `epoch` (else `.corrupt`).
    func checkBelongs(to config: VolumeConfig, epoch: SCONumber, what: String) throws(VDError) {
        guard volumeID == config.id, number == epoch, clusterSizeBytes == config.clusterSizeBytes else {
            throw .corrupt("\(what) belongs to volume \(volumeID) epoch \(number.hex), not \(config.id) \(epoch.hex)")
        }
    }
}
