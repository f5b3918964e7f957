// Moving sealed SCOs and their TLogs to the backend, and slowing writers down when that falls behind.
//
// Order rules (they give the backend contract: the namespace alone restarts the volume up to its last TLog):
// - SCOs upload in parallel (bounded), each as soon as it is sealed;
// - TLog N uploads only after SCO N and TLog N-1 are on the backend, so the TLogs on the backend are always a
//   contiguous prefix whose data is all there;
// - only then is SCO N "stored": its local copy becomes evictable.
// Failures are retried forever with exponential backoff and jitter (object names are never reused, so a PUT whose
// outcome is unknown is simply repeated); writes keep landing on local flash meanwhile, up to the pending bound.

import BlockMap
import FlashIO
import Logging
import NIOCore
import ObjectStore
import SCOCache
import Synchronization
import TransactionLog
package import VolumeCore

/// A sealed epoch waiting to be stored.
struct SealedEpoch {
    var sco: SCONumber
    var lengthBytes: UInt64
    /// The snapshot table version when the epoch was sealed: its TLog may depend on it (a snapshot or rollback in
    /// it), so the TLog is uploaded only once that table version is on the backend.
    var tableVersion: UInt64
}

struct UploadState {
    /// Every epoch up to this one is on the backend: SCO and TLog.
    var storedThrough: SCONumber
    /// Sealed locally, not yet stored, by epoch.
    var sealed: [SCONumber: SealedEpoch] = [:]
    /// Epochs whose SCO is being uploaded, or is uploaded (its TLog not yet).
    var scoUploading: Set<SCONumber> = []
    var scoUploaded: Set<SCONumber> = []
    var wake: UnsafeContinuation<Void, Never>?
    var stopping = false
    var lastError: VDError?
    var lastErrorLogged: MonotonicInstant?
}

/// What `vd` reports about a volume's uploads.
package struct UploadStatus: Sendable {
    /// Every epoch up to this one is on the backend.
    package var storedThrough: SCONumber
    package var pendingSCOs: Int
    package var unstoredBytes: UInt64
    package var lastError: VDError?
}

extension Volume {
    /// The epoch the journal appends to now (every write replied so far is in this epoch or an earlier one).
    package var openEpoch: UInt64 { writer.withLock { $0.openEpoch } }

    package var uploadStatus: UploadStatus {
        let bytes = unstoredBytes.load(ordering: .relaxed)
        return uploads.withLock {
            UploadStatus(storedThrough: $0.storedThrough, pendingSCOs: $0.sealed.count, unstoredBytes: bytes, lastError: $0.lastError)
        }
    }

    func queueUpload(epoch: SCONumber, sco: SCONumber, lengthBytes: UInt64, tableVersion: UInt64) {
        let wake = uploads.withLock { state -> UnsafeContinuation<Void, Never>? in
            precondition(epoch > state.storedThrough, "epoch \(epoch.rawValue) is queued again after it was stored")
            state.sealed[epoch] = SealedEpoch(sco: sco, lengthBytes: lengthBytes, tableVersion: tableVersion)
            defer { state.wake = nil }
            return state.wake
        }
        wake?.resume()
    }

    func wakeUploaderForTable() { wakeUploader() }

    private var tableNeedsUpload: Bool { snapshotState.withLock { $0.table.version > $0.uploadedVersion } }
    private var uploadedTableVersion: UInt64 { snapshotState.withLock { $0.uploadedVersion } }

    private func wakeUploader() {
        uploads.withLock { state -> UnsafeContinuation<Void, Never>? in
            defer { state.wake = nil }
            return state.wake
        }?.resume()
    }

    func uploadLoop() async {
        await withTaskGroup(of: Void.self) { group in
            var running = 0
            while true {
                while running < options.uploadConcurrency, let (epoch, sealed) = takeNextSCO() {
                    group.addTask { await self.uploadSCO(epoch: epoch, sealed) }
                    running += 1
                }
                // The snapshot table goes up before any TLog that may depend on it.
                if tableNeedsUpload && !uploads.withLock({ $0.stopping }) {
                    if !(await uploadTableIfNeeded()) { await sleepUnlessStopping(seconds: options.uploadRetryDelaySeconds) }
                }
                while let epoch = nextTLogReady() {
                    guard await uploadTLog(epoch) else { break }
                }
                if running > 0 {
                    await group.next()
                    running -= 1
                    continue
                }
                let stop = await waitForUploadWork()
                if stop { break }
            }
        }
    }

    private func takeNextSCO() -> (SCONumber, SealedEpoch)? {
        uploads.withLock { state in
            guard !state.stopping,
                let next = state.sealed.keys.filter({ !state.scoUploading.contains($0) && !state.scoUploaded.contains($0) }).min()
            else { return nil }
            state.scoUploading.insert(next)
            return (next, state.sealed[next]!)
        }
    }

    /// The next epoch whose TLog can go up: its SCO is uploaded, every earlier TLog is, and so is the snapshot
    /// table it may depend on.
    private func nextTLogReady() -> SCONumber? {
        let uploadedTable = uploadedTableVersion
        return uploads.withLock { state in
            let next = state.storedThrough.next
            guard !state.stopping, state.scoUploaded.contains(next), let sealed = state.sealed[next],
                sealed.tableVersion <= uploadedTable
            else { return nil }
            return next
        }
    }

    /// Waits for new work; returns true when the loop should end.
    private func waitForUploadWork() async -> Bool {
        let uploadedTable = uploadedTableVersion
        let needsTable = tableNeedsUpload
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let resumeNow = uploads.withLock { state -> Bool in
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
        return uploads.withLock { $0.stopping }
    }

    private func uploadSCO(epoch: SCONumber, _ sealed: SealedEpoch) async {
        let object = layout.scoObject(sealed.sco)
        let succeeded = await retrying("upload of \(object)") { () async throws(VDError) in
            try await self.putSCO(sealed.sco, lengthBytes: sealed.lengthBytes)
        }
        uploads.withLock { state in
            state.scoUploading.remove(epoch)
            if succeeded { state.scoUploaded.insert(epoch) }
        }
    }

    /// Uploads TLog `epoch` and marks the epoch stored. Returns false if stopped before success.
    private func uploadTLog(_ epoch: SCONumber) async -> Bool {
        let directory = layout.tlogDirectory
        let fs = env.fs
        let object = layout.tlogObject(epoch)
        let succeeded = await retrying("upload of \(object)") { () async throws(VDError) in
            let data = try await self.blocking { () throws(VDError) -> ByteBuffer in
                try TLogFiles.readBytes(epoch, directory: directory, fs: fs)
            }
            try await self.backend.put(object, data: data)
        }
        guard succeeded else { return false }
        let sealed = uploads.withLock { state -> SealedEpoch? in
            precondition(state.storedThrough.next == epoch, "TLogs on the backend must stay a contiguous prefix")
            state.storedThrough = epoch
            state.scoUploaded.remove(epoch)
            state.lastError = nil
            return state.sealed.removeValue(forKey: epoch)
        }
        guard let sealed else { return true }
        unstoredBytes.subtract(sealed.lengthBytes, ordering: .relaxed)
        writer.withLock { _ = $0.localOnlySCOs.remove(sealed.sco) }
        var update = MapUpdate()
        update.metadata.append((Self.storedThroughKey, [UInt8](littleEndian64: epoch.rawValue)))
        try? map.apply(update)
        cache.markEvictable(cacheKey(sealed.sco))
        cache.evictIfNeeded()
        logger.debug("epoch \(epoch.rawValue) (SCO \(sealed.sco.hex)) and its TLog are on the backend")
        return true
    }

    static let storedThroughKey = "stored-through"

    /// Whether SCO `sco` exists only on local flash (not yet stored with its TLog); scrub SCOs and everything read
    /// from the backend never are.
    func isLocalOnly(_ sco: SCONumber) -> Bool { writer.withLock { $0.localOnlySCOs.contains(sco) } }

    /// Runs `operation` until it succeeds or the uploader stops; returns whether it succeeded.
    private func retrying(_ what: String, _ operation: @escaping @Sendable () async throws(VDError) -> Void) async -> Bool {
        var attempt = 0
        while !uploads.withLock({ $0.stopping }) {
            do throws(VDError) {
                try await operation()
                return true
            } catch {
                attempt += 1
                let now = env.clock.now()
                let shouldLog = uploads.withLock { state -> Bool in
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

    func sleepUnlessStopping(seconds: Double) async {
        var left = seconds
        while left > 0 && !uploads.withLock({ $0.stopping }) {
            let step = min(left, 0.1)
            await env.clock.sleep(for: .seconds(double: step))
            left -= step
        }
    }

    /// Back-pressure: above 3/4 of the pending bound writes are delayed a little (more as it fills); at the bound
    /// they wait until uploads catch up.
    func throttle() async {
        let limit = options.uploadPendingBytesMax
        let soft = limit / 4 * 3
        var pending = unstoredBytes.load(ordering: .relaxed)
        guard pending > soft else { return }
        if pending < limit {
            let fraction = Double(pending - soft) / Double(limit - soft)
            await env.clock.sleep(for: .microseconds(Int(fraction * 20_000)))
            return
        }
        var loggedAt: MonotonicInstant?
        while pending >= limit {
            if writer.withLock({ $0.failure != nil }) { return }
            let now = env.clock.now()
            if loggedAt == nil || loggedAt!.duration(to: now) > .seconds(10) {
                loggedAt = now
                let reason = uploads.withLock { $0.lastError.map { ": \($0.message)" } ?? "" }
                logger.warning(
                    "writes wait: \(ByteSize.format(pending)) are not on the backend yet (limit \(ByteSize.format(limit)))\(reason)")
            }
            await env.clock.sleep(for: .milliseconds(20))
            pending = unstoredBytes.load(ordering: .relaxed)
        }
    }

    /// Seals the open journal once its first write is older than the configured age.
    func ageLoop() async {
        let maxAge = Duration.milliseconds(Int64(options.uploadAgeSecondsMax * 1000))
        let tick = min(1.0, options.uploadAgeSecondsMax / 4)
        while !uploads.withLock({ $0.stopping }) {
            await sleepUnlessStopping(seconds: tick)
            let first = writer.withLock { $0.failure == nil ? $0.openJournalFirstWrite : nil }
            if let first, first.duration(to: env.clock.now()) >= maxAge {
                do throws(VDError) { try await submit(.roll) } catch {
                    logger.warning("cannot seal the open SCO: \(error)")
                }
            }
        }
    }

    func stopUploader() {
        uploads.withLock { $0.stopping = true }
        wakeUploader()
    }
}
