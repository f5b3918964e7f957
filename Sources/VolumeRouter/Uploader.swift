// Moving sealed SCOs and their TLogs to the backend, and slowing writers down when that falls behind.
//
// Order rules (they give the backend contract: the namespace alone restarts the volume up to its last TLog):
// - SCOs upload in parallel (bounded), each as soon as it is sealed;
// - the snapshot table goes up before any TLog that may depend on it (a snapshot or a rollback in its epoch);
// - TLog N uploads only after SCO N and TLog N-1 are on the backend, so the TLogs on the backend are always a
//   contiguous prefix whose data is all there;
// - only then is epoch N "stored": its SCO's local copy becomes evictable.
// Failures are retried forever with exponential backoff and jitter (object names are never reused, so a PUT whose
// outcome is unknown is simply repeated); writes keep landing on local flash meanwhile, up to the pending bound.
//
// Owns: which epochs are sealed, uploading, uploaded and stored, which SCOs exist only locally, the last error.

import FlashIO
import Logging
import NIOCore
import ObjectStore
import Synchronization
import TransactionLog
package import VolumeCore

/// A sealed epoch waiting to be stored.
struct SealedEpoch {
    var sco: SCONumber
    var lengthBytes: UInt64
    /// The snapshot table version when the epoch was sealed: its TLog may depend on it, so the TLog is uploaded only
    /// once that table version is on the backend.
    var tableVersion: UInt64
}

/// What `vd` reports about a volume's uploads.
package struct UploadStatus: Sendable {
    /// Every epoch up to this one is on the backend.
    package var storedThrough: SCONumber
    package var pendingSCOs: Int
    package var unstoredBytes: UInt64
    package var lastError: VDError?
}

/// What the uploader needs from its volume.
protocol UploaderDelegate: AnyObject, Sendable {
    /// Puts sealed SCO `sco` (its first `lengthBytes`) on the backend.
    func putSCO(_ sco: SCONumber, lengthBytes: UInt64) async throws(VDError)
    /// Epoch `epoch` (SCO `sco`) is stored: its local copy may go.
    func epochStored(_ epoch: SCONumber, sco: SCONumber, lengthBytes: UInt64)
    /// Whether metadata another owner would adopt (the snapshot table) may be written now: the owner lease, if any,
    /// is valid. (SCOs and TLogs carry the generation in their names; the table is read whole by a taker.)
    var mayWriteMetadata: Bool { get }
}

final class Uploader: Sendable {
    private struct State {
        var storedThrough: SCONumber
        var sealed: [SCONumber: SealedEpoch] = [:]
        var scoUploading: Set<SCONumber> = []
        var scoUploaded: Set<SCONumber> = []
        /// SCOs that exist only on local flash (journals not yet stored with their TLog): a local copy of any other
        /// SCO that fails verification is replaced by the backend's.
        var localOnly: Set<SCONumber> = []
        var wake: UnsafeContinuation<Void, Never>?
        var stopping = false
        var lastError: VDError?
        var lastErrorLogged: MonotonicInstant?
    }

    private let state: Mutex<State>
    private let backend: any ObjectStore
    private let layout: VolumeLayout
    private let generations: GenerationChain
    private let options: VolumeOptions
    private let env: Environment
    private let logger: Logger
    private let catalog: SnapshotCatalog
    private let journal: Journal
    private let delegateBox = Mutex<(any UploaderDelegate)?>(nil)

    init(
        storedThrough: SCONumber, localOnly: Set<SCONumber>, backend: any ObjectStore, layout: VolumeLayout,
        generations: GenerationChain, options: VolumeOptions, env: Environment, logger: Logger,
        catalog: SnapshotCatalog, journal: Journal
    ) {
        state = Mutex(State(storedThrough: storedThrough, localOnly: localOnly))
        self.backend = backend
        self.layout = layout
        self.generations = generations
        self.options = options
        self.env = env
        self.logger = logger
        self.catalog = catalog
        self.journal = journal
    }

    /// Set once, before the loop starts.
    func attach(_ delegate: any UploaderDelegate) { delegateBox.withLock { $0 = delegate } }
    private var delegate: any UploaderDelegate { delegateBox.withLock { $0! } }

    var status: UploadStatus {
        let bytes = journal.unstoredBytes.load(ordering: .relaxed)
        return state.withLock {
            UploadStatus(
                storedThrough: $0.storedThrough, pendingSCOs: $0.sealed.count, unstoredBytes: bytes,
                lastError: $0.lastError)
        }
    }

    var storedThrough: SCONumber { state.withLock { $0.storedThrough } }
    var isStopping: Bool { state.withLock { $0.stopping } }
    var lastError: VDError? { state.withLock { $0.lastError } }

    func isLocalOnly(_ sco: SCONumber) -> Bool { state.withLock { $0.localOnly.contains(sco) } }

    /// A new journal SCO exists only locally until its epoch is stored.
    func journalCreated(_ sco: SCONumber) { state.withLock { _ = $0.localOnly.insert(sco) } }

    func queue(epoch: SCONumber, _ sealed: SealedEpoch) {
        let wake = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            precondition(epoch > state.storedThrough, "epoch \(epoch.rawValue) is queued again after it was stored")
            state.sealed[epoch] = sealed
            defer { state.wake = nil }
            return state.wake
        }
        wake?.resume()
    }

    func wake() {
        state.withLock { state -> UnsafeContinuation<Void, Never>? in
            defer { state.wake = nil }
            return state.wake
        }?.resume()
    }

    func stop() {
        state.withLock { $0.stopping = true }
        wake()
    }

    // MARK: the loop

    func run() async {
        await withTaskGroup(of: Void.self) { group in
            var running = 0
            while true {
                while running < options.uploadConcurrency, let (epoch, sealed) = takeNextSCO() {
                    group.addTask { await self.uploadSCO(epoch: epoch, sealed) }
                    running += 1
                }
                // The snapshot table goes up before any TLog that may depend on it.
                if catalog.needsUpload && !isStopping {
                    if !delegate.mayWriteMetadata {
                        await sleepUnlessStopping(seconds: options.uploadRetryDelaySeconds)
                    } else if !(await catalog.uploadIfNeeded(to: backend)) {
                        await sleepUnlessStopping(seconds: options.uploadRetryDelaySeconds)
                    }
                }
                while let epoch = nextTLogReady() {
                    guard await uploadTLog(epoch) else { break }
                }
                if running > 0 {
                    await group.next()
                    running -= 1
                    continue
                }
                let stop = await waitForWork()
                if stop { break }
            }
        }
    }

    private func takeNextSCO() -> (SCONumber, SealedEpoch)? {
        state.withLock { state in
            guard !state.stopping,
                let next = state.sealed.keys.filter({
                    !state.scoUploading.contains($0) && !state.scoUploaded.contains($0)
                }).min()
            else { return nil }
            state.scoUploading.insert(next)
            return (next, state.sealed[next]!)
        }
    }

    /// The next epoch whose TLog can go up: its SCO is uploaded, every earlier TLog is, and so is the snapshot
    /// table it may depend on.
    private func nextTLogReady() -> SCONumber? {
        let uploadedTable = catalog.uploadedVersion
        return state.withLock { state in
            let next = state.storedThrough.next
            guard !state.stopping, state.scoUploaded.contains(next), let sealed = state.sealed[next],
                sealed.tableVersion <= uploadedTable
            else { return nil }
            return next
        }
    }

    /// Waits for new work; returns true when the loop should end.
    private func waitForWork() async -> Bool {
        let uploadedTable = catalog.uploadedVersion
        let needsTable = catalog.needsUpload
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let resumeNow = state.withLock { state -> Bool in
                if state.stopping { return true }
                let next = state.storedThrough.next
                let hasWork =
                    state.sealed.keys.contains { !state.scoUploading.contains($0) && !state.scoUploaded.contains($0) }
                    || (state.scoUploaded.contains(next) && (state.sealed[next]?.tableVersion ?? 0) <= uploadedTable)
                    || needsTable
                if hasWork { return true }
                state.wake = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
        return isStopping
    }

    private func uploadSCO(epoch: SCONumber, _ sealed: SealedEpoch) async {
        let object = layout.scoObject(sealed.sco)
        let delegate = self.delegate
        let metrics = journal.metrics
        let clock = env.clock
        let succeeded = await retrying("upload of \(object)") { () async throws(VDError) in
            let start = clock.now()
            try await delegate.putSCO(sealed.sco, lengthBytes: sealed.lengthBytes)
            metrics.upload.record(since: start, now: clock.now(), bytes: Int(sealed.lengthBytes))
        }
        state.withLock { state in
            state.scoUploading.remove(epoch)
            if succeeded { state.scoUploaded.insert(epoch) }
        }
    }

    /// Uploads TLog `epoch` and marks the epoch stored. Returns false if stopped before success.
    private func uploadTLog(_ epoch: SCONumber) async -> Bool {
        let directory = layout.tlogDirectory
        let fs = env.fs
        let object = generations.tlogObject(epoch.rawValue, layout: layout)
        let backend = self.backend
        let tasks = env.tasks
        let metrics = journal.metrics
        let clock = env.clock
        let succeeded = await retrying("upload of \(object)") { () async throws(VDError) in
            let data = try await tasks.blocking { () throws(VDError) -> ByteBuffer in
                try TLogFiles.readBytes(epoch, directory: directory, fs: fs)
            }
            let start = clock.now()
            try await backend.put(object, data: data)
            metrics.upload.record(since: start, now: clock.now(), bytes: data.readableBytes)
        }
        guard succeeded else { return false }
        let sealed = state.withLock { state -> SealedEpoch? in
            precondition(state.storedThrough.next == epoch, "TLogs on the backend must stay a contiguous prefix")
            state.storedThrough = epoch
            state.scoUploaded.remove(epoch)
            state.lastError = nil
            guard let sealed = state.sealed.removeValue(forKey: epoch) else { return nil }
            state.localOnly.remove(sealed.sco)
            return sealed
        }
        guard let sealed else { return true }
        journal.unstoredBytes.subtract(sealed.lengthBytes, ordering: .relaxed)
        delegate.epochStored(epoch, sco: sealed.sco, lengthBytes: sealed.lengthBytes)
        logger.debug("epoch \(epoch.rawValue) (SCO \(sealed.sco.hex)) and its TLog are on the backend")
        return true
    }

    /// Runs `operation` until it succeeds or the uploader stops; returns whether it succeeded.
    private func retrying(
        _ what: String, _ operation: @escaping @Sendable () async throws(VDError) -> Void
    ) async -> Bool {
        var attempt = 0
        while !isStopping {
            do throws(VDError) {
                try await operation()
                return true
            } catch {
                attempt += 1
                let now = env.clock.now()
                let shouldLog = state.withLock { state -> Bool in
                    state.lastError = VDError(error.code, "\(what) failed: \(error.message)")
                    if let last = state.lastErrorLogged, last.duration(to: now) < .seconds(10) { return false }
                    state.lastErrorLogged = now
                    return true
                }
                if shouldLog { logger.warning("\(what) failed (attempt \(attempt)); retrying: \(error)") }
                let base = min(options.uploadRetryDelaySecondsMax, options.uploadRetryDelaySeconds * pow2(attempt - 1))
                await sleepUnlessStopping(seconds: env.random.double(in: (base / 2)...base))
            }
        }
        return false
    }

    private func pow2(_ n: Int) -> Double { n >= 30 ? Double(1 << 30) : Double(1 << max(0, n)) }

    /// Sleeps in small steps, returning early once the uploader stops.
    func sleepUnlessStopping(seconds: Double) async {
        var left = seconds
        while left > 0 && !isStopping {
            let step = min(left, 0.1)
            await env.clock.sleep(for: .seconds(double: step))
            left -= step
        }
    }
}
