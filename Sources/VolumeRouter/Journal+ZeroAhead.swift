// Initializing the open journal ahead of its write position, so flushes stay cheap.
//
// The journal file is preallocated, but preallocated blocks are "unwritten" extents: the first fdatasync after data
// lands in them must also commit the extent change to the file system's journal, which on ext4 roughly doubles the
// cost of a flush. Blocks written once before (with zeroes) have no such cost. So while a volume writes slowly (the
// flush-heavy case: databases, small synchronous writes), a background task writes zeroes a little ahead of the
// journal's write position and syncs them. When the volume writes fast, zeroing would only steal bandwidth and would
// be overtaken anyway, so it stops.
//
// Coordination: the leader publishes how far it has reserved the file before each write; the zeroer only zeroes
// beyond that, one chunk at a time, and publishes the chunk it is writing; a leader that would write into that chunk
// waits for it (at most one 1 MiB write). A roll waits for the zeroer to finish with the old file, so nothing ever
// touches a sealed SCO.

import FlashIO
import Logging
import Synchronization
import VolumeCore

extension Journal {
    static let zeroChunkBytes: UInt64 = 1 << 20
    /// How far ahead of the write position zeroes are kept.
    static let zeroRunwayBytes: UInt64 = 8 << 20
    /// Above this journal write rate, zeroing ahead stops.
    static let zeroAheadRateMaxBytesPerSecond: Double = 32 * 1024 * 1024

    /// Leader only: reserves `[start, end)` of the open journal, waiting out a zeroing chunk that overlaps it.
    func reserveJournal(_ start: UInt64, _ end: UInt64) async {
        assertLeader()
        while true {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                let busy = shared.withLock { state -> Bool in
                    state.reservedEnd = max(state.reservedEnd, end)
                    guard let zeroing = state.zeroing, zeroing.lowerBound < end && start < zeroing.upperBound else {
                        return false
                    }
                    state.zeroWaiters.append(continuation)
                    return true
                }
                if !busy { continuation.resume() }
            }
            // Checked again: the zeroer may have started the next chunk (never one overlapping the reservation).
            let clear = shared.withLock { state -> Bool in
                guard let zeroing = state.zeroing else { return true }
                return !(zeroing.lowerBound < end && start < zeroing.upperBound)
            }
            if clear { return }
        }
    }

    /// Leader only, before a roll: waits until no zeroing chunk is being written (and stops new ones).
    func waitForZeroer() async {
        assertLeader()
        while true {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                let busy = shared.withLock { state -> Bool in
                    state.zeroingPaused = true
                    guard state.zeroing != nil else { return false }
                    state.zeroWaiters.append(continuation)
                    return true
                }
                if !busy { continuation.resume() }
            }
            if shared.withLock({ $0.zeroing == nil }) { return }
        }
    }

    /// After a commit: starts the zeroer if the journal writes slowly and the zeroed runway is short.
    func considerZeroAhead() {
        guard options.zeroAhead else { return }
        let scoSize = options.scoSizeBytes
        let now = env.clock.now()
        let start = shared.withLock { state -> Bool in
            guard !state.zeroerRunning, state.failure == nil, !state.zeroingPaused, state.zeroFrontier < scoSize,
                state.zeroFrontier < state.reservedEnd + Self.zeroRunwayBytes, state.journalIsSlow(now: now)
            else { return false }
            state.zeroerRunning = true
            return true
        }
        if start { spawnTracked { await self.zeroAhead() } }
    }

    private func zeroAhead() async {
        let scoSize = options.scoSizeBytes
        while true {
            let now = env.clock.now()
            let job = shared.withLock { state -> (FlashFile, Range<UInt64>)? in
                let alignedReserve =
                    (state.reservedEnd + Self.zeroChunkBytes - 1) / Self.zeroChunkBytes * Self.zeroChunkBytes
                let start = max(state.zeroFrontier, alignedReserve)
                guard state.failure == nil, !state.zeroingPaused, start < scoSize,
                    start < state.reservedEnd + Self.zeroRunwayBytes, state.journalIsSlow(now: now)
                else {
                    state.zeroerRunning = false
                    return nil
                }
                let range = start..<min(start + Self.zeroChunkBytes, scoSize)
                precondition(
                    range.lowerBound >= state.reservedEnd, "the zeroer would overlap the journal's reserved range")
                state.zeroing = range
                return (state.currentFile, range)
            }
            guard let (file, range) = job else { return }
            let ok: Bool
            let clock = env.clock
            let metrics = self.metrics
            do {
                try await env.tasks.blocking { () throws(VDError) in
                    try VDError.catching {
                        try Self.zeroBuffer.withUnsafeBytes { raw in
                            var offset = range.lowerBound
                            while offset < range.upperBound {
                                let count = Int(min(UInt64(raw.count), range.upperBound - offset))
                                try file.write(UnsafeRawBufferPointer(rebasing: raw[0..<count]), at: offset)
                                offset += UInt64(count)
                            }
                        }
                    }
                    let start = clock.now()
                    try file.dataSync()
                    metrics.fdatasync.record(since: start, now: clock.now())
                }
                ok = true
            } catch {
                logger.debug("zeroing the journal ahead stopped: \(error)")
                ok = false
            }
            let waiters = shared.withLock { state -> [UnsafeContinuation<Void, Never>] in
                if ok, state.currentFile === file { state.zeroFrontier = max(state.zeroFrontier, range.upperBound) }
                state.zeroing = nil
                if !ok { state.zeroerRunning = false }
                defer { state.zeroWaiters = [] }
                return state.zeroWaiters
            }
            for waiter in waiters { waiter.resume() }
            if !ok { return }
        }
    }

    private static let zeroBuffer = [UInt8](repeating: 0, count: Int(zeroChunkBytes))
}

extension JournalShared {
    /// The open journal fills slowly enough that zeroing ahead pays (and keeps up).
    func journalIsSlow(now: MonotonicInstant) -> Bool {
        let seconds = max(0.05, journalOpenedAt.duration(to: now).seconds)
        return Double(openJournalBytes) / seconds < Journal.zeroAheadRateMaxBytesPerSecond
    }
}
