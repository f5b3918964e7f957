// The volume's side of uploads (UploaderDelegate) and the two things that pace writes: back-pressure while the
// backend falls behind, and age-based sealing so recent data does not stay local for long.

import BlockMap
import FlashIO
import Logging
import SCOCache
import Synchronization
import VolumeCore

extension Volume: UploaderDelegate {
    var mayWriteMetadata: Bool { ownerLease.map { $0.isValid(at: env.clock.now()) } ?? true }

    func epochStored(_ epoch: SCONumber, sco: SCONumber, lengthBytes: UInt64) {
        var update = MapUpdate()
        update.metadata.append((Self.storedThroughKey, [UInt8](littleEndian64: epoch.rawValue)))
        try? map.apply(update)
        cache.markEvictable(cacheKey(sco))
        cache.evictIfNeeded()
        journal.mirror?.stored(through: epoch.rawValue)
    }
}

extension Volume {
    static let storedThroughKey = "stored-through"

    /// The epoch the journal appends to now (every write replied so far is in this epoch or an earlier one).
    package var openEpoch: UInt64 { journal.openEpoch }

    package var uploadStatus: UploadStatus { uploader.status }

    /// Waits (up to `timeoutSeconds`) until the backend holds every TLog through `epoch` and the newest snapshot
    /// table: what another router needs to read this volume at a snapshot of that epoch. False on timeout.
    package func waitUntilStored(through epoch: UInt64, timeoutSeconds: Double) async -> Bool {
        let deadline = env.clock.now() + .milliseconds(Int64(timeoutSeconds * 1000))
        while true {
            if uploader.storedThrough.rawValue >= epoch && !catalog.needsUpload { return true }
            guard env.clock.now() < deadline else { return false }
            uploader.wake()
            await env.clock.sleep(for: .milliseconds(20))
        }
    }

    /// Whether SCO `sco` exists only on local flash (not yet stored with its TLog).
    func isLocalOnly(_ sco: SCONumber) -> Bool { uploader.isLocalOnly(sco) }

    /// Back-pressure: above 3/4 of the pending bound writes are delayed a little (more as it fills); at the bound
    /// they wait until uploads catch up.
    func throttle() async {
        let limit = options.uploadPendingBytesMax
        let soft = limit / 4 * 3
        var pending = journal.unstoredBytes.load(ordering: .relaxed)
        guard pending > soft else { return }
        let start = env.clock.now()
        defer { metrics.throttle.record(since: start, now: env.clock.now()) }
        if pending < limit {
            let fraction = Double(pending - soft) / Double(limit - soft)
            await env.clock.sleep(for: .microseconds(Int(fraction * 20_000)))
            return
        }
        var loggedAt: MonotonicInstant?
        while pending >= limit {
            if journal.failure != nil { return }
            let now = env.clock.now()
            if loggedAt == nil || loggedAt!.duration(to: now) > .seconds(10) {
                loggedAt = now
                let reason = uploader.lastError.map { ": \($0.message)" } ?? ""
                logger.warning(
                    "writes wait: \(ByteSize.format(pending)) are not on the backend yet (limit \(ByteSize.format(limit)))\(reason)"
                )
            }
            await env.clock.sleep(for: .milliseconds(20))
            pending = journal.unstoredBytes.load(ordering: .relaxed)
        }
    }

    /// Seals the open journal once its first write is older than the configured age.
    func ageLoop() async {
        let maxAge = Duration.milliseconds(Int64(options.uploadAgeSecondsMax * 1000))
        let tick = min(1.0, options.uploadAgeSecondsMax / 4)
        while !uploader.isStopping {
            await uploader.sleepUnlessStopping(seconds: tick)
            if let first = journal.openJournalFirstWrite, first.duration(to: env.clock.now()) >= maxAge {
                do throws(VDError) { try await journal.submit(.roll) } catch {
                    logger.warning("cannot seal the open SCO: \(error)")
                }
            }
        }
    }
}
