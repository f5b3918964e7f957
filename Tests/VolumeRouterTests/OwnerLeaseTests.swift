// The owner lease (groundwork of volume ownership): one owner at a time, takeover only after the lease ran out by
// the owner's own clock whatever the clock rates within the drift bound, fencing of the old owner, release for a
// cooperative move.

import Foundation
import NIOCore
import ObjectStore
import Synchronization
import Testing
import VolumeCore

@testable import VolumeRouter

/// Real time shared by the test, and clocks that run at a rate of it (clock drift).
final class RealTime: Sendable {
    let elapsed = Mutex<Double>(0)
    func advance(_ seconds: Double) { elapsed.withLock { $0 += seconds } }
}

struct DriftingClock: VDClock {
    let real: RealTime
    /// Clock seconds per real second.
    let rate: Double
    /// Runs before time advances in `sleep` (what other parties do meanwhile).
    let onSleep: (@Sendable () async -> Void)?

    init(real: RealTime, rate: Double = 1, onSleep: (@Sendable () async -> Void)? = nil) {
        self.real = real
        self.rate = rate
        self.onSleep = onSleep
    }
    func now() -> MonotonicInstant {
        MonotonicInstant(sinceOrigin: .seconds(double: real.elapsed.withLock { $0 } * rate))
    }
    func wallNow() -> Date { Date(timeIntervalSince1970: 1_800_000_000 + real.elapsed.withLock { $0 }) }
    func sleep(for duration: Duration) async {
        await onSleep?()
        real.advance(duration.seconds / rate)
    }
}

final class CountingRandom: RandomSource {
    let counter = Mutex<UInt64>(0)
    func next() -> UInt64 {
        counter.withLock {
            $0 &+= 0x9E37_79B9_7F4A_7C15; return $0
        }
    }
}

@Suite struct OwnerLeaseTests {
    let store = MemoryStore()
    var record: SequencedRecord { OwnerLease.record(namespace: "vol1", store: store) }
    let a = OwnerIdentity(node: "a", instance: "a-1")
    let b = OwnerIdentity(node: "b", instance: "b-1")

    @Test func oneOwnerAtATimeAndTheSameInstanceContinues() async throws {
        let real = RealTime()
        let clock = DriftingClock(real: real)
        let lease = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        #expect(lease.generation == 1)
        #expect(lease.isValid(at: clock.now()))
        // Another router is refused, naming the owner.
        await #expect {
            _ = try await OwnerLease.acquire(record, as: b, leaseSeconds: 10, clock: clock, random: CountingRandom())
        } throws: { ($0 as? VDError)?.code == .busy && ($0 as? VDError)?.message.contains("node a") == true }
        // A restart of the same data directory continues with the same generation, no wait.
        let again = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        #expect(again.generation == 1 && again.version == 2)
        // The lease runs out by the owner's clock unless renewed.
        real.advance(9.9)
        #expect(again.isValid(at: clock.now()))
        try await again.renew()
        real.advance(9.9)
        #expect(again.isValid(at: clock.now()))
        real.advance(0.2)
        #expect(!again.isValid(at: clock.now()))
    }

    @Test func releaseHandsTheVolumeOverAtOnceAndFencesTheOldOwner() async throws {
        let clock = DriftingClock(real: RealTime())
        let owner = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        try await owner.release(to: "b")
        #expect(!owner.isValid(at: clock.now()))
        // Released to b: c may not take it; b takes it without waiting, in the next generation.
        let c = OwnerIdentity(node: "c", instance: "c-1")
        await #expect(throws: VDError.self) {
            _ = try await OwnerLease.acquire(record, as: c, leaseSeconds: 10, clock: clock, random: CountingRandom())
        }
        let taken = try await OwnerLease.acquire(
            record, as: b, leaseSeconds: 10, clock: clock, random: CountingRandom())
        #expect(taken.generation == 2)
        await #expect { try await owner.renew() } throws: { ($0 as? VDError)?.code == .busy }
    }

    @Test func takeoverWaitsOutTheLeaseAndFencesTheSilentOwner() async throws {
        let real = RealTime()
        let ownerClock = DriftingClock(real: real)
        let owner = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 20, clock: ownerClock, random: CountingRandom())
        let takerClock = DriftingClock(real: real)
        let taken = try await OwnerLease.takeover(
            record, as: b, leaseSeconds: 20, clock: takerClock, random: CountingRandom())
        #expect(taken.generation == 2)
        #expect(real.elapsed.withLock { $0 } >= OwnerLease.waitSeconds(forLease: 20) - 1e-6)
        #expect(!owner.isValid(at: ownerClock.now()), "the silent owner's lease ran out before the takeover")
        await #expect { try await owner.renew() } throws: {
            ($0 as? VDError)?.code == .busy && ($0 as? VDError)?.message.contains("node b") == true
        }
        #expect(owner.fenced != nil)
        #expect(!owner.isValid(at: ownerClock.now()))
    }

    @Test func aLiveOwnerIsNeverTakenOver() async throws {
        let real = RealTime()
        let ownerClock = DriftingClock(real: real)
        let owner = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 20, clock: ownerClock, random: CountingRandom())
        // The owner renews while the taker waits.
        let takerClock = DriftingClock(real: real) { try? await owner.renew() }
        await #expect {
            _ = try await OwnerLease.takeover(
                record, as: b, leaseSeconds: 20, clock: takerClock, random: CountingRandom())
        } throws: { ($0 as? VDError)?.code == .busy && ($0 as? VDError)?.message.contains("alive") == true }
        #expect(owner.fenced == nil)
        #expect(try await OwnerLease.current(record)?.record.node == "a")
    }

    @Test func twoTakeoversRacingExactlyOneWins() async throws {
        let real = RealTime()
        _ = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 5, clock: DriftingClock(real: real), random: CountingRandom())
        let record = self.record
        let b = self.b
        // Both read the record before either writes: each waits in its sleep until both are there.
        let waiting = Mutex(0)
        let barrier: @Sendable () async -> Void = {
            waiting.withLock { $0 += 1 }
            while waiting.withLock({ $0 }) < 2 { await Task.yield() }
        }
        let results = await withTaskGroup(of: Bool.self) { group in
            for identity in [b, OwnerIdentity(node: "c", instance: "c-1")] {
                group.addTask {
                    (try? await OwnerLease.takeover(
                        record, as: identity, leaseSeconds: 5, clock: DriftingClock(real: real, onSleep: barrier),
                        random: CountingRandom())) != nil
                }
            }
            var all: [Bool] = []
            for await result in group { all.append(result) }
            return all
        }
        #expect(results.filter { $0 }.count == 1, "\(results)")
        #expect(try await OwnerLease.current(record)?.record.generation == 2)
    }

    /// The safety argument, checked: the owner's clock runs slow and the taker's fast by the whole drift bound, for
    /// short and very long leases; the takeover's write still lands after the owner's lease ran out in real time.
    @Test(arguments: [1.0, 15, 60, 600, 3600, 86_400])
    func takeoverAfterTheOwnersLeaseWhateverTheDrift(leaseSeconds: Double) async throws {
        let real = RealTime()
        let drift = OwnerLease.driftFraction
        let ownerClock = DriftingClock(real: real, rate: 1 - drift)
        let owner = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: leaseSeconds, clock: ownerClock, random: CountingRandom())
        // The real time at which the owner stops acknowledging: its clock reaches t0 + lease.
        let ownerStopsAt = leaseSeconds / (1 - drift)
        let taken = try await OwnerLease.takeover(
            record, as: b, leaseSeconds: leaseSeconds, clock: DriftingClock(real: real, rate: 1 + drift),
            random: CountingRandom())
        #expect(taken.generation == 2)
        let takenAt = real.elapsed.withLock { $0 }
        #expect(takenAt >= ownerStopsAt, "taken at \(takenAt) s, the owner acknowledges until \(ownerStopsAt) s")
        #expect(!owner.isValid(at: ownerClock.now()))
    }

    /// A copied data directory (same instance id) on another node does not pass for the owner.
    @Test func theSameInstanceOnAnotherNodeIsNotTheOwner() async throws {
        let clock = DriftingClock(real: RealTime())
        _ = try await OwnerLease.acquire(record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        let copy = OwnerIdentity(node: "b", instance: a.instance)
        await #expect {
            _ = try await OwnerLease.acquire(record, as: copy, leaseSeconds: 10, clock: clock, random: CountingRandom())
        } throws: { ($0 as? VDError)?.code == .busy }
    }

    /// A move whose target never took the volume: the releasing router takes its own release back, and knows its
    /// local state is current; a router that takes a volume another one served knows its local state is not.
    @Test func anOwnReleaseCanBeTakenBackAndOthersStateIsStale() async throws {
        let clock = DriftingClock(real: RealTime())
        let first = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        #expect(!first.servedElsewhereBefore)
        try await first.release(to: "b")
        // Only when asked (a move's failure path): an ordinary open does not take back a release meant for b.
        await #expect(throws: VDError.self) {
            _ = try await OwnerLease.acquire(
                record, as: self.a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        }
        let back = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom(), retakingOwnRelease: true)
        #expect(back.generation == 2 && !back.servedElsewhereBefore)
        try await back.release(to: "b")
        let onB = try await OwnerLease.acquire(record, as: b, leaseSeconds: 10, clock: clock, random: CountingRandom())
        #expect(onB.generation == 3 && onB.servedElsewhereBefore)
    }

    /// A renewal that landed but whose outcome was lost (the listing after it failed) is recognised as our own by the
    /// next renewal, not taken for a takeover that fences this router.
    @Test func aRenewalWhoseOutcomeWasLostIsNotATakeover() async throws {
        let flaky = ListFailingStore(MemoryStore())
        let record = OwnerLease.record(namespace: "vol1", store: flaky)
        let real = RealTime()
        let clock = DriftingClock(real: real)
        let lease = try await OwnerLease.acquire(
            record, as: a, leaseSeconds: 10, clock: clock, random: CountingRandom())
        real.advance(3)
        flaky.failNextList.withLock { $0 = true }
        await #expect(throws: VDError.self) { try await lease.renew() }
        #expect(lease.fenced == nil)
        real.advance(3)
        try await lease.renew()
        #expect(lease.fenced == nil)
        #expect(lease.isValid(at: clock.now()))
        #expect(try await OwnerLease.current(record)?.record.node == "a")
    }
}

/// A store whose next listing fails once (a reply lost after a write landed).
final class ListFailingStore: ObjectStore, Sendable {
    let wrapped: MemoryStore
    let failNextList = Mutex(false)
    init(_ wrapped: MemoryStore) { self.wrapped = wrapped }
    var description: String { "list-failing \(wrapped.description)" }
    func confirmsCreateOnly() async throws(VDError) -> Bool { true }
    func put(_ name: String, data: ByteBuffer) async throws(VDError) { try await wrapped.put(name, data: data) }
    func replace(_ name: String, data: ByteBuffer) async throws(VDError) { try await wrapped.replace(name, data: data) }
    func get(_ name: String) async throws(VDError) -> ByteBuffer { try await wrapped.get(name) }
    func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        try await wrapped.get(name, range: range)
    }
    func head(_ name: String) async throws(VDError) -> ObjectInfo? { try await wrapped.head(name) }
    func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        let fail = failNextList.withLock { fail -> Bool in
            defer { fail = false }
            return fail
        }
        if fail { throw VDError(.backend, "the listing's reply was lost") }
        return try await wrapped.list(prefix: prefix)
    }
    func delete(_ name: String) async throws(VDError) { try await wrapped.delete(name) }
    func verifyAccess() async throws(VDError) {}
}
