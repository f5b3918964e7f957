// The write path's core: requests are appended to the open SCO journal by one leader at a time. Whoever submits
// while no leader is active becomes the leader; others queue. A leader takes every queued request (up to a bound),
// writes them as chained batches with one pwritev, updates the map, replies to the followers and hands leadership to
// the next queued request. Concurrent writers thus share system calls (group writes) without any added wait at
// queue depth 1.
//
// Rolling (sealing the open SCO and starting the next) happens inside the leader too, so every journal operation
// is ordered: a roll, or a snapshot later, falls between two writes, never through one.

import BlockMap
import Collections
import FlashIO
import Logging
import NIOCore
import SCOCache
import Synchronization
import TransactionLog
import VolumeCore

/// Full clusters to append: batch entries in address order, and for each data entry the index of its cluster in
/// `buffer`.
struct ClusterWrite: Sendable {
    var entries: [BatchEntry]
    var payloadIndex: [Int]
    var buffer: ByteBuffer
}

enum JournalRequest: Sendable {
    case write(ClusterWrite)
    /// Seal the open SCO (if it holds anything) and start the next.
    case roll
    /// Nothing: completes once every request queued before it is done (close waits with it).
    case barrier
    /// Take a snapshot or roll back (see Volume+Snapshots.swift).
    case snapshot(SnapshotRequest)
    /// Apply a scrub result (see Volume+Scrub.swift).
    case applyScrub(ScrubApplyRequest)
}

enum LeaderSignal: Sendable {
    case done(Result<Void, VDError>)
    case lead
}

struct QueuedRequest {
    var request: JournalRequest
    var continuation: UnsafeContinuation<LeaderSignal, Never>
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

    init(epoch: UInt64, sco: SCONumber, highestSCO: SCONumber, file: FlashFile, writeOffset: UInt64, chainCRC: UInt32) {
        precondition(sco <= highestSCO && !ScrubResult.isScrubSCO(sco), "a journal SCO number above the high-water mark")
        self.epoch = epoch
        self.sco = sco
        self.highestSCO = highestSCO
        self.file = file
        self.writeOffset = writeOffset
        self.chainCRC = chainCRC
    }
}

struct WriterState {
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
    /// The open journal's epoch.
    var openEpoch: UInt64 = 0
    /// SCOs that exist only on local flash (the open journal and sealed SCOs not yet stored with their TLog): a
    /// local copy of any other SCO that fails verification is replaced by the backend's.
    var localOnlySCOs: Set<SCONumber> = []
    /// Bytes in the open journal.
    var openJournalBytes: UInt64 = UInt64(SCOFormat.blockBytes)
    /// When the open journal was started.
    var journalOpenedAt: MonotonicInstant
    /// Zeroing ahead (Volume+ZeroAhead.swift): how far the leader has reserved the open journal, up to where it is
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

extension Volume {
    /// Most bytes a leader writes in one round (the rest waits for the next leader).
    static let leaderRoundBytesMax = 64 << 20

    /// Appends a request to the journal, as leader or as a follower of the current leader. `whileClosing`: the
    /// volume's own requests at close (the final roll), accepted after client writes are refused.
    func submit(_ request: JournalRequest, whileClosing: Bool = false) async throws(VDError) {
        let signal: LeaderSignal = await withUnsafeContinuation { continuation in
            let outcome = writer.withLock { state -> LeaderSignal? in
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
            try result.get()
        case .lead:
            // Let requests that are already runnable (typically the rest of what the NBD server decoded from the
            // same socket read, on the same event loop) queue behind this one, so one pwritev carries them all.
            await Task.yield()
            try await lead(own: request)
        }
    }

    /// Only the journal leader touches the journal: checked wherever it does.
    func assertLeader() {
        precondition(writer.withLock { $0.leaderActive }, "the journal was touched outside the leader")
    }

    private func lead(own: JournalRequest) async throws(VDError) {
        let followers = writer.withLock { state -> [QueuedRequest] in
            var taken: [QueuedRequest] = []
            var bytes = 0
            while let next = state.queue.first, bytes < Self.leaderRoundBytesMax {
                if case .write(let write) = next.request { bytes += write.payloadIndex.count * clusterBytes }
                taken.append(state.queue.removeFirst())
            }
            return taken
        }
        let result: Result<Void, VDError>
        do {
            try await perform([own] + followers.map(\.request))
            result = .success(())
        } catch {
            result = .failure(error)
        }
        for follower in followers { follower.continuation.resume(returning: .done(result)) }
        let next = writer.withLock { state -> QueuedRequest? in
            if state.queue.isEmpty {
                state.leaderActive = false
                return nil
            }
            return state.queue.removeFirst()
        }
        next?.continuation.resume(returning: .lead)
        try result.get()
    }

    /// Writes requests to the journal in order (leader only).
    private func perform(_ requests: [JournalRequest]) async throws(VDError) {
        assertLeader()
        var pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
        for request in requests {
            switch request {
            case .roll:
                try await commit(&pending)
                try await roll()
                pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
            case .barrier:
                break
            case .snapshot(let request):
                try await commit(&pending)
                try await performSnapshotRequest(request)
                pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
            case .applyScrub(let request):
                try await commit(&pending)
                try await performScrubApply(request)
                pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
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
                        pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
                        continue
                    }
                    let entries = Array(write.entries[entryIndex..<(entryIndex + take)])
                    let indices = Array(write.payloadIndex[payloadCursor..<(payloadCursor + dataCount)])
                    pending.append(entries: entries, buffer: write.buffer, payloadIndex: indices, volumeID: config.id)
                    entryIndex += take
                    payloadCursor += dataCount
                }
            }
        }
        try await commit(&pending)
    }

    /// Writes the pending batches with one pwritev, then points the map at them.
    func commit(_ pending: inout PendingBatches) async throws(VDError) {
        guard !pending.batches.isEmpty else { return }
        assertLeader()
        let headers = pending.encodeHeaders()
        let file = journal.file
        let start = pending.startOffset
        await reserveJournal(start, pending.endOffset)
        do {
            try withPointers(pending.buffers) { (pointers) throws(VDError) in
                var iovecs: [UnsafeRawBufferPointer] = []
                try headers.withUnsafeReadableBytes { (headerBytes) throws(VDError) in
                    for (index, batch) in pending.batches.enumerated() {
                        iovecs.append(
                            UnsafeRawBufferPointer(
                                rebasing: headerBytes[(index * SCOFormat.blockBytes)..<((index + 1) * SCOFormat.blockBytes)]))
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
        journal.writeOffset = pending.endOffset
        journal.chainCRC = pending.chainCRC
        unstoredBytes.add(written, ordering: .relaxed)
        var changes = mapChanges()
        changes.dirtyCheckpoint = MapCheckpoint(
            epoch: journal.epoch, offset: pending.startOffset, chainCRC: pending.startChainCRC
        ).dirty(until: pending.endOffset)
        do {
            for batch in pending.batches {
                try changes.add(
                    entries: batch.header.entries, sco: journal.sco, epoch: journal.epoch,
                    payloadOffset: batch.header.offset + UInt64(SCOFormat.blockBytes), clusterBytes: clusterBytes)
            }
            try changes.finish(
                checkpoint: MapCheckpoint(epoch: journal.epoch, offset: journal.writeOffset, chainCRC: journal.chainCRC))
        } catch {
            // The journal holds the batch but the map does not: reads would no longer match what a replay gives.
            // Fail-stop: no more writes; a restart replays the journal into the map.
            let failure = VDError(error.code, "volume \(config.name): the map could not take a journal batch: \(error.message)")
            markFailed(failure)
            throw failure
        }
        let now = env.clock.now()
        let openBytes = journal.writeOffset
        writer.withLock { state in
            state.writtenGeneration += 1
            state.openJournalBytes = openBytes
            if state.openJournalFirstWrite == nil { state.openJournalFirstWrite = now }
        }
        pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
        considerZeroAhead()
    }

    /// Writes entries without payloads (unmaps, a rollback) as one batch and applies them (leader only).
    func writeEntries(_ entries: [BatchEntry]) async throws(VDError) {
        try await makeRoomForEntries()
        var pending = PendingBatches(journal: journal, clusterBytes: clusterBytes)
        pending.append(entries: entries, buffer: ByteBuffer(), payloadIndex: [], volumeID: config.id)
        try await commit(&pending)
    }

    /// Rolls first if the open SCO has no room for one more batch of entries and the seal marker (leader only).
    func makeRoomForEntries() async throws(VDError) {
        if Int64(options.scoSizeBytes) - Int64(journal.writeOffset) < Int64(2 * SCOFormat.blockBytes) {
            try await roll()
        }
    }

    /// Seals the open journal with a marker batch and opens the next SCO (leader only). The next SCO's file is
    /// created first, so a failure leaves the open journal exactly as it was.
    func roll() async throws(VDError) {
        assertLeader()
        guard journal.writeOffset > UInt64(SCOFormat.blockBytes) else { return }
        let old = journal.sco
        let oldEpoch = journal.epoch
        let oldFile = journal.file
        let next = journal.highestSCO.next
        let nextEpoch = oldEpoch + 1
        let (file, headerCRC) = try Self.createJournalFile(
            fs: env.fs, layout: layout, volumeID: config.id, sco: next, epoch: nextEpoch,
            clusterSizeBytes: config.clusterSizeBytes, sizeBytes: options.scoSizeBytes)
        journal.highestSCO = next
        env.tasks.failpoint("roll-after-next-journal")
        let marker = BatchHeader(
            volumeID: config.id, sco: old, offset: journal.writeOffset, previousCRC: journal.chainCRC,
            flags: BatchHeader.flagSealed, entries: [])
        // Nothing may touch the old file once it is sealed: the zeroer finishes with it first.
        await waitForZeroer()
        await reserveJournal(journal.writeOffset, journal.writeOffset + UInt64(SCOFormat.blockBytes))
        do {
            try marker.encode().withUnsafeReadableBytes { (raw) throws(VDError) in
                try oldFile.write(raw, at: journal.writeOffset)
            }
        } catch {
            writer.withLock { $0.zeroingPaused = false }
            file.close()
            try? env.fs.unlinkIfPresent(file.path)
            throw error
        }
        journal.writeOffset += UInt64(SCOFormat.blockBytes)
        unstoredBytes.add(UInt64(2 * SCOFormat.blockBytes), ordering: .relaxed)
        cache.add(cacheKey(next), file: file, footprintBytes: options.scoSizeBytes)
        journal.sco = next
        journal.epoch = nextEpoch
        journal.file = file
        journal.writeOffset = UInt64(SCOFormat.blockBytes)
        journal.chainCRC = headerCRC
        let now = env.clock.now()
        writer.withLock { state in
            state.unsyncedFiles.append(oldFile)
            state.currentFile = file
            state.openJournalFirstWrite = nil
            state.openJournalBytes = UInt64(SCOFormat.blockBytes)
            state.writtenGeneration += 1
            state.journalOpenedAt = now
            state.openEpoch = nextEpoch
            state.localOnlySCOs.insert(next)
            state.reservedEnd = UInt64(SCOFormat.blockBytes)
            state.zeroFrontier = UInt64(SCOFormat.blockBytes)
            state.zeroingPaused = false
        }
        // The map now starts the next epoch. Recovery trusts this checkpoint only once the old epoch's seal marker is
        // durable (until then the map may be ahead of the journal).
        var update = MapUpdate()
        update.metadata.append(
            (MapCheckpoint.key, MapCheckpoint(epoch: nextEpoch, offset: journal.writeOffset, chainCRC: headerCRC).encode()))
        try map.apply(update)
        env.tasks.failpoint("roll-after-checkpoint")
        logger.debug("sealing epoch \(oldEpoch) (SCO \(old.hex)); epoch \(nextEpoch) continues in SCO \(next.hex)")
        let tableVersion = snapshotTable.version
        startBackground { volume in await volume.seal(old, epoch: oldEpoch, file: oldFile, tableVersion: tableVersion) }
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
            } catch where error.code != .noSpace {
                // Some file systems cannot preallocate; appending still works.
            }
            let header = SCOHeader(volumeID: volumeID, sco: sco, clusterSizeBytes: clusterSizeBytes, epoch: epoch).encode()
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

    /// Runs `body` as a tracked background task (cancelled and awaited on close).
    func startBackground(_ body: @escaping @Sendable (Volume) async -> Void) {
        let task = env.tasks.spawn { [self] in await body(self) }
        background.withLock { tasks in
            tasks.removeAll { $0.isCancelled }
            tasks.append(task)
        }
    }
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
        let header = BatchHeader(volumeID: volumeID, sco: sco, offset: endOffset, previousCRC: chainCRC, entries: entries)
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

/// Calls `body` with stable pointers to the readable bytes of every buffer.
func withPointers(
    _ buffers: [ByteBuffer], _ body: ([UnsafeRawBufferPointer]) throws(VDError) -> Void
) throws(VDError) {
    var pointers: [UnsafeRawBufferPointer] = []
    pointers.reserveCapacity(buffers.count)
    try nest(buffers[...], &pointers, body)
}

private func nest(
    _ rest: ArraySlice<ByteBuffer>, _ pointers: inout [UnsafeRawBufferPointer],
    _ body: ([UnsafeRawBufferPointer]) throws(VDError) -> Void
) throws(VDError) {
    guard let first = rest.first else { return try body(pointers) }
    try first.withUnsafeReadableBytes { (raw) throws(VDError) in
        pointers.append(raw)
        try nest(rest.dropFirst(), &pointers, body)
    }
}

