// Several routers contending for one volume's ownership on the deterministic scheduler (groundwork of scale-out
// ownership): each router has its own clock running at a rate within the drift bound, reaches the shared simulated
// store through a link that partitions (requests fail, or land with their reply lost), is killed and restarted, and
// acquires, renews, releases and takes over the lease as a router would. A monitor checks on virtual time, every
// 10 ms, that at most one live router holds a valid lease, and the run checks that every generation had one owner
// and generations only grow.

import Foundation
import NIOCore
import ObjectStore
import VolumeCore
import VolumeRouter

/// What one lease run found.
package struct LeaseSimulationReport: Sendable {
    package var seed: UInt64
    package var violations: [String] = []
    package var acquisitions = 0
    package var takeovers = 0
    package var fencings = 0
    package var partitions = 0
    package var kills = 0
    package var trace: [String] = []
    package var passed: Bool { violations.isEmpty }
}

/// A router's clock: the scheduler's time at a rate (clock seconds per real second).
struct SimDriftClock: VDClock {
    let scheduler: SimScheduler
    let rate: Double
    func now() -> MonotonicInstant { MonotonicInstant(sinceOrigin: .seconds(double: scheduler.now.seconds * rate)) }
    func wallNow() -> Date { scheduler.startDate.addingTimeInterval(scheduler.now.seconds) }
    func sleep(for duration: Duration) async { await scheduler.sleep(for: .seconds(double: duration.seconds / rate)) }
}

/// One router's link to the shared store: cut, it fails requests (before they reach the store, or after, with the
/// reply lost).
final class PartitionedStore: ObjectStore, @unchecked Sendable {
    let wrapped: SimObjectStore
    let scheduler: SimScheduler
    var cut = false

    init(_ wrapped: SimObjectStore, scheduler: SimScheduler) {
        self.wrapped = wrapped
        self.scheduler = scheduler
    }

    var description: String { "partitioned \(wrapped.description)" }
    func confirmsCreateOnly() async throws(VDError) -> Bool { true }

    private func link<T>(_ body: () async throws(VDError) -> T) async throws(VDError) -> T {
        if cut { throw VDError(.backend, "partitioned from the store") }
        let result = try await body()
        if cut { throw VDError(.backend, "partitioned from the store: the reply was lost") }
        return result
    }

    func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try await link { () async throws(VDError) in try await wrapped.put(name, data: data) }
    }
    func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        try await link { () async throws(VDError) in try await wrapped.replace(name, data: data) }
    }
    func get(_ name: String) async throws(VDError) -> ByteBuffer {
        try await link { () async throws(VDError) in try await wrapped.get(name) }
    }
    func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        try await link { () async throws(VDError) in try await wrapped.get(name, range: range) }
    }
    func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try await link { () async throws(VDError) in try await wrapped.head(name) }
    }
    func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        try await link { () async throws(VDError) in try await wrapped.list(prefix: prefix) }
    }
    func delete(_ name: String) async throws(VDError) {
        try await link { () async throws(VDError) in try await wrapped.delete(name) }
    }
    func verifyAccess() async throws(VDError) {}
}

package enum LeaseSimulation {
    /// One contending router (touched only on the simulation thread).
    final class Router: @unchecked Sendable {
        let identity: OwnerIdentity
        let clock: SimDriftClock
        let link: PartitionedStore
        var process: SimProcess
        var lease: OwnerLease?
        init(identity: OwnerIdentity, clock: SimDriftClock, link: PartitionedStore, process: SimProcess) {
            self.identity = identity
            self.clock = clock
            self.link = link
            self.process = process
        }
    }

    /// Runs `seed` for `duration` of virtual time with `routers` routers and a lease of `leaseSeconds`.
    package static func run(
        seed: UInt64, routers count: Int = 3, leaseSeconds: Double = 10, duration: Duration = .seconds(600)
    ) -> LeaseSimulationReport {
        let result = LockedReport(LeaseSimulationReport(seed: seed))
        let thread = Thread {
            result.set(simulate(seed: seed, count: count, leaseSeconds: leaseSeconds, duration: duration))
        }
        thread.stackSize = 16 << 20
        thread.start()
        return result.wait()
    }

    private static func simulate(
        seed: UInt64, count: Int, leaseSeconds: Double, duration: Duration
    ) -> LeaseSimulationReport {
        let trace = SimTrace(linesMax: 1000)
        let scheduler = SimScheduler(seed: seed, trace: trace)
        scheduler.bindToCurrentThread()
        trace.clock = { scheduler.now }
        let world = World(
            scheduler: scheduler, trace: trace, seed: seed, leaseSeconds: leaseSeconds, end: scheduler.now + duration)
        world.store.contendedPrefixes = ["vol1/owner/"]
        world.store.faults.failBefore = 0.02
        world.store.faults.failAfter = 0.02
        world.store.faults.latency = .milliseconds(30)
        let drift = OwnerLease.driftFraction
        for index in 0..<count {
            // Rates at the edges of the bound are the interesting ones.
            let rate = [1 - drift, 1 + drift, 1.0][scheduler.below(3)]
            let name = "router-\(index)"
            world.routers.append(
                Router(
                    identity: OwnerIdentity(node: name, instance: name + "-instance"),
                    clock: SimDriftClock(scheduler: scheduler, rate: rate),
                    link: PartitionedStore(world.store, scheduler: scheduler), process: scheduler.makeProcess(name)))
            trace.add("\(name): clock rate \(rate)")
        }
        world.routers.forEach(world.start)
        world.startChaos()
        world.startMonitor()
        scheduler.run(until: { scheduler.now >= world.end && !scheduler.hasReadyJobs }, maxSteps: 20_000_000)
        var report = world.report
        if let escaped = scheduler.escaped { report.violations.append("the run escaped the scheduler: \(escaped)") }
        report.violations += scheduler.invariantFailures
        if report.acquisitions + report.takeovers == 0 { report.violations.append("nobody ever owned the volume") }
        report.trace = trace.tail
        scheduler.releaseAll()
        return report
    }

    /// Everything one run shares (touched only on the simulation thread).
    final class World: @unchecked Sendable {
        let scheduler: SimScheduler
        let trace: SimTrace
        let store: SimObjectStore
        let leaseSeconds: Double
        let end: Duration
        var routers: [Router] = []
        var report: LeaseSimulationReport
        var generationOwners: [UInt64: String] = [:]
        var highestGeneration: UInt64 = 0

        init(scheduler: SimScheduler, trace: SimTrace, seed: UInt64, leaseSeconds: Double, end: Duration) {
            self.scheduler = scheduler
            self.trace = trace
            store = SimObjectStore(scheduler: scheduler)
            self.leaseSeconds = leaseSeconds
            self.end = end
            report = LeaseSimulationReport(seed: seed)
        }

        func noteOwner(_ router: Router, _ lease: OwnerLease, how: String) {
            if let owner = generationOwners[lease.generation], owner != router.identity.instance {
                report.violations.append(
                    "generation \(lease.generation) owned by \(owner) and \(router.identity.instance)")
            }
            if lease.generation < highestGeneration {
                report.violations.append(
                    "\(router.identity.node) took generation \(lease.generation) after \(highestGeneration) existed")
            }
            generationOwners[lease.generation] = router.identity.instance
            highestGeneration = max(highestGeneration, lease.generation)
            trace.add("\(router.identity.node) \(how) generation \(lease.generation)")
        }

        /// The router's life: acquire (or, when busy, sometimes take over), then renew every third of the lease,
        /// now and then release.
        func start(_ router: Router) {
            let record = SequencedRecord(
                store: router.link, prefix: OwnerLease.record(namespace: "vol1", store: store).prefix)
            let random = SimRandomSource(scheduler: scheduler)
            router.process.spawn { [self] in
                while scheduler.now < end {
                    guard let lease = router.lease else {
                        await becomeOwner(router, record: record, random: random)
                        continue
                    }
                    await router.clock.sleep(for: .seconds(double: leaseSeconds / 3))
                    if scheduler.chance(0.02) {
                        try? await lease.release(to: nil)
                        trace.add("\(router.identity.node) released generation \(lease.generation)")
                        router.lease = nil
                        await router.clock.sleep(for: .seconds(2))
                        continue
                    }
                    do {
                        let before = scheduler.now
                        try await lease.renew()
                        if ProcessInfo.processInfo.environment["VD_SIM_LEASE_DEBUG"] != nil {
                            trace.add(
                                "\(router.identity.node) renewed v\(lease.version) (started \(before.seconds)) valid \(lease.isValid(at: router.clock.now()))"
                            )
                        }
                    } catch {
                        if lease.fenced != nil {
                            report.fencings += 1
                            trace.add("\(router.identity.node) fenced: \(error)")
                            router.lease = nil
                        }
                    }
                }
            }
        }

        private func becomeOwner(_ router: Router, record: SequencedRecord, random: SimRandomSource) async {
            do {
                let lease = try await OwnerLease.acquire(
                    record, as: router.identity, leaseSeconds: leaseSeconds, clock: router.clock, random: random)
                router.lease = lease
                report.acquisitions += 1
                noteOwner(router, lease, how: "acquired")
                return
            } catch  where error.code == .busy && scheduler.chance(0.3) {
                do {
                    let lease = try await OwnerLease.takeover(
                        record, as: router.identity, leaseSeconds: leaseSeconds, clock: router.clock, random: random)
                    router.lease = lease
                    report.takeovers += 1
                    noteOwner(router, lease, how: "took over")
                    return
                } catch {
                    await router.clock.sleep(for: .seconds(1))
                }
            } catch {
                await router.clock.sleep(for: .seconds(double: 0.5 + Double(scheduler.below(30)) / 10))
            }
        }

        /// Partitions of one router from the store, and kills with a restart of the same instance.
        func startChaos() {
            scheduler.makeProcess("chaos").spawn { [self] in
                while scheduler.now < end {
                    await scheduler.sleep(for: .seconds(double: Double(5 + scheduler.below(40))))
                    let router = routers[scheduler.below(routers.count)]
                    if scheduler.chance(0.7) {
                        let seconds = Double(1 + scheduler.below(Int(leaseSeconds * 4)))
                        router.link.cut = true
                        report.partitions += 1
                        trace.add("\(router.identity.node) partitioned for \(seconds) s")
                        await scheduler.sleep(for: .seconds(double: seconds))
                        router.link.cut = false
                    } else {
                        router.process.kill()
                        router.lease = nil
                        report.kills += 1
                        trace.add("\(router.identity.node) killed")
                        await scheduler.sleep(for: .seconds(double: Double(1 + scheduler.below(20))))
                        router.process = scheduler.makeProcess(router.identity.node)
                        start(router)
                    }
                }
            }
        }

        /// At most one live router may acknowledge at any time.
        func startMonitor() {
            scheduler.makeProcess("monitor").spawn { [self] in
                while scheduler.now < end {
                    await scheduler.sleep(for: .milliseconds(10))
                    let valid = routers.filter { router in
                        router.process.isAlive && (router.lease?.isValid(at: router.clock.now()) ?? false)
                    }
                    if valid.count > 1 && report.violations.count < 5 {
                        report.violations.append(
                            "at \(scheduler.now.seconds) s two routers hold a valid lease: "
                                + valid.map { "\($0.identity.node) generation \($0.lease!.generation)" }.joined(
                                    separator: ", "))
                    }
                }
            }
        }
    }
}

/// Hands a report from the simulation thread to the caller.
final class LockedReport: @unchecked Sendable {
    private let condition = NSCondition()
    private var report: LeaseSimulationReport
    private var done = false
    init(_ initial: LeaseSimulationReport) { report = initial }
    func set(_ value: LeaseSimulationReport) {
        condition.lock()
        report = value
        done = true
        condition.signal()
        condition.unlock()
    }
    func wait() -> LeaseSimulationReport {
        condition.lock()
        while !done { condition.wait() }
        defer { condition.unlock() }
        return report
    }
}
