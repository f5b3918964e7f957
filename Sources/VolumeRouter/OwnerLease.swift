// Who owns a volume: one router at a time, fenced by a lease (groundwork of the scale-out ownership issue; not yet
// wired into `vd serve`).
//
// The record is NAME/owner/N, a SequencedRecord: every change is a create-only write of version N+1 after reading N,
// so of two routers acting on the same version exactly one succeeds (the reference RGW refuses If-Match on PUT, so a
// single object cannot be compared-and-swapped in place; docs/s3-backend.md). Each version holds the owner (node name
// and the instance id of its data directory), the generation, the lease period, and whether it was released.
//
// Lease safety, with no synchronized clocks, assuming only that clock *rates* differ by at most `driftFraction`
// (1%) and that a request is not delayed in the network by more than the margin:
//   - the owner notes its monotonic time t0 before each renewal; when the renewal succeeds its lease is valid until
//     t0 + lease on its own clock. It stops acknowledging I/O from then on unless a later renewal succeeded;
//   - a taker reads the record (version V) and waits lease x (1 + drift) / (1 - drift) + margin on its own clock from that read
//     (which happened after the owner's t0 of V) and then creates V+1 only if V is still the newest: any renewal in
//     between makes a newer version, and the takeover fails (the owner is alive). So the taker's write lands after
//     the owner's lease ran out by the owner's own clock, whatever the two clocks' rates within the bound;
//   - once V+1 exists, every renewal of the old owner (a write of V+1) fails: it is fenced for good.
// A router that finds the record naming its own instance continues with the same generation (the data directory
// lock proves the earlier process is gone); a released record is taken at once with the next generation.

package import Foundation
package import Logging
import NIOCore
package import ObjectStore
import Synchronization
package import VolumeCore

/// One version of a volume's owner record.
package struct OwnerRecord: Codable, Sendable, Equatable {
    /// The router's node name (`vd serve --node`).
    package var node: String
    /// A random id of the owner's data directory: the same node name on another data directory is another owner.
    package var instance: String
    /// Where the owner's management API answers (for `vd volume move` and `list --cluster`).
    package var address: String?
    /// Bumped by every change of owner; objects a router writes carry it.
    package var generation: UInt64
    package var leaseSeconds: Double
    /// The owner gave the volume up (`release`): the next router takes it without waiting.
    package var released: Bool
    /// Released for this node only (a cooperative move), or for any.
    package var releasedTo: String?
    /// Makes every version's bytes unique (a create-only write of the same bytes would succeed for two writers).
    package var nonce: String
    /// When it was written, by the writer's wall clock: for people reading it, never for decisions.
    package var writtenAt: Date
}

/// The identity a router acts under.
package struct OwnerIdentity: Sendable, Equatable {
    package var node: String
    package var instance: String
    package var address: String?
    package init(node: String, instance: String, address: String? = nil) {
        self.node = node
        self.instance = instance
        self.address = address
    }
}

package final class OwnerLease: Sendable {
    private struct State {
        var version: UInt64
        var record: OwnerRecord
        /// The lease holds until then (monotonic, this process's clock); nil once fenced or released.
        var validUntil: MonotonicInstant?
        var fenced: VDError?
        /// Renewals whose outcome is unknown (the write may have landed): nonce -> when the attempt started.
        var attempts: [String: MonotonicInstant] = [:]
        /// No renewal starts any more (closed, released, or the volume did not open).
        var stopped = false
        /// A renewal's write is in flight (a release waits for it: both write the next version).
        var renewing = false
    }

    package static let driftFraction = 0.01
    package static let marginSeconds = 1.0

    private let record: SequencedRecord
    private let identity: OwnerIdentity
    private let clock: any VDClock
    private let random: any RandomSource
    private let state: Mutex<State>

    private init(
        record: SequencedRecord, identity: OwnerIdentity, clock: any VDClock, random: any RandomSource, version: UInt64,
        written: OwnerRecord, since start: MonotonicInstant, servedElsewhereBefore: Bool, tookRelease: Bool,
        previousGeneration: UInt64?
    ) {
        self.servedElsewhereBefore = servedElsewhereBefore
        self.tookRelease = tookRelease
        self.previousGeneration = previousGeneration
        self.record = record
        self.identity = identity
        self.clock = clock
        self.random = random
        state = Mutex(
            State(
                version: version, record: written,
                validUntil: start + .seconds(double: written.leaseSeconds), fenced: nil))
    }

    /// The record of volume namespace `namespace`.
    package static func record(namespace: String, store: any ObjectStore) -> SequencedRecord {
        SequencedRecord(store: store, prefix: namespace + "/owner/")
    }

    /// The newest owner record, verified; nil when the volume never had an owner.
    package static func current(
        _ record: SequencedRecord
    ) async throws(VDError) -> (
        version: UInt64, record: OwnerRecord
    )? {
        // Bytes damaged on the way fail verification: read again a few times (never fall back to another version).
        guard
            let (version, value) = try await record.readVerified({ (version, bytes) throws(VDError) in
                try MetadataRecord.decode(
                    OwnerRecord.self, from: bytes, kind: .ownerRecord, what: record.name(of: version))
            })
        else { return nil }
        return (version, value)
    }

    /// Takes the volume without waiting: it has no owner yet, or its record names this instance (an earlier process
    /// on this data directory), or it was released (to this node or to any). A volume another router holds is
    /// refused (`.busy`, naming it): `takeover` is the way to take it from an owner that is gone.
    package static func acquire(
        _ record: SequencedRecord, as identity: OwnerIdentity, leaseSeconds: Double, clock: any VDClock,
        random: any RandomSource, retakingOwnRelease: Bool = false
    ) async throws(VDError) -> OwnerLease {
        let found = try await current(record)
        guard let found else {
            return try await write(
                record, after: nil, generation: 1, identity: identity, leaseSeconds: leaseSeconds, clock: clock,
                random: random)
        }
        let owner = found.record
        let mine = owner.instance == identity.instance && owner.node == identity.node
        if mine && !owner.released {
            return try await write(
                record, after: found.version, generation: owner.generation, identity: identity,
                leaseSeconds: leaseSeconds, clock: clock, random: random, replacing: owner)
        }
        // Released to this node (or to any), or, when asked, our own release that nobody took yet (a move whose
        // target did not take it).
        if owner.released
            && (owner.releasedTo == nil || owner.releasedTo == identity.node || (mine && retakingOwnRelease))
        {
            return try await write(
                record, after: found.version, generation: owner.generation + 1, identity: identity,
                leaseSeconds: leaseSeconds, clock: clock, random: random, replacing: owner)
        }
        throw busy(owner, record: record)
    }

    /// Takes the volume from an owner that stopped renewing: waits out its lease (with the drift margin) from this
    /// first read, then takes it only if the record did not change meanwhile. An owner that renews during the wait
    /// is alive: `.busy`. Of two takeovers, one wins; the other gets `.busy`.
    package static func takeover(
        _ record: SequencedRecord, as identity: OwnerIdentity, leaseSeconds: Double, clock: any VDClock,
        random: any RandomSource
    ) async throws(VDError) -> OwnerLease {
        guard let found = try await current(record) else {
            return try await acquire(record, as: identity, leaseSeconds: leaseSeconds, clock: clock, random: random)
        }
        let owner = found.record
        if owner.released || (owner.instance == identity.instance && owner.node == identity.node) {
            return try await acquire(record, as: identity, leaseSeconds: leaseSeconds, clock: clock, random: random)
        }
        await clock.sleep(for: .seconds(double: waitSeconds(forLease: owner.leaseSeconds)))
        let again = try await current(record)
        guard let again, again.version == found.version else {
            if let again, again.record.instance != owner.instance || again.record.node != owner.node {
                throw VDError(
                    .busy,
                    "another router took \(record.prefix) meanwhile: node \(again.record.node), generation \(again.record.generation)"
                )
            }
            throw VDError(
                .busy,
                "the owner of \(record.prefix) (\(owner.node)) renewed its lease while this router waited: it is alive; use `vd volume move` to move the volume"
            )
        }
        do {
            return try await write(
                record, after: found.version, generation: owner.generation + 1, identity: identity,
                leaseSeconds: leaseSeconds, clock: clock, random: random, replacing: owner)
        } catch  where error.code == .conflict {
            throw VDError(.busy, "another router took \(record.prefix) at the same time")
        }
    }

    /// How long a taker waits after its first read of an unchanged record: the owner's lease measured by the slowest
    /// clock the drift bound allows for the owner, as measured by the fastest one allowed for the taker, plus the
    /// margin.
    package static func waitSeconds(forLease lease: Double) -> Double {
        lease * (1 + driftFraction) / (1 - driftFraction) + marginSeconds
    }

    private static func write(
        _ record: SequencedRecord, after: UInt64?, generation: UInt64, identity: OwnerIdentity, leaseSeconds: Double,
        clock: any VDClock, random: any RandomSource, replacing previous: OwnerRecord? = nil
    ) async throws(VDError) -> OwnerLease {
        let start = clock.now()
        let written = OwnerRecord(
            node: identity.node, instance: identity.instance, address: identity.address, generation: generation,
            leaseSeconds: leaseSeconds, released: false, releasedTo: nil, nonce: random.hexToken(),
            writtenAt: clock.wallNow())
        let version = try await record.write(try MetadataRecord.encode(written, kind: .ownerRecord), after: after)
        return OwnerLease(
            record: record, identity: identity, clock: clock, random: random, version: version, written: written,
            since: start,
            servedElsewhereBefore: previous.map { $0.instance != identity.instance || $0.node != identity.node }
                ?? false,
            tookRelease: previous?.released ?? true, previousGeneration: previous?.generation)
    }

    private static func busy(_ owner: OwnerRecord, record: SequencedRecord) -> VDError {
        VDError(
            .busy,
            "\(record.prefix.dropLast("/owner/".count)) is owned by node \(owner.node) (generation \(owner.generation), lease \(owner.leaseSeconds) s); `vd volume takeover` takes it once that owner stopped renewing"
        )
    }

    // MARK: the owner's side

    /// Another router owned the volume since this one last did (or never did): local state of an earlier life here
    /// is stale and must not be trusted. Set once, at acquisition.
    package let servedElsewhereBefore: Bool
    /// The record was released by a clean, drained close (or there was none): nothing of the volume exists outside
    /// the backend. Set once, at acquisition.
    package let tookRelease: Bool
    /// The generation of the record this lease replaced (nil: there was none).
    package let previousGeneration: UInt64?

    package var generation: UInt64 { state.withLock { $0.record.generation } }
    package var leaseSeconds: Double { state.withLock { $0.record.leaseSeconds } }
    package var version: UInt64 { state.withLock { $0.version } }
    /// Why this router no longer owns the volume (nil while it does).
    package var fenced: VDError? { state.withLock { $0.fenced } }

    /// Whether I/O may be acknowledged at `now` (this process's monotonic clock).
    package func isValid(at now: MonotonicInstant) -> Bool {
        state.withLock { state in state.fenced == nil && state.validUntil.map { now < $0 } ?? false }
    }

    /// Extends the lease by writing the next version. Another router wrote it first: fenced for good (`.busy`
    /// thrown, and `fenced` says why). A store error leaves the lease as it was: it runs out unless a later renewal
    /// succeeds.
    package func renew() async throws(VDError) {
        let taken = try state.withLock { state throws(VDError) -> (UInt64, OwnerRecord)? in
            if let fenced = state.fenced { throw fenced }
            if state.stopped { return nil }
            state.renewing = true
            return (state.version, state.record)
        }
        guard let (version, current) = taken else {
            throw VDError(.shutdown, "the owner lease of \(record.prefix) is no longer renewed")
        }
        defer { state.withLock { $0.renewing = false } }
        let start = clock.now()
        var next = current
        next.nonce = random.hexToken()
        next.writtenAt = clock.wallNow()
        state.withLock { $0.attempts[next.nonce] = start }
        do {
            let written = try await record.write(try MetadataRecord.encode(next, kind: .ownerRecord), after: version)
            state.withLock { state in
                state.attempts = [:]
                guard state.fenced == nil else { return }
                state.version = written
                state.record = next
                state.validUntil = start + .seconds(double: next.leaseSeconds)
            }
            if written % 16 == 0 { try? await record.prune(newest: written) }
        } catch  where error.code == .conflict {
            let taker: (version: UInt64, record: OwnerRecord)?
            do {
                taker = try await Self.current(record)
            } catch {
                // Cannot tell whose version that is: not a fence; the lease runs out unless a renewal succeeds.
                throw VDError(error.code, "cannot renew the owner lease of \(record.prefix): \(error.message)")
            }
            // Our own earlier renewal may have landed with its outcome lost (a reply, or the listing after it, failed):
            // that version is ours; its lease runs from when that attempt started.
            if let taker, let attemptStart = state.withLock({ $0.attempts[taker.record.nonce] }) {
                state.withLock { state in
                    state.attempts = [:]
                    guard state.fenced == nil else { return }
                    state.version = taker.version
                    state.record = taker.record
                    state.validUntil = attemptStart + .seconds(double: taker.record.leaseSeconds)
                }
                return
            }
            throw fence(lostTo: taker?.record, "was taken over by")
        }
    }

    /// This router no longer owns the volume (`newest` is the record that says who does): fenced for good.
    private func fence(lostTo newest: OwnerRecord?, _ how: String) -> VDError {
        let reason = VDError(
            .busy,
            "\(record.prefix.dropLast("/owner/".count)) \(how) node \(newest?.node ?? "?") (generation \(newest.map { String($0.generation) } ?? "?")): this router no longer owns it"
        )
        state.withLock { state in
            state.fenced = reason
            state.validUntil = nil
        }
        return reason
    }

    /// Reads the record now: is the newest version still this router's (any renewal of its own, same generation,
    /// not released)? Anything else fences it (`.busy`). A store error is thrown as it is (not a fence).
    package func confirmOnBackend() async throws(VDError) {
        if let fenced = self.fenced { throw fenced }
        let found = try await Self.current(record)
        let generation = self.generation
        if let found, found.record.instance == identity.instance, found.record.node == identity.node,
            found.record.generation == generation, !found.record.released
        {
            return
        }
        throw fence(lostTo: found?.record, "is now owned by")
    }

    /// Renews every third of the lease period, from the moment it was taken (a volume's open, which can replay for
    /// minutes, must not let it run out) until `stopRenewing`, or until another router took the volume.
    package func renewLoop(what: String, logger: Logger) async {
        let period = Duration.seconds(double: leaseSeconds / 3)
        var last = clock.now()
        while !state.withLock({ $0.stopped }) && fenced == nil {
            await clock.sleep(for: .milliseconds(250))
            let now = clock.now()
            guard last.duration(to: now) >= period, !state.withLock({ $0.stopped }) else { continue }
            last = now
            do {
                try await renew()
            } catch {
                if state.withLock({ $0.stopped }) { return }
                if let fenced {
                    logger.error("\(fenced.message); \(what): its I/O is refused from now on")
                    return
                }
                logger.warning(
                    "cannot renew the owner lease of \(what) (\(error.message)); I/O stops when the lease runs out")
            }
        }
    }

    /// Ends the renewal loop (the volume closed, or did not open). The lease then runs out unless released.
    package func stopRenewing() { state.withLock { $0.stopped = true } }

    /// Gives the volume up (to `node`, or to any): the next router takes it at once. This router's lease ends now.
    /// Renewals stop first, and one in flight is waited for (both write the next version); a renewal of ours that
    /// landed with its reply lost is recognised by its nonce and the release goes on after it.
    package func release(to node: String?) async throws(VDError) {
        state.withLock { $0.stopped = true }
        while state.withLock({ $0.renewing }) { await clock.sleep(for: .milliseconds(5)) }
        for _ in 0..<2 {
            let (version, current) = try state.withLock { state throws(VDError) -> (UInt64, OwnerRecord) in
                if let fenced = state.fenced { throw fenced }
                state.validUntil = nil
                return (state.version, state.record)
            }
            var next = current
            next.released = true
            next.releasedTo = node
            next.nonce = random.hexToken()
            next.writtenAt = clock.wallNow()
            do {
                let written = try await record.write(
                    try MetadataRecord.encode(next, kind: .ownerRecord), after: version)
                state.withLock { state in
                    state.version = written
                    state.record = next
                    state.fenced = VDError(.busy, "\(record.prefix) was released")
                }
                return
            } catch  where error.code == .conflict {
                if let newest = try? await Self.current(record),
                    state.withLock({ $0.attempts[newest.record.nonce] != nil })
                {
                    // Our own renewal: release after it.
                    state.withLock { state in
                        state.attempts = [:]
                        state.version = newest.version
                        state.record = newest.record
                    }
                    continue
                }
                let reason = VDError(.busy, "\(record.prefix) was taken over before it could be released")
                state.withLock { $0.fenced = reason }
                throw reason
            }
        }
        throw VDError(.busy, "\(record.prefix) keeps changing: not released")
    }
}
