// The journal of a volume: the open SCO that every change is appended to, one leader at a time. Whoever submits
// while no leader is active becomes the leader; others queue. A leader takes every queued request (up to a bound),
// writes them as chained batches with one pwritev, has the map updated, replies to the followers and hands leadership
// to the next queued request. Concurrent writers thus share system calls (group writes) without any added wait at
// queue depth 1.
//
// Rolling (sealing the open SCO and starting the next epoch in a new one) happens inside the leader too, so every
// journal operation is ordered: a roll, a snapshot or a scrub application falls between two writes, never through
// one. Such requests run as `exclusive` closures with leader rights (`JournalLeader`).
//
// Owns: the open journal (epoch, SCO, write position, chain), the leader queue, the write generation and the files a
// flush must sync, the zero-ahead coordination (Journal+ZeroAhead.swift), and the failure that stops writes. Every
// leader-only path checks that it runs as the leader.

import BlockMap
import Collections
import DTL
import FlashIO
import Logging
import NIOCore
import SCOCache
import Synchronization
import VolumeCore

/// Full clusters to append: batch entries in address order, and for each data entry the index of its cluster in
/// `buffer`.
struct ClusterWrite: Sendable {
    var entries: [BatchEntry]
    var payloadIndex: [Int]
    var buffer: ByteBuffer
}

/// Something to run with the journal's leader rights (a snapshot, a rollback, a scrub application).
struct ExclusiveRequest: Sendable {
    var run: @Sendable (JournalLeader) async throws(VDError) -> Void
}

enum JournalRequest: Sendable {
    case write(ClusterWrite)
    /// Seal the open SCO (if it holds anything) and start the next epoch.
    case roll
    /// Nothing: completes once every request queued before it is done (close waits with it).
    case barrier
    case exclusive(ExclusiveRequest)
}

/// What the journal needs from its volume: the map kept in step with every batch, and the seal of a rolled epoch.
protocol JournalDelegate: AnyObject, Sendable {
    /// `batches` were just written to the journal of `epoch` (in `sco`) from `start` to `end` (the new position):
    /// the map must point at them. A failure here stops the volume's writes (the journal has what the map lacks).
    func journalCommitted(
        _ batches: [PendingBatches.Batch], epoch: UInt64, sco: SCONumber, start: MapCheckpoint, end: MapCheckpoint
    ) throws(VDError)
    /// Epoch `epoch` was rolled (its seal marker written): the map now begins `next` at `checkpoint`; the rolled
    /// journal `file` of SCO `sco` is to be sealed.
    func journalRolled(epoch: UInt64, sco: SCONumber, file: FlashFile, checkpoint: MapCheckpoint) throws(VDError)
}

/// The open journal. Only the current leader (or recovery, before any leader can exist) touches it.
final class JournalState: @unchecked Sendable {
    /// The epoch being written (epochs are contiguous: the next one is `epoch + 1`).
    var epoch: UInt64
    /// The SCO holding it.
    var sco: SCONumber
    /// The highest SCO number ever used by this volume (the next journal takes the one after: never reused).
    var highestSCO: SCONumber
    var file: FlashFile
    /// Where the next batch header goes.
    var writeOffset: UInt64
    /// CRC the next batch must chain to.
    var chainCRC: UInt32
    /// The DTL mirror's ticket for the last range handed to it (what a write of this round waits for).
    var mirrored: DTLMirror.Ticket?

    init(epoch: UInt64, sco: SCONumber, highestSCO: SCONumber, file: FlashFile, writeOffset: UInt64, chainCRC: UInt32) {
        precondition(
            sco <= highestSCO && !ScrubResult.isScrubSCO(sco), "a journal SCO number above the high-water mark")
        self.epoch = epoch
        self.sco = sco
        self.highestSCO = highestSCO
        self.file = file
        self.writeOffset = writeOffset
        self.chainCRC = chainCRC
    }
}

enum LeaderSignal: Sendable {
    /// The round's outcome, and the DTL mirror's ticket for its last mirrored range.
    case done(Result<DTLMirror.Ticket?, VDError>)
    case lead
}

struct QueuedRequest {
    var request: JournalRequest
    var continuation: UnsafeContinuation<LeaderSignal, Never>
}

/// The journal's state shared with other tasks (flushers, the zeroer, the age loop), under one mutex.
struct JournalShared {
    var queue = Deque<QueuedRequest>()
    var leaderActive = false
    /// Bumped after every journal write: a flush covers every write with a generation at or below the one it read.
    var writtenGeneration: UInt64 = 0
    /// The journal file being appended (what a flush must sync).
    var currentFile: FlashFile
    /// Rolled journals whose writes are not yet known durable.
    var unsyncedFiles: [FlashFile] = []
    /// When the first write went into the open journal (for age-based sealing).
    var openJournalFirstWrite: MonotonicInstant?
    /// The open journal's epoch, and the SCO holding it.
    var openEpoch: UInt64
    var openSCO: SCONumber
    /// Rolled journals whose TLog is not written yet (sealing runs in the background), by epoch: published in the
    /// same step as the next open epoch, so a reader of an epoch's changes always finds them somewhere.
    var unsealed: [UInt64: (sco: SCONumber, file: FlashFile)] = [:]
    /// Bytes in the open journal.
    var openJournalBytes: UInt64 = UInt64(SCOFormat.blockBytes)
    /// When the open journal was started.
    var journalOpenedAt: MonotonicInstant
    /// Zeroing ahead (Journal+ZeroAhead.swift): how far the leader has reserved the open journal, up to where it is
    /// initialized, the chunk being zeroed, and whether the zeroer runs or must pause (a roll is under way).
    var reservedEnd = UInt64(SCOFormat.blockBytes)
    var zeroFrontier = UInt64(SCOFormat.blockBytes)
    var zeroing: Range<UInt64>?
    var zeroerRunning = false
    var zeroingPaused = false
    /// Leader tasks waiting for the zeroing chunk to finish (resumed when it does).
    var zeroWaiters: [UnsafeContinuation<Void, Never>] = []
    /// Writes are refused: the volume is closing or a fatal error (a failed fdatasync) happened.
    var failure: VDError?
}

final class Journal: Sendable {
    let volumeName: VolumeName
    let volumeID: VolumeID
    let layout: VolumeLayout
    let options: VolumeOptions
    let env: Environment
    let logger: Logger
    let clusterBytes: Int
    let clusterSizeBytes: UInt32
    /// The open journal: touched by the leader only.
    let state: JournalState
    let shared: Mutex<JournalShared>
    /// Bytes of every SCO not yet stored on the backend (open journal included): the back-pressure measure.
    let unstoredBytes: Atomic<UInt64>
    /// The volume's metrics (shared by its parts).
    let metrics: VolumeMetrics
    private let delegateBox = Mutex<(any JournalDelegate)?>(nil)
    /// The zeroer's tasks (awaited at close).
    private let background = Mutex<[Task<Void, Never>]>([])
    /// The next journal file, created ahead of the roll that needs it (see `prepareSpare`).
    private let spare = Mutex<SpareJournal>(.none)
    /// The DTL mirror every journal write is handed to (DTLMirror.swift), if the volume has one. Swapped only with
    /// leader rights, so every range reaches either the mirror or its catch-up.
    let mirrorBox = Mutex<DTLMirror?>(nil)
    var mirror: DTLMirror? { mirrorBox.withLock { $0 } }

    /// Most bytes a leader writes in one round (the rest waits for the next leader).
    static let leaderRoundBytesMax = 64 << 20

    init(
        config: VolumeConfig, layout: VolumeLayout, options: VolumeOptions, env: Environment, logger: Logger,
        state: JournalState, unstoredBytes: UInt64
    ) {
        volumeName = config.name
        volumeID = config.id
        self.layout = layout
        self.options = options
        self.env = env
        self.logger = logger
        clusterBytes = Int(config.clusterSizeBytes)
        clusterSizeBytes = config.clusterSizeBytes
        self.state = state
        shared = Mutex(
            JournalShared(
                currentFile: state.file, openEpoch: state.epoch, openSCO: state.sco, journalOpenedAt: env.clock.now()))
        self.unstoredBytes = Atomic(unstoredBytes)
        metrics = VolumeMetrics(volume: config.name)
    }

    /// Set once, before any request.
    func attach(_ delegate: any JournalDelegate) { delegateBox.withLock { $0 = delegate } }
    private var delegate: any JournalDelegate { delegateBox.withLock { $0! } }

    // MARK: submitting

    /// Appends a request to the journal, as leader or as a follower of the current leader. `whileClosing`: the
    /// volume's own requests at close (the final roll), accepted after client writes are refused.
    /// Returns the DTL mirror's ticket for the request's journal range (nil: not mirrored), for `DTLMirror.waitForWrites`.
    @discardableResult
    func submit(_ request: JournalRequest, whileClosing: Bool = false) async throws(VDError) -> DTLMirror.Ticket? {
        let signal: LeaderSignal = await withUnsafeContinuation { continuation in
            let outcome = shared.withLock { state -> LeaderSignal? in
                if let failure = state.failure, !(whileClosing && failure.code == .shutdown) {
                    return .done(.failure(failure))
                }
                if !state.leaderActive {
                    state.leaderActive = true
                    return .lead
                }
                state.queue.append(QueuedRequest(request: request, continuation: continuation))
                return nil
            }
            if let outcome { continuation.resume(returning: outcome) }
        }
        switch signal {
        case .done(let result):
            return try result.get()
        case .lead:
            // Let requests that are already runnable (typically the rest of what the NBD server decoded from the
            // same socket read, on the same event loop) queue behind this one, so one pwritev carries them all.
            await Task.yield()
            return try await lead(own: request)
        }
    }

    /// Runs `body` with leader rights, ordered with every write.
    func exclusive(
        whileClosing: Bool = false, _ body: @escaping @Sendable (JournalLeader) async throws(VDError) -> Void
    )
        async throws(VDError)
    {
        try await submit(.exclusive(ExclusiveRequest(run: body)), whileClosing: whileClosing)
    }

    /// Only the journal leader touches the journal: checked wherever it does.
    func assertLeader() {
        precondition(shared.withLock { $0.leaderActive }, "the journal was touched outside the leader")
    }

    private func lead(own: JournalRequest) async throws(VDError) -> DTLMirror.Ticket? {
        let followers = shared.withLock { state -> [QueuedRequest] in
            var taken: [QueuedRequest] = []
            var bytes = 0
            while let next = state.queue.first, bytes < Self.leaderRoundBytesMax {
                if case .write(let write) = next.request { bytes += write.payloadIndex.count * clusterBytes }
                taken.append(state.queue.removeFirst())
            }
            return taken
        }
        let result: Result<DTLMirror.Ticket?, VDError>
        do {
            state.mirrored = nil
            try await perform([own] + followers.map(\.request))
            result = .success(state.mirrored)
        } catch {
            result = .failure(error)
        }
        for follower in followers { follower.continuation.resume(returning: .done(result)) }
        let next = shared.withLock { state -> QueuedRequest? in
            if state.queue.isEmpty {
                state.leaderActive = false
                return nil
            }
            return state.queue.removeFirst()
        }
        next?.continuation.resume(returning: .lead)
        return try result.get()
    }

    /// Writes requests to the journal in order (leader only).
    private func perform(_ requests: [JournalRequest]) async throws(VDError) {
        assertLeader()
        var pending = PendingBatches(journal: state, clusterBytes: clusterBytes)
        for request in requests {
            switch request {
            case .roll:
                try await commit(&pending)
                try await roll()
                pending = PendingBatches(journal: state, clusterBytes: clusterBytes)
            case .barrier:
                break
            case .exclusive(let exclusive):
                try await commit(&pending)
                try await exclusive.run(JournalLeader(journal: self))
                pending = PendingBatches(journal: state, clusterBytes: clusterBytes)
            case .write(let write):
                var entryIndex = 0
                var payloadCursor = 0
                while entryIndex < write.entries.count {
                    // As many entries as fit in one header and in the open SCO (keeping room for the seal marker).
                    let room = Int64(options.scoSizeBytes) - Int64(pending.endOffset) - Int64(2 * SCOFormat.blockBytes)
                    var take = 0
                    var dataCount = 0
                    while entryIndex + take < write.entries.count, take < BatchHeader.entriesMax {
                        let isData: Bool
                        if case .data = write.entries[entryIndex + take] { isData = true } else { isData = false }
                        if Int64((dataCount + (isData ? 1 : 0)) * clusterBytes) > room { break }
                        if isData { dataCount += 1 }
                        take += 1
                    }
                    if take == 0 {
                        // The open SCO is full: write what is pending, seal it and continue in the next one.
                        try await commit(&pending)
                        try await roll()
                        pending = PendingBatches(journal: state, clusterBytes: clusterBytes)
                        continue
                    }
                    let entries = Array(write.entries[entryIndex..<(entryIndex + take)])
                    let indices = Array(write.payloadIndex[payloadCursor..<(payloadCursor + dataCount)])
                    pending.append(entries: entries, buffer: write.buffer, payloadIndex: indices, volumeID: volumeID)
                    entryIndex += take
                    payloadCursor += dataCount
                }
            }
        }
        try await commit(&pending)
    }

    // MARK: leader only

    /// Writes the pending batches with one pwritev, then has the map point at them.
    fileprivate func commit(_ pending: inout PendingBatches) async throws(VDError) {
        guard !pending.batches.isEmpty else { return }
        assertLeader()
        let headers = pending.encodeHeaders()
        let file = state.file
        let start = pending.startOffset
        await reserveJournal(start, pending.endOffset)
        do {
            try withReadablePointers(pending.buffers) { (pointers) throws(VDError) in
                var iovecs: [UnsafeRawBufferPointer] = []
                try headers.withUnsafeReadableBytes { (headerBytes) throws(VDError) in
                    for (index, batch) in pending.batches.enumerated() {
                        iovecs.append(
                            UnsafeRawBufferPointer(
                                rebasing: headerBytes[
                                    (index * SCOFormat.blockBytes)..<((index + 1) * SCOFormat.blockBytes)]))
                        for run in batch.payloadRuns {
                            let base = pointers[run.buffer]
                            iovecs.append(UnsafeRawBufferPointer(rebasing: base[run.start..<(run.start + run.length)]))
                        }
                    }
                    try file.writev(iovecs, at: start)
                }
            }
        } catch {
            // Nothing was replied; the journal position stays, so the next batch overwrites whatever reached the
            // file (and the chain makes any stale batch beyond it unverifiable).
            logger.error("journal write to \(file.path) failed: \(error)")
            throw error
        }
        let written = pending.endOffset - pending.startOffset
        // Mirrored only once written here (a catch-up resends from the local file the ranges `appended` recorded),
        // and before the map takes the batch: the round trip to the peer overlaps the map update (a failed update
        // stops the journal, and the peer then holds a batch the local journal holds too, never replied). The range
        // goes as the buffers just written (large guest writes not copied: `append(compacting:)`), its CRC combined
        // from the batches' own: each header block's, then each data entry's (its cluster's, in payload order). The
        // peer checks that CRC against the bytes.
        if let mirror {
            var bytes = DTLPayload()
            var crc: UInt32 = 0
            for (index, batch) in pending.batches.enumerated() {
                let header = headers.getSlice(
                    at: headers.readerIndex + index * SCOFormat.blockBytes, length: SCOFormat.blockBytes)!
                bytes.append(compacting: header, remaining: Int(written) - bytes.readableBytes)
                crc = CRC32C.combine(crc, CRC32C.checksum(header), lengthB: UInt64(SCOFormat.blockBytes))
                for run in batch.payloadRuns {
                    let source = pending.buffers[run.buffer]
                    bytes.append(
                        compacting: source.getSlice(at: source.readerIndex + run.start, length: run.length)!,
                        remaining: Int(written) - bytes.readableBytes)
                }
                for case .data(_, let clusterCRC) in batch.header.entries {
                    crc = CRC32C.combine(crc, clusterCRC, lengthB: UInt64(pending.clusterBytes))
                }
            }
            bytes.finishCopying()
            precondition(bytes.readableBytes == Int(written), "a mirrored range differs from what was written")
            state.mirrored = mirror.appended(
                epoch: state.epoch, sco: state.sco, offset: pending.startOffset, bytes: bytes, crc: crc)
        }
        let startCheckpoint = MapCheckpoint(
            epoch: state.epoch, offset: pending.startOffset, chainCRC: pending.startChainCRC)
        state.writeOffset = pending.endOffset
        state.chainCRC = pending.chainCRC
        unstoredBytes.add(written, ordering: .relaxed)
        do throws(VDError) {
            try delegate.journalCommitted(
                pending.batches, epoch: state.epoch, sco: state.sco, start: startCheckpoint,
                end: MapCheckpoint(epoch: state.epoch, offset: state.writeOffset, chainCRC: state.chainCRC))
        } catch {
            // The journal holds the batch but the map does not: reads would no longer match what a replay gives.
            // Fail-stop: no more writes; a restart replays the journal into the map.
            let failure = VDError(
                error.code, "volume \(volumeName): the map could not take a journal batch: \(error.message)")
            markFailed(failure)
            throw failure
        }
        let now = env.clock.now()
        let openBytes = state.writeOffset
        shared.withLock { shared in
            shared.writtenGeneration += 1
            shared.openJournalBytes = openBytes
            if shared.openJournalFirstWrite == nil { shared.openJournalFirstWrite = now }
        }
        pending = PendingBatches(journal: state, clusterBytes: clusterBytes)
        considerZeroAhead()
        // The first roll of a session (later ones prepare the next spare as they roll).
        if state.writeOffset > options.scoSizeBytes / 2 { prepareSpare() }
    }

    /// Writes entries without payloads (unmaps, a rollback, a snapshot mark) as one batch (leader only).
    fileprivate func writeEntries(_ entries: [BatchEntry]) async throws(VDError) {
        try await makeRoomForEntries()
        var pending = PendingBatches(journal: state, clusterBytes: clusterBytes)
        pending.append(entries: entries, buffer: ByteBuffer(), payloadIndex: [], volumeID: volumeID)
        try await commit(&pending)
    }

    /// Rolls first if the open SCO has no room for one more batch of entries and the seal marker (leader only).
    fileprivate func makeRoomForEntries() async throws(VDError) {
        if Int64(options.scoSizeBytes) - Int64(state.writeOffset) < Int64(2 * SCOFormat.blockBytes) {
            try await roll()
        }
    }

    /// Seals the open journal with a marker batch and opens the next epoch in a new SCO (leader only). The next SCO's
    /// file is created first, so a failure leaves the open journal exactly as it was.
    fileprivate func roll() async throws(VDError) {
        assertLeader()
        guard state.writeOffset > UInt64(SCOFormat.blockBytes) else { return }
        let old = state.sco
        let oldEpoch = state.epoch
        let oldFile = state.file
        let next = state.highestSCO.next
        let nextEpoch = oldEpoch + 1
        // Creating the file syncs it and its directory: blocking work, off the event loops (a leader may run on one).
        let (fs, layout, volumeID, clusterSizeBytes, sizeBytes) = (
            env.fs, layout, volumeID, clusterSizeBytes, options.scoSizeBytes
        )
        let created: CreatedJournal
        if let ready = await takeSpare(sco: next, epoch: nextEpoch) {
            created = ready
        } else {
            created = try await env.tasks.blocking { () throws(VDError) -> CreatedJournal in
                let (file, headerCRC) = try Self.createJournalFile(
                    fs: fs, layout: layout, volumeID: volumeID, sco: next, epoch: nextEpoch,
                    clusterSizeBytes: clusterSizeBytes, sizeBytes: sizeBytes)
                return CreatedJournal(file: file, headerCRC: headerCRC)
            }
        }
        let (file, headerCRC) = (created.file, created.headerCRC)
        state.highestSCO = next
        env.tasks.failpoint("roll-after-next-journal")
        let marker = BatchHeader(
            volumeID: volumeID, sco: old, offset: state.writeOffset, previousCRC: state.chainCRC,
            flags: BatchHeader.flagSealed, entries: [])
        // Nothing may touch the old file once it is sealed: the zeroer finishes with it first.
        await waitForZeroer()
        await reserveJournal(state.writeOffset, state.writeOffset + UInt64(SCOFormat.blockBytes))
        do {
            try marker.encode().withUnsafeReadableBytes { (raw) throws(VDError) in
                try oldFile.write(raw, at: state.writeOffset)
            }
        } catch {
            shared.withLock { $0.zeroingPaused = false }
            file.close()
            try? env.fs.unlinkIfPresent(file.path)
            throw error
        }
        if let mirror {
            mirror.appended(epoch: oldEpoch, sco: old, offset: state.writeOffset, bytes: marker.encode())
            state.mirrored = mirror.appended(
                epoch: nextEpoch, sco: next, offset: 0,
                bytes: SCOHeader(volumeID: volumeID, sco: next, clusterSizeBytes: clusterSizeBytes, epoch: nextEpoch)
                    .encode())
        }
        state.writeOffset += UInt64(SCOFormat.blockBytes)
        unstoredBytes.add(UInt64(2 * SCOFormat.blockBytes), ordering: .relaxed)
        state.sco = next
        state.epoch = nextEpoch
        state.file = file
        state.writeOffset = UInt64(SCOFormat.blockBytes)
        state.chainCRC = headerCRC
        let now = env.clock.now()
        shared.withLock { shared in
            shared.unsyncedFiles.append(oldFile)
            shared.currentFile = file
            shared.openJournalFirstWrite = nil
            shared.openJournalBytes = UInt64(SCOFormat.blockBytes)
            shared.writtenGeneration += 1
            shared.journalOpenedAt = now
            shared.unsealed[oldEpoch] = (old, oldFile)
            shared.openEpoch = nextEpoch
            shared.openSCO = next
            shared.reservedEnd = UInt64(SCOFormat.blockBytes)
            shared.zeroFrontier = UInt64(SCOFormat.blockBytes)
            shared.zeroingPaused = false
        }
        logger.debug("sealing epoch \(oldEpoch) (SCO \(old.hex)); epoch \(nextEpoch) continues in SCO \(next.hex)")
        // The map now starts the next epoch. Recovery trusts this checkpoint only once the old epoch's seal marker is
        // durable (until then the map may be ahead of the journal).
        try delegate.journalRolled(
            epoch: oldEpoch, sco: old, file: oldFile,
            checkpoint: MapCheckpoint(epoch: nextEpoch, offset: state.writeOffset, chainCRC: headerCRC))
        prepareSpare()
    }

    /// Creates the file the next roll will need (SCO `highestSCO + 1`, epoch `epoch + 1`, header written,
    /// preallocated, durable with its directory entry) in the background, so a roll does not hold every queued write
    /// behind two fsyncs (the largest latency of sequential writes before this). A spare left by a crash is a journal
    /// past the end of the history, exactly what a crash inside a roll leaves: recovery moves it aside and never
    /// reuses its number. A spare that cannot be created (a full disk) is simply not there: the roll then creates
    /// the file itself and fails as it always did (leader only).
    func prepareSpare() {
        assertLeader()
        let sco = state.highestSCO.next
        let epoch = state.epoch + 1
        let (fs, layout, volumeID, clusterSizeBytes, sizeBytes) = (
            env.fs, layout, volumeID, clusterSizeBytes, options.scoSizeBytes
        )
        let claimed = spare.withLock { spare -> Bool in
            guard case .none = spare else { return false }
            spare = .creating(sco: sco, epoch: epoch)
            return true
        }
        guard claimed else { return }
        let tasks = env.tasks
        let logger = self.logger
        spawnTracked { [self] in
            let created: CreatedJournal?
            do {
                created = try await tasks.blocking { () throws(VDError) -> CreatedJournal in
                    let (file, headerCRC) = try Self.createJournalFile(
                        fs: fs, layout: layout, volumeID: volumeID, sco: sco, epoch: epoch,
                        clusterSizeBytes: clusterSizeBytes, sizeBytes: sizeBytes)
                    return CreatedJournal(file: file, headerCRC: headerCRC)
                }
            } catch {
                logger.debug("the next journal file was not created ahead (\(error)); the roll will create it")
                created = nil
            }
            let waiter = self.spare.withLock { spare -> UnsafeContinuation<CreatedJournal?, Never>? in
                guard case .creating(_, _, let waiter) = spare else { return nil }
                spare = created.map { .ready(sco: sco, epoch: epoch, $0) } ?? .none
                if waiter != nil { spare = .none }
                return waiter
            }
            waiter?.resume(returning: created)
        }
    }

    /// The spare journal for `sco`/`epoch`, waiting for it if it is being created; nil when there is none.
    private func takeSpare(sco: SCONumber, epoch: UInt64) async -> CreatedJournal? {
        let taken: CreatedJournal? = await withUnsafeContinuation { continuation in
            let now = spare.withLock { spare -> (CreatedJournal?, Bool) in
                switch spare {
                case .none:
                    return (nil, true)
                case .ready(let readySCO, let readyEpoch, let created):
                    spare = .none
                    precondition(
                        readySCO == sco && readyEpoch == epoch, "the spare journal is not the one the roll needs")
                    return (created, true)
                case .creating(let creatingSCO, let creatingEpoch, _):
                    precondition(
                        creatingSCO == sco && creatingEpoch == epoch,
                        "the spare journal is not the one the roll needs")
                    spare = .creating(sco: creatingSCO, epoch: creatingEpoch, waiter: continuation)
                    return (nil, false)
                }
            }
            if now.1 { continuation.resume(returning: now.0) }
        }
        return taken
    }

    /// Creates SCO file `sco` for epoch `epoch` with its header, preallocated to `sizeBytes`, durable (file and
    /// directory entry). On failure (a full disk) nothing is left behind.
    static func createJournalFile(
        fs: any FileSystem, layout: VolumeLayout, volumeID: VolumeID, sco: SCONumber, epoch: UInt64,
        clusterSizeBytes: UInt32, sizeBytes: UInt64
    ) throws(VDError) -> (FlashFile, UInt32) {
        let path = layout.scoPath(sco)
        precondition(!fs.fileExists(path), "SCO number \(sco.hex) is used again")
        let file = try fs.open(path, options: [.create, .exclusive])
        do throws(VDError) {
            do throws(VDError) {
                try file.preallocate(sizeBytes, keepSize: false)
            } catch  where error.code != .noSpace {
                // Some file systems cannot preallocate; appending still works.
            }
            let header = SCOHeader(volumeID: volumeID, sco: sco, clusterSizeBytes: clusterSizeBytes, epoch: epoch)
                .encode()
            try header.withUnsafeReadableBytes { (raw) throws(VDError) in try file.write(raw, at: 0) }
            try file.sync()
            try fs.syncDirectory(layout.scoDirectory)
            return (file, BatchHeader.storedCRC(of: header))
        } catch {
            file.close()
            try? fs.unlinkIfPresent(path)
            throw error
        }
    }

    // MARK: state others read

    /// The epoch the journal appends to now (every write replied so far is in this epoch or an earlier one).
    var openEpoch: UInt64 { shared.withLock { $0.openEpoch } }
    /// The open journal: its epoch, SCO and file (for readers of its batches: `Volume.changedClusters`).
    var openJournal: (epoch: UInt64, sco: SCONumber, file: FlashFile) {
        shared.withLock { ($0.openEpoch, $0.openSCO, $0.currentFile) }
    }

    /// The journal of a rolled epoch whose TLog is not written yet.
    func unsealedJournal(_ epoch: UInt64) -> (sco: SCONumber, file: FlashFile)? {
        shared.withLock { $0.unsealed[epoch] }
    }

    /// Epoch `epoch`'s TLog is written: its changes are read from there now.
    func tlogWritten(_ epoch: UInt64) { _ = shared.withLock { $0.unsealed.removeValue(forKey: epoch) } }
    var failure: VDError? { shared.withLock { $0.failure } }
    var writtenGeneration: UInt64 { shared.withLock { $0.writtenGeneration } }

    /// What a flush must sync now to cover every write so far: the generation and the files.
    func syncTarget() -> (generation: UInt64, files: [FlashFile]) {
        shared.withLock { ($0.writtenGeneration, $0.unsyncedFiles + [$0.currentFile]) }
    }

    /// `files` were synced: rolled ones among them need no more syncs.
    func synced(_ files: [FlashFile]) {
        shared.withLock { shared in
            shared.unsyncedFiles.removeAll { synced in synced !== shared.currentFile && files.contains { $0 === synced }
            }
        }
    }

    /// A rolled journal was sealed (synced): flushes need not sync it any more.
    func sealedFile(_ file: FlashFile) {
        shared.withLock { state in state.unsyncedFiles.removeAll { $0 === file } }
    }

    /// When the open journal's first write happened (nil: empty, or writes are stopped).
    var openJournalFirstWrite: MonotonicInstant? {
        shared.withLock { $0.failure == nil ? $0.openJournalFirstWrite : nil }
    }
    var openJournalBytes: UInt64 { shared.withLock { $0.openJournalBytes } }

    /// Refuses further writes: closing (`.shutdown`), or a failure that may have lost acknowledged data. Returns
    /// whether this was the first failure.
    @discardableResult
    func refuseWrites(_ error: VDError) -> Bool {
        shared.withLock { state -> Bool in
            guard state.failure == nil || (state.failure?.code == .shutdown && error.code != .shutdown) else {
                return false
            }
            state.failure = error
            return true
        }
    }

    /// Stops writes for good after a failure that may have lost acknowledged data on local flash.
    func markFailed(_ error: VDError) {
        if refuseWrites(error) { logger.critical("writes to volume \(volumeName) are stopped: \(error)") }
    }

    /// Whether a leader is active or requests are queued.
    var isBusy: Bool { shared.withLock { $0.leaderActive || !$0.queue.isEmpty } }

    /// Starts a task the journal waits for when it stops.
    func spawnTracked(_ body: @escaping @Sendable () async -> Void) {
        let task = env.tasks.spawn(body)
        background.withLock { tasks in
            tasks.removeAll { $0.isCancelled }
            tasks.append(task)
        }
    }

    /// Waits for the journal's own tasks (writes are refused by then).
    func stop() async {
        let tasks = background.withLock { tasks -> [Task<Void, Never>] in
            defer { tasks = [] }
            return tasks
        }
        for task in tasks { await task.value }
        state.file.close()
        // A spare journal nobody will use: removed (a leftover would only be moved aside by the next recovery).
        let unused = spare.withLock { spare -> CreatedJournal? in
            defer { spare = .none }
            if case .ready(_, _, let created) = spare { return created }
            return nil
        }
        if let unused {
            unused.file.close()
            try? env.fs.unlinkIfPresent(unused.file.path)
        }
    }
}

/// The next journal file, created ahead of its roll.
enum SpareJournal {
    case none
    /// Being created; `waiter` is a roll waiting for it.
    case creating(sco: SCONumber, epoch: UInt64, waiter: UnsafeContinuation<CreatedJournal?, Never>? = nil)
    case ready(sco: SCONumber, epoch: UInt64, CreatedJournal)
}

/// A journal file just created (sent back from the blocking pool).
struct CreatedJournal: @unchecked Sendable {
    var file: FlashFile
    var headerCRC: UInt32
}

/// Leader rights, handed to an exclusive request while it runs: the journal operations only a leader may do.
struct JournalLeader: @unchecked Sendable {
    fileprivate let journal: Journal

    /// The epoch being written.
    var epoch: UInt64 { journal.assertLeader(); return journal.state.epoch }
    func writeEntries(_ entries: [BatchEntry]) async throws(VDError) { try await journal.writeEntries(entries) }
    func roll() async throws(VDError) { try await journal.roll() }
    func makeRoomForEntries() async throws(VDError) { try await journal.makeRoomForEntries() }
}

/// Batches gathered by a leader before one pwritev.
struct PendingBatches {
    struct PayloadRun {
        var buffer: Int
        var start: Int
        var length: Int
    }

    struct Batch {
        var header: BatchHeader
        var payloadRuns: [PayloadRun]
    }

    let startOffset: UInt64
    let startChainCRC: UInt32
    var endOffset: UInt64
    var chainCRC: UInt32
    let sco: SCONumber
    let clusterBytes: Int
    var batches: [Batch] = []
    var buffers: [ByteBuffer] = []
    private var encodedHeaders: [ByteBuffer] = []

    init(journal: JournalState, clusterBytes: Int) {
        startOffset = journal.writeOffset
        startChainCRC = journal.chainCRC
        endOffset = journal.writeOffset
        chainCRC = journal.chainCRC
        sco = journal.sco
        self.clusterBytes = clusterBytes
    }

    mutating func append(entries: [BatchEntry], buffer: ByteBuffer, payloadIndex: [Int], volumeID: VolumeID) {
        let header = BatchHeader(
            volumeID: volumeID, sco: sco, offset: endOffset, previousCRC: chainCRC, entries: entries)
        var runs: [PayloadRun] = []
        if !payloadIndex.isEmpty {
            let bufferIndex: Int
            if let last = buffers.indices.last, buffers[last] == buffer {
                bufferIndex = last
            } else {
                buffers.append(buffer)
                bufferIndex = buffers.count - 1
            }
            for index in payloadIndex {
                let start = index * clusterBytes
                if let last = runs.last, last.start + last.length == start {
                    runs[runs.count - 1].length += clusterBytes
                } else {
                    runs.append(PayloadRun(buffer: bufferIndex, start: start, length: clusterBytes))
                }
            }
        }
        let encoded = header.encode()
        encodedHeaders.append(encoded)
        chainCRC = BatchHeader.storedCRC(of: encoded)
        endOffset += UInt64(SCOFormat.blockBytes + payloadIndex.count * clusterBytes)
        batches.append(Batch(header: header, payloadRuns: runs))
    }

    func encodeHeaders() -> ByteBuffer {
        var all = ByteBufferAllocator().buffer(capacity: encodedHeaders.count * SCOFormat.blockBytes)
        for header in encodedHeaders { all.writeImmutableBuffer(header) }
        return all
    }
}
