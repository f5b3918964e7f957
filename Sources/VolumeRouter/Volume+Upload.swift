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

struct UploadState {
    /// Every SCO up to this one is on the backend with its TLog.
    var storedThrough: SCONumber
    /// Sealed locally, not yet stored: length in bytes.
    var sealed: [SCONumber: UInt64] = [:]
    var scoUploading: Set<SCONumber> = []
    var scoUploaded: Set<SCONumber> = []
    var wake: UnsafeContinuation<Void, Never>?
    var stopping = false
    var lastError: VDError?
    var lastErrorLogged: MonotonicInstant?
}

/// What `vd` reports about a volume's uploads.
package struct UploadStatus: Sendable {
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

    func queueUpload(_ sco: SCONumber, lengthBytes: UInt64) {
        let wake = uploads.withLock { state -> UnsafeContinuation<Void, Never>? in
            state.sealed[sco] = lengthBytes
            defer { state.wake = nil }
            return state.wake
        }
        wake?.resume()
    }

    func wakeUploaderForTable() { wakeUploader() }

    private var tableNeedsUpload: Bool { snapshotState.withLock { $0.table.version > $0.uploadedVersion } }

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
                while running < options.uploadConcurrency, let (sco, length) = takeNextSCO() {
                    group.addTask { await self.uploadSCO(sco, lengthBytes: length) }
                    running += 1
                }
                while let sco = nextTLogReady() {
                    guard await uploadTLog(sco) else { break }
                }
                if tableNeedsUpload && !uploads.withLock({ $0.stopping }) {
                    if !(await uploadTableIfNeeded()) { await sleepUnlessStopping(seconds: options.uploadRetryDelaySeconds) }
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

    private func takeNextSCO() -> (SCONumber, UInt64)? {
        uploads.withLock { state in
            guard !state.stopping,
                let next = state.sealed.keys.filter({ !state.scoUploading.contains($0) && !state.scoUploaded.contains($0) }).min()
            else { return nil }
            state.scoUploading.insert(next)
            return (next, state.sealed[next]!)
        }
    }

    private func nextTLogReady() -> SCONumber? {
        uploads.withLock { state in
            let next = state.storedThrough.next
            guard !state.stopping, state.scoUploaded.contains(next) else { return nil }
            return next
        }
    }

    /// Waits for new work; returns true when the loop should end.
    private func waitForUploadWork() async -> Bool {
        await withUnsafeContinuation { continuation in
            let resumeNow = uploads.withLock { state -> Bool in
                if state.stopping { return true }
                let hasWork =
                    state.sealed.keys.contains { !state.scoUploading.contains($0) && !state.scoUploaded.contains($0) }
                    || state.scoUploaded.contains(state.storedThrough.next) || tableNeedsUpload
                if hasWork { return true }
                state.wake = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
        return uploads.withLock { $0.stopping }
    }

    private func uploadSCO(_ sco: SCONumber, lengthBytes: UInt64) async {
        let object = layout.scoObject(sco)
        let succeeded = await retrying("upload of \(object)") { () async throws(VDError) in
            try await self.putSCO(sco, lengthBytes: lengthBytes)
        }
        uploads.withLock { state in
            state.scoUploading.remove(sco)
            if succeeded { state.scoUploaded.insert(sco) }
        }
    }

    /// Uploads TLog `sco` and marks the SCO stored. Returns false if stopped before success.
    private func uploadTLog(_ sco: SCONumber) async -> Bool {
        let directory = layout.tlogDirectory
        let fs = env.fs
        let object = layout.tlogObject(sco)
        let succeeded = await retrying("upload of \(object)") { () async throws(VDError) in
            let data = try await self.blocking { () throws(VDError) -> ByteBuffer in
                try TLogFiles.readBytes(sco, directory: directory, fs: fs)
            }
            try await self.backend.put(object, data: data)
        }
        guard succeeded else { return false }
        let length = uploads.withLock { state -> UInt64 in
            state.storedThrough = sco
            state.scoUploaded.remove(sco)
            state.lastError = nil
            return state.sealed.removeValue(forKey: sco) ?? 0
        }
        unstoredBytes.subtract(length, ordering: .relaxed)
        var update = MapUpdate()
        update.metadata.append((Self.storedThroughKey, [UInt8](littleEndian64: sco.rawValue)))
        try? map.apply(update)
        cache.markEvictable(cacheKey(sco))
        cache.evictIfNeeded()
        logger.debug("SCO \(sco.hex) and its TLog are on the backend")
        return true
    }

    static let storedThroughKey = "stored-through"

    func isStored(_ sco: SCONumber) -> Bool { uploads.withLock { sco <= $0.storedThrough } }

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
