// Applying scrub results (see the Scrubber target for how they are made).
//
// A background loop looks for results in the volume's namespace. A result not yet applied goes through the journal
// as a `scrubApplied` entry, so the relocation has a place in the history that every replay reproduces: the map
// then points the copied cluster versions at their new SCOs (where it still holds the exact old place: writes that
// raced with the scrub win). Once the TLog that carries the entry is on the backend, and after a grace period for
// reads that looked up the old place just before, the result is marked applied (NAME/scrub/ID.applied) and its
// source SCOs are deleted, on the backend and from local flash. Each step is idempotent, so a crash anywhere is
// repaired by the next pass.

import BlockMap
import FlashIO
import Logging
import NIOCore
import ObjectStore
import SCOCache
import Scrubber
import Synchronization
import VolumeCore

struct ScrubState {
    /// Results known to this volume (needed by the map to apply `scrubApplied` entries).
    var results: [UInt64: ScrubResult] = [:]
    /// When results were applied in this process (the grace period runs from there).
    var appliedAt: [UInt64: MonotonicInstant] = [:]
    /// Results fully done (marked applied, sources deleted).
    var done: Set<UInt64> = []
}

final class ScrubApplyRequest: @unchecked Sendable {
    let result: ScrubResult
    init(_ result: ScrubResult) { self.result = result }
}

extension Volume {
    /// Loads every scrub result of the namespace (replays need them) and which are marked applied.
    static func loadScrubResults(layout: VolumeLayout, backend: any ObjectStore, volumeID: VolumeID) async throws(VDError)
        -> (results: [UInt64: ScrubResult], applied: Set<UInt64>)
    {
        var results: [UInt64: ScrubResult] = [:]
        var applied: Set<UInt64> = []
        for info in try await backend.list(prefix: layout.scrubPrefix) {
            let name = info.name.dropFirst(layout.scrubPrefix.count)
            if name.hasSuffix(".applied"), let id = UInt64(name.dropLast(".applied".count), radix: 16) {
                applied.insert(id)
            } else if let id = UInt64(name, radix: 16) {
                let result = try await NamespaceObjects.getVerified(info.name, backend: backend) { (bytes) throws(VDError) in
                    try MetadataRecord.decode(ScrubResult.self, from: bytes, kind: .scrubResult, what: info.name)
                }
                guard result.volumeID == volumeID, result.id == id else {
                    throw VDError(.corrupt, "\(info.name) belongs to another volume or result")
                }
                results[id] = result
            }
        }
        return (results, applied)
    }

    /// One pass over the namespace's scrub results: apply new ones, finish applied ones.
    package func scrubPass() async {
        do throws(VDError) {
            let (results, applied) = try await Self.loadScrubResults(layout: layout, backend: backend, volumeID: config.id)
            scrubState.withLock { state in
                for (id, result) in results where state.results[id] == nil { state.results[id] = result }
            }
            for id in results.keys.sorted() {
                guard let result = results[id], !scrubState.withLock({ $0.done.contains(id) }) else { continue }
                let appliedEpoch = try map.metadata(MapChanges.scrubAppliedKey(id))?.littleEndianUInt64
                if applied.contains(id) {
                    // Marked applied: make sure the sources are gone (a crash may have stopped the deletion).
                    try await deleteSources(of: result)
                    scrubState.withLock { _ = $0.done.insert(id) }
                } else if let epoch = appliedEpoch {
                    try await finishIfDurable(result, appliedEpoch: epoch)
                } else {
                    guard try await createdSCOsAreThere(result) else { continue }
                    let request = ScrubApplyRequest(result)
                    try await submit(.applyScrub(request))
                    let now = env.clock.now()
                    scrubState.withLock { $0.appliedAt[id] = now }
                    logger.info(
                        "applied scrub result \(id): \(result.relocationTable.count / 7) cluster(s) now in \(result.created.count) new SCO(s)")
                }
            }
        } catch {
            if error.code != .shutdown { logger.warning("scrub results of \(config.name): \(error); retrying later") }
        }
    }

    /// Whether every SCO a result wrote exists on the backend with the length the result records (a result whose
    /// SCOs were removed, or never fully written, must never be applied: its sources would be deleted).
    private func createdSCOsAreThere(_ result: ScrubResult) async throws(VDError) -> Bool {
        for created in result.created {
            let sco = SCONumber(created.sco)
            let format: BackendSCOFormat
            do {
                format = try await backendFormat(sco)
            } catch where error.code == .notFound || error.code == .corrupt || error.code == .outOfRange {
                logger.error(
                    "scrub result \(result.id) is not applied: its SCO \(layout.scoObject(sco)) is missing or does not verify (\(error.message))")
                return false
            }
            guard format.lengthBytes == created.lengthBytes else {
                logger.error(
                    "scrub result \(result.id) is not applied: \(layout.scoObject(sco)) is \(format.lengthBytes) bytes, the result says \(created.lengthBytes)")
                return false
            }
        }
        return true
    }

    /// Marks a result applied and deletes its sources once its journal entry is on the backend and the grace
    /// period has passed.
    private func finishIfDurable(_ result: ScrubResult, appliedEpoch: UInt64) async throws(VDError) {
        guard uploadStatus.storedThrough.rawValue >= appliedEpoch else { return }
        let now = env.clock.now()
        let appliedAt = scrubState.withLock { state -> MonotonicInstant in
            if let at = state.appliedAt[result.id] { return at }
            state.appliedAt[result.id] = now
            return now
        }
        guard appliedAt.duration(to: now) >= .milliseconds(Int64(options.scrubDeleteGraceSeconds * 1000)) else { return }
        try await backend.put(layout.scrubAppliedObject(result.id), data: ByteBuffer())
        env.tasks.failpoint("router-scrub-after-marker")
        try await deleteSources(of: result)
        scrubState.withLock { _ = $0.done.insert(result.id) }
        logger.info("scrub result \(result.id) is on the backend; deleted its \(result.sources.count) source SCO(s)")
    }

    private func deleteSources(of result: ScrubResult) async throws(VDError) {
        for (index, raw) in result.sources.enumerated() {
            let sco = SCONumber(raw)
            try await backend.delete(layout.scoObject(sco))
            if index == 0 { env.tasks.failpoint("router-scrub-mid-delete") }
            cache.remove(cacheKey(sco))
            try? env.fs.unlinkIfPresent(layout.scoPath(sco))
            try? env.fs.unlinkIfPresent(layout.fetchedPath(sco))
            var update = MapUpdate()
            update.metadata.append((MapChanges.epochBytesKey(sco), [UInt8](littleEndian64: 0)))
            try? map.apply(update)
        }
    }

    /// Leader side: writes the `scrubApplied` entry (which applies the relocations through MapChanges).
    func performScrubApply(_ request: ScrubApplyRequest) async throws(VDError) {
        scrubState.withLock { $0.results[request.result.id] = request.result }
        try await writeEntries([.scrubApplied(resultID: request.result.id)])
        env.tasks.failpoint("router-scrub-after-entry")
        // The entry must reach a TLog on the backend before the sources can go: seal now rather than at the next
        // age-based roll.
        try await roll()
    }

    func scrubLoop() async {
        while !uploads.withLock({ $0.stopping }) {
            await scrubPass()
            await sleepUnlessStopping(seconds: options.scrubPollSeconds)
        }
    }
}
