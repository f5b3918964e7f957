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
    /// Results being applied or finished (the map needs them to apply `scrubApplied` entries; dropped once done).
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
    /// One pass over the namespace's scrub results: apply new ones, finish applied ones. Only names are listed each
    /// pass; a result is downloaded while it is being applied or finished, and once done it is remembered in the map
    /// (`scrub-done-ID`) and never downloaded again.
    package func scrubPass() async {
        do throws(VDError) {
            let (ids, applied) = try await NamespaceObjects.listScrubResults(layout: layout, backend: backend)
            for id in ids {
                if scrubState.withLock({ $0.done.contains(id) }) { continue }
                if try map.metadata(Self.scrubDoneKey(id)) != nil {
                    scrubState.withLock { _ = $0.done.insert(id) }
                    continue
                }
                let result: ScrubResult
                if let known = scrubState.withLock({ $0.results[id] }) {
                    result = known
                } else {
                    result = try await NamespaceObjects.loadScrubResult(id, layout: layout, backend: backend, volumeID: config.id)
                }
                let appliedEpoch = try map.metadata(MapChanges.scrubAppliedKey(id))?.littleEndianUInt64
                if applied.contains(id) {
                    // Marked applied: make sure the sources are gone (a crash may have stopped the deletion).
                    try await deleteSources(of: result)
                    finished(id)
                } else if let epoch = appliedEpoch {
                    scrubState.withLock { $0.results[id] = result }
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

    /// Metadata: scrub result `id` is finished (marked applied, sources deleted).
    static func scrubDoneKey(_ id: UInt64) -> String { "scrub-done-" + SCONumber(id).hex }

    private func finished(_ id: UInt64) {
        var update = MapUpdate()
        update.metadata.append((Self.scrubDoneKey(id), [1]))
        try? map.apply(update)
        scrubState.withLock { state in
            state.done.insert(id)
            state.results[id] = nil
            state.appliedAt[id] = nil
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
        finished(result.id)
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
