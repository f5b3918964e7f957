// Applying scrub results (see the Scrubber target for how they are made).
//
// A background loop lists the volume's scrub results. A result not yet applied (whose new SCOs are all on the
// backend, with their recorded lengths) goes through the journal as a `scrubApplied` entry, so the relocation has a
// place in the history that every replay reproduces: the map then points the copied cluster versions at their new
// SCOs (where it still holds the exact old place: writes that raced with the scrub win). Once the TLog that carries
// the entry is on the backend, and after a grace period for reads that looked up the old place just before, the
// result is marked applied (NAME/scrub/ID.applied) and its source SCOs are deleted, on the backend and from local
// flash. Each step is idempotent, so a crash anywhere is repaired by the next pass.
//
// Owns: the results being applied or finished (the map needs them while their entry is replayed live), when each
// was applied, and which are done.

import BlockMap
import FlashIO
import Logging
import NIOCore
import ObjectStore
import Scrubber
import Synchronization
import VolumeCore

/// What the applier needs from its volume.
protocol ScrubApplierDelegate: AnyObject, Sendable {
    /// The (uncompressed) length of an SCO on the backend; `.notFound` or `.corrupt` when it is missing or bad.
    func backendSCOLength(_ sco: SCONumber) async throws(VDError) -> UInt64
    /// The SCO is gone from the backend: drop its local copies.
    func forgetSCO(_ sco: SCONumber)
    /// A cluster version the volume or one of its snapshots reads that is in one of `scos` (a check), described.
    func mapReferences(_ scos: Set<SCONumber>) throws(VDError) -> String?
    /// Throws unless this router still owns the volume by the owner record on the backend (read now). Any router
    /// that takes the volume afterwards lists the TLogs after its own owner write, so everything stored before this
    /// read is in its history.
    func confirmOwnershipOnBackend() async throws(VDError)
    /// Which generation wrote which epochs of the history.
    var generations: GenerationChain { get }
}

final class ScrubApplier: Sendable {
    private struct State {
        var results: [UInt64: ScrubResult] = [:]
        /// When results were applied in this process (the grace period runs from there).
        var appliedAt: [UInt64: MonotonicInstant] = [:]
        var done: Set<UInt64> = []
    }

    private let state = Mutex(State())
    private let volumeName: VolumeName
    private let volumeID: VolumeID
    private let layout: VolumeLayout
    private let backend: any ObjectStore
    private let map: BlockMap
    private let journal: Journal
    private let uploader: Uploader
    private let options: VolumeOptions
    private let env: Environment
    private let logger: Logger
    private let delegateBox = Mutex<(any ScrubApplierDelegate)?>(nil)

    init(
        config: VolumeConfig, layout: VolumeLayout, backend: any ObjectStore, map: BlockMap, journal: Journal,
        uploader: Uploader, options: VolumeOptions, env: Environment, logger: Logger
    ) {
        volumeName = config.name
        volumeID = config.id
        self.layout = layout
        self.backend = backend
        self.map = map
        self.journal = journal
        self.uploader = uploader
        self.options = options
        self.env = env
        self.logger = logger
    }

    func attach(_ delegate: any ScrubApplierDelegate) { delegateBox.withLock { $0 = delegate } }
    private var delegate: any ScrubApplierDelegate { delegateBox.withLock { $0! } }

    /// Results a live `scrubApplied` entry may need.
    var results: [UInt64: ScrubResult] { state.withLock { $0.results } }

    /// Metadata: scrub result `id` is finished (marked applied, sources deleted).
    static func doneKey(_ id: UInt64) -> String { "scrub-done-" + SCONumber(id).hex }

    func run() async {
        while !uploader.isStopping {
            await pass()
            await uploader.sleepUnlessStopping(seconds: options.scrubPollSeconds)
        }
    }

    /// One pass over the namespace's scrub results: apply new ones, finish applied ones. Only names are listed each
    /// pass; a result is downloaded while it is being applied or finished, and once done it is remembered in the map
    /// and never downloaded again.
    func pass() async {
        do throws(VDError) {
            let (ids, applied) = try await NamespaceObjects.listScrubResults(layout: layout, backend: backend)
            for id in ids {
                if state.withLock({ $0.done.contains(id) }) { continue }
                if try map.metadata(Self.doneKey(id)) != nil {
                    state.withLock { _ = $0.done.insert(id) }
                    continue
                }
                let result: ScrubResult
                if let known = state.withLock({ $0.results[id] }) {
                    result = known
                } else {
                    result = try await NamespaceObjects.loadScrubResult(
                        id, layout: layout, backend: backend, volumeID: volumeID)
                }
                let appliedEpoch = try map.metadata(MapChanges.scrubAppliedKey(id))?.littleEndianUInt64
                if applied.contains(id) {
                    // Marked applied: make sure the sources are gone (a crash may have stopped the deletion).
                    try await delegate.confirmOwnershipOnBackend()
                    try await deleteSources(of: result)
                    finished(id)
                } else if let epoch = appliedEpoch {
                    state.withLock { $0.results[id] = result }
                    try await finishIfDurable(result, appliedEpoch: epoch)
                } else {
                    guard try await historyIsPrefix(of: result), try await createdSCOsAreThere(result) else { continue }
                    try await apply(result)
                    let now = env.clock.now()
                    state.withLock { $0.appliedAt[id] = now }
                    logger.info(
                        "applied scrub result \(id): \(result.relocationTable.count / 7) cluster(s) now in \(result.created.count) new SCO(s)"
                    )
                }
            }
        } catch {
            if error.code != .shutdown { logger.warning("scrub results of \(volumeName): \(error); retrying later") }
        }
    }

    /// Writes the `scrubApplied` entry through the journal (which applies the relocations through MapChanges), then
    /// rolls: the entry must reach a TLog on the backend before the sources can go.
    private func apply(_ result: ScrubResult) async throws(VDError) {
        state.withLock { $0.results[result.id] = result }
        let tasks = env.tasks
        try await journal.exclusive { (leader) throws(VDError) in
            try await leader.writeEntries([.scrubApplied(resultID: result.id)])
            tasks.failpoint("router-scrub-after-entry")
            try await leader.roll()
        }
    }

    private func finished(_ id: UInt64) {
        var update = MapUpdate()
        update.metadata.append((Self.doneKey(id), [1]))
        try? map.apply(update)
        state.withLock { state in
            state.done.insert(id)
            state.results[id] = nil
            state.appliedAt[id] = nil
        }
    }

    /// Whether the history the scrub replayed is a prefix of this volume's: its last TLog is the one this volume's
    /// generation chain names for that epoch. A result made from a fenced owner's TLogs is removed (never applied:
    /// it may have judged data dead that this history still reads); its SCOs are left for `vd check --repair`.
    private func historyIsPrefix(of result: ScrubResult) async throws(VDError) -> Bool {
        guard let epoch = result.historyEpoch else {
            // A scrubber of an earlier version did not record its history; it read only untagged TLog names, so its
            // replay is trustworthy only while no generation of the volume is tagged.
            if delegate.generations.starts.isEmpty { return true }
            logger.error(
                "scrub result \(result.id) does not say which history it replayed (an earlier vd scrub) and this volume has changed owners: removing the result, not applying it"
            )
            try await delegate.confirmOwnershipOnBackend()
            try await backend.delete(layout.scrubResultObject(result.id))
            state.withLock { $0.results[result.id] = nil }
            return false
        }
        let expected = delegate.generations.tag(ofEpoch: epoch)
        if expected == result.historyTag { return true }
        logger.error(
            "scrub result \(result.id) replayed TLog \(epoch) of generation \(result.historyTag ?? 1), which is not part of this volume's history (generation \(expected ?? 1) wrote that epoch): removing the result, not applying it"
        )
        try await delegate.confirmOwnershipOnBackend()
        try await backend.delete(layout.scrubResultObject(result.id))
        state.withLock { $0.results[result.id] = nil }
        return false
    }

    /// Whether every SCO a result wrote exists on the backend with the length the result records (a result whose
    /// SCOs were removed, or never fully written, must never be applied: its sources would be deleted).
    private func createdSCOsAreThere(_ result: ScrubResult) async throws(VDError) -> Bool {
        for created in result.created {
            let sco = SCONumber(created.sco)
            let length: UInt64
            do {
                length = try await delegate.backendSCOLength(sco)
            } catch  where error.code == .notFound || error.code == .corrupt || error.code == .outOfRange {
                logger.error(
                    "scrub result \(result.id) is not applied: its SCO \(layout.scoObject(sco)) is missing or does not verify (\(error.message))"
                )
                return false
            }
            guard length == created.lengthBytes else {
                logger.error(
                    "scrub result \(result.id) is not applied: \(layout.scoObject(sco)) is \(length) bytes, the result says \(created.lengthBytes)"
                )
                return false
            }
        }
        return true
    }

    /// Marks a result applied and deletes its sources once its journal entry is on the backend and the grace
    /// period has passed.
    private func finishIfDurable(_ result: ScrubResult, appliedEpoch: UInt64) async throws(VDError) {
        guard uploader.storedThrough.rawValue >= appliedEpoch else { return }
        let now = env.clock.now()
        let appliedAt = state.withLock { state -> MonotonicInstant in
            if let at = state.appliedAt[result.id] { return at }
            state.appliedAt[result.id] = now
            return now
        }
        guard appliedAt.duration(to: now) >= .milliseconds(Int64(options.scrubDeleteGraceSeconds * 1000)) else {
            return
        }
        // The entry's TLog is stored; if this router still owns the volume now, every later owner's history has it.
        try await delegate.confirmOwnershipOnBackend()
        try await backend.put(layout.scrubAppliedObject(result.id), data: ByteBuffer())
        env.tasks.failpoint("router-scrub-after-marker")
        try await deleteSources(of: result)
        finished(result.id)
        logger.info("scrub result \(result.id) is on the backend; deleted its \(result.sources.count) source SCO(s)")
    }

    private func deleteSources(of result: ScrubResult) async throws(VDError) {
        if options.checkExpensiveInvariants {
            let referenced = try delegate.mapReferences(Set(result.sources.map { SCONumber($0) }))
            env.tasks.check(
                referenced == nil,
                "scrub result \(result.id) would delete an SCO a live cluster version is in: \(referenced ?? "")")
            if referenced != nil {
                throw VDError(.corrupt, "scrub result \(result.id) still has live data in its sources")
            }
        }
        for (index, raw) in result.sources.enumerated() {
            let sco = SCONumber(raw)
            try await backend.delete(layout.scoObject(sco))
            if index == 0 { env.tasks.failpoint("router-scrub-mid-delete") }
            delegate.forgetSCO(sco)
            var update = MapUpdate()
            update.metadata.append((MapChanges.epochBytesKey(sco), [UInt8](littleEndian64: 0)))
            try? map.apply(update)
        }
    }
}
