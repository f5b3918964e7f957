// Making writes durable: group-commit flushes. A flush covers every write replied before it. It records the
// journal's write generation; one flusher at a time runs an fdatasync round of the open journal (and of any rolled
// journal not yet known durable), off the event loops, on the blocking pool; flushes arriving meanwhile wait and are
// all served by the next round (the runner hands its role to one of them). A failed fdatasync is fatal for the
// volume's writes (after such a failure Linux may have dropped the dirty pages, so a retry could falsely succeed):
// writes and flushes fail from then on, reads continue.
//
// Owns: the synced generation and the waiting flushes.

import FlashIO
import Synchronization
import VolumeCore

final class GroupCommit: Sendable {
    private struct State {
        var syncedGeneration: UInt64 = 0
        /// A flusher is running a round (only one at a time).
        var inFlight = false
        var waiters: [(generation: UInt64, continuation: UnsafeContinuation<Signal, Never>)] = []
    }

    /// What a waiting flush is told.
    private enum Signal {
        case done(Result<Void, VDError>)
        /// Run the next round yourself (the previous runner handed over).
        case run
    }

    private let journal: Journal
    private let state = Mutex(State())

    init(journal: Journal) { self.journal = journal }

    /// Every write up to this generation is known durable.
    var syncedGeneration: UInt64 { state.withLock { $0.syncedGeneration } }

    /// Every write replied so far is on stable storage when this returns.
    func flush() async throws(VDError) {
        let target = journal.writtenGeneration
        if let failure = journal.failure, failure.code != .shutdown { throw failure }
        try await syncThrough(target)
    }

    /// Waits until every write of generation `target` or older is on stable storage.
    func syncThrough(_ target: UInt64) async throws(VDError) {
        let signal: Signal = await withUnsafeContinuation { continuation in
            let immediate = state.withLock { state -> Signal? in
                if state.syncedGeneration >= target { return .done(.success(())) }
                if !state.inFlight {
                    state.inFlight = true
                    return .run
                }
                state.waiters.append((target, continuation))
                return nil
            }
            if let immediate { continuation.resume(returning: immediate) }
        }
        switch signal {
        case .done(let result): try result.get()
        case .run: try await runRound(target: target)
        }
    }

    /// One fdatasync round by the current runner; then hands the runner role to a flush still waiting, if any.
    private func runRound(target: UInt64) async throws(VDError) {
        let (generation, files) = journal.syncTarget()
        precondition(generation >= target, "a flush waits for a write generation that does not exist yet")
        var failure: VDError?
        let clock = journal.env.clock
        let metrics = journal.metrics
        do {
            try await journal.env.tasks.blocking { () throws(VDError) in
                for file in files {
                    do throws(VDError) {
                        let start = clock.now()
                        try file.dataSync()
                        metrics.fdatasync.record(since: start, now: clock.now())
                    } catch {
                        throw VDError(
                            error.code == .noSpace ? .noSpace : .io,
                            "cannot make writes durable (fdatasync \(file.path)): \(error.message)")
                    }
                }
            }
        } catch {
            failure = VDError(error.code, "volume \(journal.volumeName): \(error.message)")
        }
        if let failure {
            journal.markFailed(failure)
        } else {
            journal.synced(files)
        }
        let (ready, next) = state.withLock {
            state -> ([UnsafeContinuation<Signal, Never>], UnsafeContinuation<Signal, Never>?) in
            if failure == nil { state.syncedGeneration = max(state.syncedGeneration, generation) }
            var ready: [UnsafeContinuation<Signal, Never>] = []
            var remaining: [(generation: UInt64, continuation: UnsafeContinuation<Signal, Never>)] = []
            for waiter in state.waiters {
                if failure != nil || waiter.generation <= state.syncedGeneration {
                    ready.append(waiter.continuation)
                } else {
                    remaining.append(waiter)
                }
            }
            if remaining.isEmpty {
                state.inFlight = false
                state.waiters = []
                return (ready, nil)
            }
            state.waiters = Array(remaining.dropFirst())
            return (ready, remaining[0].continuation)
        }
        let result: Result<Void, VDError> = failure.map { .failure($0) } ?? .success(())
        for continuation in ready { continuation.resume(returning: .done(result)) }
        next?.resume(returning: .run)
        try result.get()
    }
}
