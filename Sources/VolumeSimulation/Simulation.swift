// The deterministic simulation of VolumeDriver: a whole node (the real Router, Volume, uploader, scrubber and
// namespace check) on a simulated file system, map store, object store and clock, driven by a seeded random
// workload and checked against the model after every step (see SimModel.swift for what "correct" means).
//
// One run = one seed. Everything runs on one thread in virtual time: a run of simulated minutes (uploads, age-based
// sealing, scrub grace periods, lease expiries) takes a fraction of a second, and a seed replays exactly (with
// SWIFT_DETERMINISTIC_HASHING=1, which `tools/sim.sh` and the test command set).
//
// The workload: writes, write-zeroes and trims of any sector alignment (several in flight, never two on one sector),
// FUA, flushes, reads; snapshot create, delete and rollback; clones and clones of clones; scrubs (killed at random
// points, two at once); `check` and `check --repair`; a backend that fails requests, loses replies, corrupts reads
// and goes away; process crashes; power losses; a clean stop then the local flash lost then a restart from the
// backend; the local flash lost without a stop.

import DTL
import FlashIO
import Foundation
import Logging
import NIOCore
import ObjectStore
import Scrubber
import Synchronization
import VolumeCore
import VolumeRouter

package struct SimulationConfig: Sendable {
    package var seed: UInt64
    package var operations = 200
    package var volumeBytes: UInt64 = 8 << 20
    package var scoBytes: UInt64 = 1 << 20
    package var inFlightMax = 4
    /// Backend faults (failed requests, lost replies, corrupted reads, outages).
    package var backendFaults = true
    /// Crashes, power losses and flash losses.
    package var crashes = true
    package var scrubs = true
    package var clones = true
    /// Clusters per intermediate map apply (nil: chosen by the seed).
    package var mapChunkClusters: Int?
    /// Errors of operations are recorded instead of failing the run (scripts that provoke them).
    package var tolerateErrors = false
    /// Routers serve volumes under owner leases (`vd serve --node`), and some moves are takeovers from a router
    /// partitioned from the backend that comes back and uploads late (nil: one seed in four).
    package var ownership: Bool?
    /// With ownership: volumes are mirrored in sync mode to a DTL peer machine; the link is cut and the peer loses
    /// its disk now and then; a flash loss or takeover while in sync must keep every replied write (nil: half of the
    /// ownership seeds).
    package var dtl: Bool?
    /// Print the trace as it happens.
    package var verbose = false
    package init(seed: UInt64) { self.seed = seed }
}

package struct SimulationReport: Sendable {
    package var seed: UInt64
    package var failure: String?
    package var operations = 0
    package var steps: UInt64 = 0
    package var virtualSeconds = 0.0
    package var counts: [String: Int] = [:]
    package var trace: [String] = []
    package var passed: Bool { failure == nil }
}

/// Runs simulations, each on its own thread (the simulation thread).
package enum SimulationRunner {
    package static func run(_ config: SimulationConfig) -> SimulationReport {
        let result = Mutex<SimulationReport?>(nil)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            setThreadName("seed \(config.seed)")
            let report = Simulation(config: config).run()
            result.withLock { $0 = report }
            done.signal()
        }
        // A trap in the code under test ends the whole process: its backtrace names the seed by the thread's name.
        thread.name = "seed \(config.seed)"
        thread.stackSize = 64 << 20
        thread.start()
        done.wait()
        return result.withLock { $0! }
    }

    package static func runAsync(_ config: SimulationConfig) async -> SimulationReport {
        await withCheckedContinuation { continuation in
            let thread = Thread {
                setThreadName("seed \(config.seed)")
                let report = Simulation(config: config).run()
                continuation.resume(returning: report)
            }
            thread.name = "seed \(config.seed)"
            thread.stackSize = 64 << 20
            thread.start()
        }
    }
}

/// Names the calling thread (a crash's backtrace shows it, so it names the seed).
func setThreadName(_ name: String) {
    Thread.current.name = String(name.prefix(15))
}

/// A failed check: ends the run.
struct SimFailure: Error {
    var message: String
}

/// One simulated machine: its local file system, its map stores and the router running on it.
final class SimNode: @unchecked Sendable {
    let name: String
    let fs: SimFileSystem
    let maps: SimKeyValueStores
    let dataDirectory: String
    var routerProcess: SimProcess?
    var router: Router?

    init(name: String, scheduler: SimScheduler) {
        self.name = name
        fs = SimFileSystem(name: name, scheduler: scheduler)
        maps = SimKeyValueStores(scheduler: scheduler)
        dataDirectory = "/" + name + "/data"
    }

    var flashDirectory: String { dataDirectory + "/flash" }
}

struct SimBackends: BackendResolver {
    let store: any ObjectStore
    let compress: Bool
    func store(named name: String) throws(VDError) -> any ObjectStore { store }
    var defaultBackendName: String { "sim" }
    func compressesUploads(_ name: String) -> Bool { compress }
}

/// A log handler writing to the run's trace.
struct SimLogHandler: LogHandler {
    let trace: SimTrace
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        let volume = metadata["volume"].map { " [\($0)]" } ?? ""
        trace.add("\(event.level)\(volume): \(event.message)")
    }
}

final class Simulation: @unchecked Sendable {
    let config: SimulationConfig
    let scheduler: SimScheduler
    let trace: SimTrace
    let store: SimObjectStore
    /// The node serving the volumes now (a move attaches them on a new one).
    var node: SimNode
    /// With ownership: a second router that clones move to, away from their parents (docs/design.md, "Clones across
    /// owners"). It never crashes and no failpoint fires in it; its clones read their parents through backend views
    /// while the main node crashes, loses its flash, scrubs, and moves or is taken over.
    var peer: SimNode?
    /// Devices the peer serves.
    var peerDevices: Set<String> = []
    var nodeCount = 1
    let logger: Logger
    let client: SimProcess
    let compress: Bool
    /// Small chunks make large unmaps, rollbacks and scrub applications take several intermediate map applies.
    let mapChunkClusters: Int
    let clusterBytes = 4096
    var report: SimulationReport

    // Model
    var devices: [String: DeviceModel] = [:]
    var snapshots: [String: SnapshotModel] = [:]
    var coveredSeq: [String: UInt64] = [:]
    /// One counter for issues and replies, so "replied before issued" compares on one clock.
    var events: UInt64 = 0
    var nextWriteID: UInt32 = 1
    var snapshotCounter = 0
    var cloneCounter = 0

    // Operations in flight
    struct InFlight {
        var kind: String
        var device: String
        var sectors: Range<Int>
        var issueSeq: UInt64
        var replyCounterAtIssue: UInt64
        var faultsAtIssue: Int
        var apply: (Simulation, InFlight, Result<OpOutput, VDError>) throws -> Void
    }
    enum OpOutput {
        case none
        case data(ByteBuffer)
        case snapshot(SnapshotRecord)
    }
    var inFlight: [Int: InFlight] = [:]
    var nextOpID = 0
    var completions: [(Int, Result<OpOutput, VDError>)] = []
    /// Devices on which no new operation may start (a snapshot is being taken, a rollback is coming).
    var frozen: Set<String> = []
    var scrubbers: [SimProcess] = []
    /// Clones that cannot open any more (their base never reached the backend before a flash loss).
    var lostClones: Set<String> = []
    /// Scrubber processes whose run ended (done or failed).
    var scrubsFinished: Set<Int> = []
    /// How each scrubber's run ended with an error (by process id).
    var scrubErrors: [Int: VDError] = [:]
    var failure: SimFailure?
    var outageUntilOperation: Int?
    /// A loss (power, flash, takeover) whose verification has not finished: the model has not adopted what survived,
    /// so a crash before it finishes is verified as that loss too.
    var pendingLoss: (kind: CrashKind, stored: [String: UInt64])?
    /// Owner leases in use (see `SimulationConfig.ownership`), and each node's link to the store.
    let ownership: Bool
    var links: [String: PartitionedStore] = [:]
    /// Armed failpoints that stand for a power loss, and whether one fired since the last recovery.
    var powerLossFailpoints: Set<String> = []
    var powerLossPending = false
    /// The DTL peer machine (DTL seeds), and the devices whose mirror was in sync when the loss being verified came
    /// (every replied write of theirs must have survived it).
    let dtl: Bool
    var dtlPeer: SimDTLPeer?
    var dtlProtected: Set<String> = []

    init(config: SimulationConfig) {
        self.config = config
        trace = SimTrace(verbose: config.verbose)
        scheduler = SimScheduler(seed: config.seed, trace: trace)
        let scheduler = self.scheduler
        trace.clock = { scheduler.now }
        store = SimObjectStore(scheduler: scheduler)
        node = SimNode(name: "node1", scheduler: scheduler)
        let trace = self.trace
        logger = Logger(label: "vd") { _ in SimLogHandler(trace: trace, logLevel: config.verbose ? .debug : .info) }
        client = scheduler.makeProcess("client")
        client.role = "client"
        compress = scheduler.chance(0.3)
        mapChunkClusters = config.mapChunkClusters ?? (scheduler.chance(0.5) ? 64 : 65536)
        // How eagerly the map store makes its memtable durable by itself: rarely, often, or after every write (a map
        // ahead of the journal is then the rule: recovery must judge it).
        node.maps.autoFlushProbability = [0.05, 0.3, 1.0][scheduler.below(3)]
        report = SimulationReport(seed: config.seed)
        ownership = config.ownership ?? (config.seed % 4 == 1)
        dtl = ownership && (config.dtl ?? ((config.seed / 4) % 2 == 0))
        if dtl { dtlPeer = SimDTLPeer(scheduler: scheduler, logger: logger) }
        scheduler.failpointFired = { [unowned self] name in
            if self.powerLossFailpoints.contains(name) { self.powerLossPending = true }
        }
        if config.backendFaults {
            store.faults.failBefore = 0.03
            store.faults.failAfter = 0.02
            store.faults.corruptRead = 0.01
            // The DTL record (the versions, and the single object before them): a late `in_sync` must never
            // replace a later `degraded`, or a taker would trust a peer that lacks replied writes.
            store.faults.lateWrite = 0.2
            store.lateWrites = { $0.contains("/dtl-state/") || $0.hasSuffix("/dtl") }
        }
    }

    // MARK: running

    func run() -> SimulationReport {
        scheduler.bindToCurrentThread()
        trace.add(
            "seed \(config.seed): \(config.operations) operations, volume \(config.volumeBytes >> 20) MiB, SCO \(config.scoBytes >> 20) MiB, compression \(compress), map chunks \(mapChunkClusters), map auto-flush \(node.maps.autoFlushProbability)"
        )
        do {
            try boot()
            try createVolume("vol1")
            for index in 0..<config.operations {
                report.operations = index + 1
                do {
                    try step(index)
                } catch is RouterKilled {
                    trace.add("the router was killed at a failpoint before a verification could read: recovering")
                    try recoverFromFailpoint()
                }
                try checkInvariants()
                if let failure { throw failure }
            }
            scheduler.armedFailpoints = [:]
            try recoverFromFailpoint()
            try quiesce()
            store.outage = false
            try verifyEverything(after: .none, full: true)
            try runCheck(repair: false)
        } catch let error as SimFailure {
            report.failure = error.message
        } catch {
            report.failure = "unexpected error: \(error)"
        }
        if report.failure == nil, let escaped = scheduler.escaped {
            report.failure = "nondeterminism: \(escaped)"
        }
        report.steps = scheduler.steps
        report.virtualSeconds = scheduler.now.seconds
        report.trace = trace.tail
        releaseAll()
        return report
    }

    /// Frees what the run held: tasks abandoned by crashes are never resumed, and they keep references to volumes,
    /// files and stores; emptying those keeps memory flat over many runs.
    func releaseAll() {
        scheduler.releaseAll()
        node.fs.releaseAll()
        node.maps.releaseAll()
        store.releaseAll()
        node.router = nil
        devices = [:]
        snapshots = [:]
        inFlight = [:]
        completions = []
    }

    func count(_ what: String) { report.counts[what, default: 0] += 1 }

    /// Fails the run if the code under test reported a broken invariant.
    func checkInvariants() throws {
        if let first = scheduler.invariantFailures.first { throw fail("invariant violated: \(first)") }
    }

    func fail(_ message: String) -> SimFailure {
        trace.add("FAILED: \(message)")
        return SimFailure(message: message)
    }

    /// Runs the scheduler until `done` or until it stalls.
    func runUntil(_ what: String, timeout: Duration = .seconds(600), _ done: () -> Bool) throws {
        let deadline = scheduler.now + timeout
        let ok = scheduler.run(until: { done() || scheduler.now > deadline || failure != nil })
        if let failure { throw failure }
        if !done() {
            throw fail(
                ok
                    ? "\(what): not done after \(timeout) of virtual time"
                    : "\(what): stalled (nothing left to run: a deadlock)")
        }
    }

    /// Runs `body` in `process` and waits for it.
    func runIn<T>(
        _ process: SimProcess, _ what: String, timeout: Duration = .seconds(600),
        _ body: @escaping @Sendable () async throws(VDError) -> T
    ) throws -> Result<T, VDError> {
        let box = ResultBox<T>()
        process.spawn {
            let result: Result<T, VDError>
            do throws(VDError) { result = .success(try await body()) } catch { result = .failure(error) }
            box.result = result
        }
        try runUntil(what, timeout: timeout) { box.result != nil || !process.isAlive }
        guard let result = box.result else { return .failure(VDError(.io, "\(process.name) died")) }
        return result
    }

    // MARK: the router

    var routerConfiguration: RouterConfiguration { routerConfiguration(for: node) }

    func routerConfiguration(for node: SimNode) -> RouterConfiguration {
        var configuration = RouterConfiguration(dataDirectory: node.dataDirectory)
        configuration.directIO = false
        configuration.cacheCapacityBytes = 64 << 20
        var options = VolumeOptions()
        options.scoSizeBytes = config.scoBytes
        options.uploadPendingBytesMax = 8 << 20
        options.uploadAgeSecondsMax = 5
        options.uploadRetryDelaySeconds = 0.2
        options.uploadRetryDelaySecondsMax = 5
        options.scrubPollSeconds = 3
        options.scrubDeleteGraceSeconds = 5
        options.readAheadBytes = 64 << 10
        options.mapCacheEntries = 4096
        options.mapChangeChunkClusters = mapChunkClusters
        options.checkExpensiveInvariants = true
        configuration.volumeOptions = options
        if ownership {
            // Long enough that no backend outage of a run outlasts it: only a takeover ends a lease.
            configuration.ownership = OwnershipSettings(node: node.name, leaseSeconds: Self.leaseSeconds)
        }
        return configuration
    }

    /// `afterFlashLoss`: a clone whose parent's snapshot never reached the backend cannot be rebuilt (its base is
    /// gone with the flash): it may fail to open, and leaves the model.
    func boot(afterFlashLoss: Bool = false) throws {
        let network = dtlNetwork(from: node)
        let (process, env) = makeProcess("router", role: "router", on: node)
        node.routerProcess = process
        let configuration = routerConfiguration
        let backends = SimBackends(store: link(node), compress: compress)
        let logger = self.logger
        let outcome = try runIn(process, "router start") {
            () async throws(VDError) -> (Router, [(VolumeName, VDError)]) in
            let router = try Router(configuration: configuration, backends: backends, logger: logger, environment: env)
            if let network { router.enableDTL(network) }
            let failures = await router.openAll { _ in }
            return (router, failures)
        }
        switch outcome {
        case .success(let (router, failures)):
            node.router = router
            router.remoteCloneRegistrar = cloneRegistrar(toward: { $0.peer })
            for (name, error) in failures {
                if lostClones.contains(name.rawValue) { continue }
                if afterFlashLoss,
                    error.message.contains("which no longer exists")
                        || error.message.contains("which is not open on this router")
                {
                    trace.add(
                        "clone \(name) is lost with its parent's snapshot (it never reached the backend): \(error)")
                    devices[name.rawValue] = nil
                    lostClones.insert(name.rawValue)
                    continue
                }
                // The DTL peer's copy may be short (it was not in sync): what `vd volume takeover --accept-loss`
                // does.
                func acceptLoss(_ error: VDError) throws -> Bool {
                    trace.add("volume \(name) did not open (\(error)); taking it over accepting the loss")
                    count("dtl-accept-loss")
                    let taken = try runIn(process, "take \(name) accepting loss") {
                        () async throws(VDError) -> Volume in
                        let registration = try VolumeRegistry.read(
                            dataDirectory: router.configuration.dataDirectory, name: name, fs: env.fs)!
                        let lease = try await router.takeOver(registration)
                        return try await router.open(registration, taken: lease, acceptLoss: true) { _ in }
                    }
                    if case .failure(let error) = taken {
                        if !process.isAlive { return false }
                        throw fail("volume \(name) does not open accepting the loss: \(error)")
                    }
                    return true
                }
                if error.code == .dataLoss {
                    guard try acceptLoss(error) else {
                        node.router = nil
                        return try boot(afterFlashLoss: afterFlashLoss)
                    }
                    continue
                }
                // A backend that is down when the router starts: the volume opens once it is back.
                guard store.outage || error.code == .backend else {
                    throw fail("volume \(name) does not open after a restart: \(error)")
                }
                trace.add("volume \(name) did not open (\(error)); opening it again with the backend back")
                store.outage = false
                outageUntilOperation = nil
                let reopened = try runIn(process, "reopen \(name)") { () async throws(VDError) -> Volume in
                    try await router.openVolume(named: name)
                }
                if case .failure(let error) = reopened, error.code == .dataLoss {
                    guard try acceptLoss(error) else {
                        node.router = nil
                        return try boot(afterFlashLoss: afterFlashLoss)
                    }
                    continue
                }
                if case .failure(let error) = reopened {
                    if !process.isAlive {
                        trace.add("the router died while opening \(name) (\(error)): starting it again")
                        node.router = nil
                        return try boot(afterFlashLoss: afterFlashLoss)
                    }
                    throw fail("volume \(name) does not open after a restart with the backend back: \(error)")
                }
            }
            trace.add("router started: \(router.volumes.map(\.name.rawValue))")
        case .failure(let error):
            // Killed at an armed failpoint while it recovered: a crash during recovery, recovered from in turn.
            if !process.isAlive {
                trace.add("the router died while starting (\(error)): starting it again")
                node.router = nil
                return try boot(afterFlashLoss: afterFlashLoss)
            }
            throw fail("the router does not start: \(error)")
        }
    }

    /// A new process of `role` on `node` and the environment it runs the engine in.
    func makeProcess(_ name: String, role: String, on node: SimNode) -> (SimProcess, Environment) {
        let process = scheduler.makeProcess("\(name)#\(scheduler.steps)")
        process.role = role
        let env = Environment(
            fs: node.fs, clock: SimClock(scheduler: scheduler), random: SimRandomSource(scheduler: scheduler),
            tasks: SimTaskRunner(process: process), keyValueStores: node.maps)
        return (process, env)
    }

    var router: Router { node.router! }

    /// How the router on `node` reaches the DTL peer (DTL seeds).
    func dtlNetwork(from node: SimNode) -> DTLNetwork? {
        guard let peer = dtlPeer else { return nil }
        var network = DTLNetwork { (_, volume, generation) throws(VDError) -> any DTLConnection in
            peer.connect(volume: volume, generation: generation, from: node)
        }
        network.timeoutSeconds = 2
        network.retrySeconds = 1
        network.choosePeer = { _ in SimDTLPeer.node }
        return network
    }

    /// The DTL link fails, or the peer loses its disk: the owner degrades and catches it up later.
    func dtlFault() {
        guard let peer = dtlPeer, !store.outage else { return }
        if scheduler.chance(0.7) {
            trace.add("DTL: the links to the peer are cut")
            count("dtl-cut")
            peer.cutLinks("the DTL link was cut")
        } else {
            trace.add("DTL: the peer loses its disk")
            count("dtl-peer-disk-lost")
            peer.loseDisk()
        }
    }

    /// Devices of the main node whose mirror is in sync now (sync mode): a loss now keeps every replied write.
    func devicesInSync() -> Set<String> {
        guard dtl, pendingLoss == nil else { return [] }
        var result: Set<String> = []
        for name in devices.keys where !peerDevices.contains(name) {
            if let volume = volume(name), volume.dtlStatus.mode == .sync, volume.dtlStatus.state == .inSync {
                result.insert(name)
            }
        }
        return result
    }
    var routerProcess: SimProcess { node.routerProcess! }

    func createVolume(_ name: String) throws {
        let volumeName = try VolumeName(validating: name)
        let size = config.volumeBytes
        let router = self.router
        let dtl = self.dtl
        let result = try runIn(routerProcess, "create \(name)") { () async throws(VDError) -> Volume in
            let volume = try await router.createVolume(
                named: volumeName, sizeBytes: size, clusterSizeBytes: 4096, backendName: "sim")
            if dtl { try await router.setDTL(of: volume, mode: .sync, peer: SimDTLPeer.node) }
            return volume
        }
        if case .failure(let error) = result { throw fail("cannot create \(name): \(error)") }
        devices[name] = DeviceModel(name: name, sectorCount: Int(size / 512))
        coveredSeq[name] = 0
        trace.add("created \(name)")
    }

    func volume(_ name: String) -> Volume? {
        guard let volumeName = VolumeName(rawValue: name) else { return nil }
        if peerDevices.contains(name) { return peer?.router?.volume(named: volumeName) }
        return node.router?.volume(named: volumeName)
    }

    /// The router process serving `device` (a device, or DEVICE@SNAPSHOT).
    func process(for device: String) -> SimProcess {
        let name = String(device.split(separator: "@").first ?? "")
        return peerDevices.contains(name) ? peer!.routerProcess! : routerProcess
    }

    /// What a crash of the main node means for `device`: nothing for the peer's devices.
    func crashKind(_ kind: CrashKind, of device: String) -> CrashKind {
        peerDevices.contains(device) ? .none : kind
    }

    // MARK: the workload

    func step(_ index: Int) throws {
        // Killed at a failpoint (or during an operation): it restarts as after any crash.
        try recoverFromFailpoint()
        if let until = outageUntilOperation, index >= until {
            store.outage = false
            outageUntilOperation = nil
            trace.add("backend outage ends")
        }
        let roll = scheduler.below(1000)
        switch roll {
        case 0..<330: try startWrite(kind: .data)
        case 330..<360: try startWrite(kind: .zeroes)
        case 360..<390: try startWrite(kind: .trim)
        case 390..<460: try startFlush()
        case 460..<600: try startRead()
        case 600..<640: try startSnapshotCreate()
        case 640..<665: try snapshotDelete()
        case 665..<675: try rollback()
        case 675..<690: if config.clones { try createClone() }
        case 690..<720: if config.scrubs { try startScrub() }
        case 720..<735: if config.scrubs { try runCheck(repair: scheduler.chance(0.3)) }
        case 735..<750: if config.crashes { try crash(.process) }
        case 750..<758: if config.crashes { try crash(.power) }
        case 758..<763: if config.crashes { try drainAndRestoreFromBackend() }
        case 763..<765:
            if config.crashes {
                if ownership && scheduler.chance(0.5) { try takeOverOnAnotherNode() } else { try moveToAnotherNode() }
            }
        case 765..<770: if config.crashes { try crash(.flashLost) }
        case 770..<780: if config.backendFaults { startOutage(index) }
        case 780..<786 where ownership && config.clones: try moveCloneToPeer()
        case 786..<788 where ownership && config.clones && config.crashes: try crashPeer()
        case 788..<794 where dtl: dtlFault()
        case 780..<860: try wait(.milliseconds(Int64(scheduler.between(1...3000))))
        case 860..<875: if config.crashes { armFailpoint() }
        case 875..<890: try checkDiff()
        default: try verifyRandomRange()
        }
        // Let the system run a little between operations.
        let budget = UInt64(scheduler.between(1...400))
        let end = scheduler.steps + budget
        scheduler.run(until: { scheduler.steps >= end || !completions.isEmpty || failure != nil })
        try processCompletions()
    }

    /// Named crash points in the code (`TaskRunner.failpoint`) and the process they are in: one is armed now and then,
    /// so a crash lands inside a multi-step change (a roll, a scrub's application, a snapshot deletion's cleanup), not
    /// only between operations.
    static let failpoints: [(name: String, role: String)] = [
        ("roll-after-next-journal", "router"), ("roll-after-checkpoint", "router"),
        ("map-intermediate-apply", "router"), ("router-scrub-after-entry", "router"),
        ("router-scrub-after-marker", "router"), ("router-scrub-mid-delete", "router"),
        ("drop-dead-history", "router"), ("after-lease", "scrubber"), ("after-replay", "scrubber"),
        ("after-sco-upload", "scrubber"), ("before-result", "scrubber"), ("after-result", "scrubber"),
    ]

    /// Some armed failpoints are a power loss of the whole node at that point rather than a crash of one process:
    /// the killed process writes nothing more, so the power loss taken at the next step keeps exactly what was
    /// durable when it died (plus what other processes synced since, a state a power loss then could also leave).
    func armFailpoint() {
        let (name, role) = Self.failpoints[scheduler.below(Self.failpoints.count)]
        guard scheduler.armedFailpoints[name] == nil else { return }
        scheduler.armedFailpoints[name] = role
        let power = scheduler.chance(0.4)
        if power { powerLossFailpoints.insert(name) } else { powerLossFailpoints.remove(name) }
        trace.add("armed failpoint \(name) (\(role))\(power ? " as a power loss" : "")")
        count("failpoint-armed")
    }

    /// After a failpoint killed a process: the crash the next step recovers from.
    func recoverFromFailpoint() throws {
        if powerLossPending {
            powerLossPending = false
            try crashRecovery(.power)
        } else if let process = node.routerProcess, !process.isAlive {
            try crashRecovery(.process)
        }
    }

    func startOutage(_ index: Int) {
        guard !store.outage else { return }
        // A backend outage while a DTL mirror is degraded holds the volume's writes until the degraded state can be
        // recorded (by design); the workload's synchronous operations cannot wait that out: the two faults do not
        // overlap.
        if dtl, router.volumes.contains(where: { $0.dtlStatus.mode != .none && $0.dtlStatus.state != .inSync }) {
            return
        }
        store.outage = true
        outageUntilOperation = index + scheduler.between(1...20)
        trace.add("backend outage starts")
        count("outage")
    }

    func wait(_ duration: Duration) throws {
        trace.add("wait \(duration)")
        let end = scheduler.now + duration
        scheduler.run(until: { scheduler.now >= end || !completions.isEmpty || failure != nil })
        try processCompletions()
    }

    /// Writable devices that exist (volumes and clones).
    var writableDevices: [String] { devices.keys.sorted().filter { volume($0) != nil } }

    /// A random sector range of `device` that no operation in flight touches.
    func freeRange(_ device: String, maxSectors: Int) -> Range<Int>? {
        guard let model = devices[device] else { return nil }
        for _ in 0..<8 {
            let length: Int
            switch scheduler.below(10) {
            case 0..<6: length = scheduler.between(1...16)
            case 6..<9: length = scheduler.between(1...min(maxSectors, 256))
            default: length = scheduler.between(1...maxSectors)
            }
            // Half the ranges start in a hot first eighth of the device, so operations meet on the same clusters.
            let span = scheduler.chance(0.5) ? max(1, model.sectorCount / 8) : model.sectorCount
            let start = min(scheduler.below(span), model.sectorCount - length)
            let range = start..<(start + length)
            if !inFlight.values.contains(where: { $0.device == device && $0.sectors.overlaps(range) }) { return range }
        }
        return nil
    }

    enum WriteKind { case data, zeroes, trim }

    func startWrite(kind: WriteKind) throws {
        guard inFlight.count < config.inFlightMax else { return }
        let candidates = writableDevices.filter { !frozen.contains($0) }
        guard !candidates.isEmpty else { return }
        let device = candidates[scheduler.below(candidates.count)]
        guard let range = freeRange(device, maxSectors: 2048) else { return }
        try startWrite(kind: kind, device: device, range: range, fua: scheduler.chance(0.1))
    }

    /// Starts a write (or zeroing, or trim) of `range` of `device`; returns the operation's id.
    @discardableResult
    func startWrite(kind: WriteKind, device: String, range: Range<Int>, fua: Bool) throws -> Int {
        guard let target = volume(device) else { throw fail("no device \(device) to write") }
        let offset = UInt64(range.lowerBound) * 512
        let length = range.count * 512
        // What each sector will hold once the operation is done.
        var values: [Int: UInt32] = [:]
        let id: UInt32
        switch kind {
        case .data:
            id = nextWriteID
            nextWriteID += 1
            for sector in range { values[sector] = id }
        case .zeroes:
            id = 0
            for sector in range { values[sector] = 0 }
        case .trim:
            id = 0
            // Whole clusters inside the range read as zeroes; partial clusters keep their contents.
            let perCluster = clusterBytes / 512
            let first = (range.lowerBound + perCluster - 1) / perCluster * perCluster
            let end = range.upperBound / perCluster * perCluster
            if first < end { for sector in first..<end { values[sector] = 0 } }
        }
        for (sector, value) in values { devices[device]!.inFlight[sector] = value }
        var buffer = ByteBuffer()
        if kind == .data {
            buffer = ByteBufferAllocator().buffer(capacity: length)
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
                for (index, sector) in range.enumerated() {
                    SectorPattern.fill(
                        UnsafeMutableRawBufferPointer(rebasing: raw[(index * 512)..<((index + 1) * 512)]), id: id,
                        sector: UInt64(sector))
                }
                return length
            }
        }
        let name = kind == .data ? "write" : (kind == .zeroes ? "zeroes" : "trim")
        trace.add("\(name) \(device) sectors \(range.lowerBound)+\(range.count)\(fua ? " FUA" : "") id \(id)")
        count(name)
        let payload = buffer
        let mayUnmap = scheduler.chance(0.7)
        return start(
            kind: name, device: device, sectors: range,
            { () async throws(VDError) -> OpOutput in
                switch kind {
                case .data: try await target.write(offset: offset, data: payload, fua: fua)
                case .zeroes:
                    try await target.writeZeroes(offset: offset, length: UInt32(length), fua: fua, mayUnmap: mayUnmap)
                case .trim: try await target.trim(offset: offset, length: UInt32(length), fua: fua)
                }
                return .none
            }
        ) { simulation, operation, result in
            switch result {
            case .success:
                let reply = simulation.nextReply()
                let epoch = target.openEpoch
                for (sector, value) in values.sorted(by: { $0.key < $1.key }) {
                    simulation.devices[device]?.replied(
                        sector,
                        SectorWrite(
                            id: value, replySeq: reply, issueSeq: operation.issueSeq, epochAtReply: epoch,
                            durable: fua))
                }
                // FUA makes this write durable; the sync behind it also covers every write replied before it was
                // issued (they are before it in the journal), not those replied while it waited.
                if fua { simulation.coveredSeq[device] = max(simulation.coveredSeq[device] ?? 0, operation.issueSeq) }
            case .failure(let error):
                // In flight at a crash: the sectors stay ambiguous until the restart reads them.
                if error.message.contains("connection to") { return }
                if error.code == .backend && (simulation.store.outage || simulation.store.injectedFaults > 0) {
                    // A partial cluster whose data only the backend holds cannot be merged while it is away: the
                    // write fails before anything reaches the journal.
                    simulation.trace.add("\(name) on \(device) failed while the backend misbehaved: \(error)")
                    // A data write fails before anything is written; zeroing may have done its first partial
                    // cluster: those sectors stay undecided until read.
                    if kind == .data {
                        for sector in values.keys { simulation.devices[device]?.inFlight[sector] = nil }
                    }
                    return
                }
                if simulation.config.tolerateErrors {
                    simulation.trace.add(
                        "\(name) on \(device) sectors \(range) failed (expected by the script): \(error)")
                    return
                }
                throw simulation.fail("\(name) on \(device) sectors \(range) failed: \(error)")
            }
        }
    }

    func nextReply() -> UInt64 {
        events += 1
        return events
    }

    func nextIssue() -> UInt64 {
        events += 1
        return events
    }

    /// Starts an operation in the client process; `apply` runs when its reply arrives. Returns its id.
    @discardableResult
    func start(
        kind: String, device: String, sectors: Range<Int>,
        _ body: @escaping @Sendable () async throws(VDError) -> OpOutput,
        apply: @escaping (Simulation, InFlight, Result<OpOutput, VDError>) throws -> Void
    ) -> Int {
        let issued = nextIssue()
        nextOpID += 1
        let id = nextOpID
        inFlight[id] = InFlight(
            kind: kind, device: device, sectors: sectors, issueSeq: issued, replyCounterAtIssue: issued,
            faultsAtIssue: store.injectedFaults, apply: apply)
        let router = process(for: device)
        client.spawn { [self] in
            let result: Result<OpOutput, VDError>
            do throws(VDError) {
                result = .success(try await router.call(body))
            } catch {
                result = .failure(error)
            }
            completions.append((id, result))
        }
        return id
    }

    /// Waits until operation `id` completed (and its reply was checked).
    func waitFor(_ id: Int) throws {
        try runUntil("operation \(id)") { !completions.isEmpty || inFlight[id] == nil }
        try processCompletions()
        if inFlight[id] != nil { try waitFor(id) }
    }

    func processCompletions() throws {
        while !completions.isEmpty {
            let (id, result) = completions.removeFirst()
            guard let operation = inFlight[id] else { continue }
            try operation.apply(self, operation, result)
            inFlight[id] = nil
        }
        if let failure { throw failure }
    }

    /// Waits until nothing is in flight.
    func quiesce(_ device: String? = nil) throws {
        try runUntil("quiesce") {
            !completions.isEmpty || !inFlight.values.contains { device == nil || $0.device == device }
        }
        try processCompletions()
        if !inFlight.values.contains(where: { device == nil || $0.device == device }) { return }
        try quiesce(device)
    }

    func startFlush() throws {
        let candidates = writableDevices
        guard !candidates.isEmpty, inFlight.count < config.inFlightMax else { return }
        try startFlush(candidates[scheduler.below(candidates.count)])
    }

    @discardableResult
    func startFlush(_ device: String) throws -> Int {
        guard let target = volume(device) else { throw fail("no device \(device) to flush") }
        trace.add("flush \(device)")
        count("flush")
        let coverable = events
        return start(
            kind: "flush", device: device, sectors: 0..<0,
            { () async throws(VDError) -> OpOutput in
                try await target.flush()
                return .none
            }
        ) { simulation, operation, result in
            switch result {
            case .success: simulation.coveredSeq[device] = max(simulation.coveredSeq[device] ?? 0, coverable)
            case .failure(let error):
                if error.message.contains("connection to") { return }
                throw simulation.fail("flush of \(device) failed: \(error)")
            }
        }
    }

    // MARK: reads

    func startRead() throws {
        guard inFlight.count < config.inFlightMax else { return }
        var targets: [(String, any BlockDevice)] = writableDevices.compactMap { name in
            volume(name).map { (name, $0 as any BlockDevice) }
        }
        for (key, snapshot) in snapshots.sorted(by: { $0.key < $1.key }) where snapshot.confirmed && !snapshot.deleted {
            if let parent = volume(snapshot.volume), let record = parent.snapshotTable.snapshot(named: snapshot.name) {
                targets.append((key, SnapshotView(volume: parent, snapshot: record)))
            }
        }
        guard !targets.isEmpty else { return }
        let (device, target) = targets[scheduler.below(targets.count)]
        let sectorCount = Int(config.volumeBytes / 512)
        let length = scheduler.between(1...min(2048, sectorCount))
        let first = scheduler.below(sectorCount - length + 1)
        let range = first..<(first + length)
        if devices[device] != nil,
            inFlight.values.contains(where: { $0.device == device && $0.sectors.overlaps(range) })
        {
            return
        }
        trace.add("read \(device) sectors \(first)+\(length)")
        count("read")
        start(
            kind: "read", device: device, sectors: range,
            { () async throws(VDError) -> OpOutput in
                .data(try await target.read(offset: UInt64(first) * 512, length: UInt32(length * 512)))
            }
        ) { simulation, operation, result in
            switch result {
            case .success(.data(let bytes)):
                try simulation.checkRead(device, range: range, bytes: bytes)
            case .success: break
            case .failure(let error):
                if error.message.contains("connection to") { return }
                // A snapshot deleted (or rolled past) while the read was in flight: a clean error is right.
                if simulation.devices[device] == nil, error.code == .notFound,
                    simulation.snapshots[device].map({ $0.deleted || !$0.confirmed }) ?? true
                {
                    simulation.trace.add("read of \(device) ended with the snapshot's deletion: \(error)")
                    return
                }
                if simulation.store.outage
                    || simulation.store.injectedFaults > 0
                        && (error.code == .backend || error.code == .corrupt || error.code == .timeout)
                {
                    simulation.trace.add("read of \(device) failed while the backend misbehaved: \(error)")
                    return
                }
                throw simulation.fail("read of \(device) sectors \(range) failed: \(error)")
            }
        }
    }

    /// Checks read bytes against the model (devices: current contents; snapshots: frozen contents).
    func checkRead(_ device: String, range: Range<Int>, bytes: ByteBuffer) throws {
        guard bytes.readableBytes == range.count * 512 else {
            throw fail("read of \(device) returned \(bytes.readableBytes) bytes for \(range.count) sectors")
        }
        var mismatches: [String] = []
        bytes.withUnsafeReadableBytes { raw in
            for (index, sector) in range.enumerated() {
                let observed = SectorPattern.identify(
                    UnsafeRawBufferPointer(rebasing: raw[(index * 512)..<((index + 1) * 512)]), sector: UInt64(sector))
                var allowed: Set<UInt32>
                if let model = devices[device] {
                    allowed = [model.current(sector)]
                    // Undecided by a failed operation (none in flight overlaps a read): either value.
                    if let undecided = model.inFlight[sector] {
                        allowed.insert(undecided)
                        if let observed, allowed.contains(observed) {
                            devices[device]!.inFlight[sector] = nil
                            if observed == undecided && observed != model.current(sector) {
                                devices[device]!.replied(
                                    sector,
                                    SectorWrite(
                                        id: observed, replySeq: events, issueSeq: 0,
                                        epochAtReply: volume(device)?.openEpoch ?? 0))
                            }
                            continue
                        }
                    }
                } else if let snapshot = snapshots[device] {
                    allowed = snapshot.allowed(sector)
                } else {
                    return
                }
                if let observed, allowed.contains(observed) {
                    if snapshots[device] != nil && allowed.count > 1 { snapshots[device]!.resolve(sector, observed) }
                    continue
                }
                if mismatches.count < 8 {
                    mismatches.append(
                        "sector \(sector) (cluster \(sector / 8)): read \(observed.map { "write \($0)" } ?? "garbage"), expected \(allowed.sorted())"
                    )
                }
            }
        }
        if !mismatches.isEmpty {
            throw fail("\(device) reads wrong data: \(mismatches.joined(separator: "; "))")
        }
    }

    func verifyRandomRange() throws {
        try startRead()
    }

    /// Incremental backup: the diff between two snapshots of one volume must cover every sector whose content the
    /// model knows changed, and every extent it calls zero must read zeroes in the newer snapshot (so a copy of the
    /// older plus the increment is the newer, exactly).
    func checkDiff() throws {
        let keys = liveSnapshots()
        guard keys.count >= 2 else { return }
        let older = snapshots[keys[scheduler.below(keys.count)]]!
        let newer = liveSnapshots(of: older.volume).map { snapshots[$0]! }.filter { $0.epoch > older.epoch }
        guard !newer.isEmpty, let target = volume(older.volume) else { return }
        let to = newer[scheduler.below(newer.count)]
        let (fromEpoch, toEpoch) = (older.epoch, to.epoch)
        trace.add("diff \(older.volume) \(older.name) -> \(to.name)")
        count("diff")
        let process = process(for: older.volume)
        let result = try runIn(client, "diff") { () async throws(VDError) -> [DiffExtent] in
            try await process.call { () async throws(VDError) -> [DiffExtent] in
                try await target.diff(from: .epoch(fromEpoch), to: toEpoch)
            }
        }
        switch result {
        case .success(let extents):
            var covered = [Bool](repeating: false, count: older.contents.count)
            for extent in extents {
                let sectors = Int(extent.offset / 512)..<Int((extent.offset + extent.length) / 512)
                for sector in sectors where sector < covered.count {
                    covered[sector] = true
                    if extent.zero, !to.allowed(sector).contains(0) {
                        throw fail(
                            "diff \(older.name) -> \(to.name) of \(older.volume) calls sector \(sector) zero; it holds \(to.allowed(sector))"
                        )
                    }
                }
            }
            for sector in 0..<covered.count where !covered[sector] {
                let before = older.allowed(sector)
                let after = to.allowed(sector)
                if before.count == 1 && after.count == 1 && before != after {
                    throw fail(
                        "diff \(older.name) -> \(to.name) of \(older.volume) misses sector \(sector) (\(before) -> \(after))"
                    )
                }
            }
        case .failure(let error):
            if error.message.contains("connection to") { return }
            if store.outage || store.injectedFaults > 0 { return }  // TLogs may come from the backend
            if error.code == .notFound { return }  // a snapshot deleted meanwhile
            throw fail("diff of \(older.volume) failed: \(error)")
        }
    }

    // MARK: snapshots and clones

    func startSnapshotCreate() throws {
        let candidates = writableDevices.filter { !frozen.contains($0) }
        guard !candidates.isEmpty, inFlight.count < config.inFlightMax else { return }
        snapshotCounter += 1
        try startSnapshotCreate(candidates[scheduler.below(candidates.count)], name: "s\(snapshotCounter)")
    }

    @discardableResult
    func startSnapshotCreate(_ device: String, name: String) throws -> Int {
        guard let target = volume(device), let model = devices[device] else {
            throw fail("no device \(device) to snapshot")
        }
        let key = "\(device)@\(name)"
        var ambiguous: [Int: Set<UInt32>] = [:]
        for (sector, value) in model.inFlight { ambiguous[sector] = [model.current(sector), value] }
        snapshots[key] = SnapshotModel(
            volume: device, name: name, contents: model.currentContents, ambiguous: ambiguous)
        frozen.insert(device)
        trace.add("snapshot create \(key) (\(ambiguous.count) sector(s) in flight)")
        count("snapshot")
        let coverable = events
        return start(
            kind: "snapshot", device: device, sectors: 0..<0,
            { () async throws(VDError) -> OpOutput in
                .snapshot(try await target.createSnapshot(named: name))
            }
        ) { simulation, operation, result in
            simulation.frozen.remove(device)
            switch result {
            case .success(.snapshot(let record)):
                simulation.snapshots[key]?.confirmed = true
                simulation.snapshots[key]?.epoch = record.epoch
                simulation.coveredSeq[device] = max(simulation.coveredSeq[device] ?? 0, coverable)
                simulation.trace.add("snapshot \(key) is epoch \(record.epoch)")
            case .success: break
            case .failure(let error):
                if error.message.contains("connection to") { return }  // decided after the restart
                simulation.snapshots[key] = nil
                if simulation.config.tolerateErrors {
                    simulation.trace.add("snapshot \(key) failed (expected by the script): \(error)")
                    return
                }
                throw simulation.fail("snapshot \(key) failed: \(error)")
            }
        }
    }

    func liveSnapshots(of device: String? = nil) -> [String] {
        snapshots.keys.sorted().filter { key in
            let snapshot = snapshots[key]!
            return snapshot.confirmed && !snapshot.deleted && (device == nil || snapshot.volume == device)
        }
    }

    func snapshotDelete() throws {
        let keys = liveSnapshots()
        guard !keys.isEmpty else { return }
        try snapshotDelete(keys[scheduler.below(keys.count)])
    }

    func snapshotDelete(_ key: String) throws {
        guard let snapshot = snapshots[key] else { throw fail("no snapshot \(key)") }
        guard let target = volume(snapshot.volume) else { return }
        let clones = target.snapshotTable.snapshot(named: snapshot.name)?.clones ?? []
        trace.add("snapshot delete \(key)")
        count("snapshot-delete")
        let name = snapshot.name
        let process = process(for: snapshot.volume)
        let result = try runIn(client, "snapshot delete") { () async throws(VDError) -> Void in
            try await process.call { () async throws(VDError) in try target.deleteSnapshot(named: name) }
        }
        switch result {
        case .success:
            if !clones.isEmpty { throw fail("snapshot \(key) was deleted although clones \(clones) read through it") }
            snapshots[key]?.deleted = true
        case .failure(let error):
            if error.code == .busy && !clones.isEmpty { return }
            if error.message.contains("connection to") { return }
            throw fail("snapshot delete \(key) failed: \(error)")
        }
    }

    func rollback() throws {
        let keys = liveSnapshots().filter { !frozen.contains(snapshots[$0]!.volume) }
        guard !keys.isEmpty else { return }
        try rollback(keys[scheduler.below(keys.count)])
    }

    func rollback(_ key: String) throws {
        guard let snapshot = snapshots[key] else { throw fail("no snapshot \(key)") }
        let device = snapshot.volume
        frozen.insert(device)
        defer { frozen.remove(device) }
        try quiesce(device)
        guard let target = volume(device) else { return }
        // The snapshot's ambiguous sectors must be known before the volume takes its contents.
        try verifySnapshot(key)
        trace.add("rollback \(device) to \(snapshot.name)")
        count("rollback")
        let name = snapshot.name
        let later = liveSnapshots(of: device).filter { snapshots[$0]!.epoch > snapshot.epoch }
        let blocked = later.contains {
            target.snapshotTable.snapshot(named: snapshots[$0]!.name)?.clones.isEmpty == false
        }
        let issued = nextIssue()
        let process = process(for: device)
        let result = try runIn(client, "rollback") { () async throws(VDError) -> SnapshotRecord in
            try await process.call { () async throws(VDError) -> SnapshotRecord in
                try await target.rollback(toSnapshot: name)
            }
        }
        switch result {
        case .success:
            if blocked { throw fail("rollback of \(device) deleted snapshots that clones read through") }
            let reply = nextReply()
            let epoch = target.openEpoch
            let contents = snapshots[key]!.contents
            for sector in 0..<contents.count where devices[device]!.current(sector) != contents[sector] {
                devices[device]!.replied(
                    sector, SectorWrite(id: contents[sector], replySeq: reply, issueSeq: issued, epochAtReply: epoch))
            }
            coveredSeq[device] = reply
            for gone in later { snapshots[gone]?.deleted = true }
        case .failure(let error):
            if error.code == .busy && blocked { return }
            if error.message.contains("connection to") {
                // The router died during the rollback: every sector may hold its value or the snapshot's.
                let contents = snapshots[key]!.contents
                for sector in 0..<contents.count where devices[device]!.current(sector) != contents[sector] {
                    devices[device]!.inFlight[sector] = contents[sector]
                }
                // The table drops the later snapshots before the journal entry lands: a rollback cut short may have
                // deleted them (what is left must still read exactly right).
                for gone in later { snapshots[gone]?.confirmed = false }
                return
            }
            throw fail("rollback of \(device) failed: \(error)")
        }
    }

    func createClone() throws {
        guard cloneCounter < 4 else { return }
        let keys = liveSnapshots()
        guard !keys.isEmpty else { return }
        let key = keys[scheduler.below(keys.count)]
        let snapshot = snapshots[key]!
        try verifySnapshot(key)
        guard let contents = snapshots[key]?.contents else { return }
        cloneCounter += 1
        let name = "c\(cloneCounter)"
        trace.add("clone create \(name) of \(key)")
        count("clone")
        let router = self.router
        let cloneName = try VolumeName(validating: name)
        let parentName = try VolumeName(validating: snapshot.volume)
        let snapshotName = snapshot.name
        let result = try runIn(client, "clone") { () async throws(VDError) -> Void in
            _ = try await self.routerProcess.call { () async throws(VDError) -> Bool in
                _ = try await router.createClone(named: cloneName, of: parentName, snapshot: snapshotName)
                return true
            }
        }
        switch result {
        case .success:
            devices[name] = DeviceModel(name: name, sectorCount: contents.count, initial: contents)
            coveredSeq[name] = 0
        case .failure(let error):
            if error.message.contains("connection to") || error.code == .backend { return }
            if peerDevices.contains(snapshot.volume) && [.busy, .timeout].contains(error.code) {
                // A parent on the peer: its snapshot is not on the backend yet, or its table did not get there in
                // time (the peer keeps the registration: a snapshot it protects, with no clone).
                trace.add("clone \(name) of \(key) (on the peer) not created: \(error)")
                return
            }
            throw fail("clone \(name) of \(key) failed: \(error)")
        }
    }

    // MARK: scrubbing and checking

    func startScrub() throws {
        let names = writableDevices
        guard !names.isEmpty else { return }
        let killAfter: UInt64? = scheduler.chance(0.3) ? UInt64(scheduler.between(1...3000)) : nil
        try startScrub(
            names[scheduler.below(names.count)], threshold: scheduler.chance(0.5) ? 0.9 : 0.5, killAfter: killAfter)
    }

    /// Starts `vd scrub` of `device` in a process of its own (killed after `killAfter` steps); returns the process.
    @discardableResult
    func startScrub(_ device: String, threshold: Double, killAfter: UInt64?) throws -> SimProcess {
        let (process, env) = makeProcess("scrubber", role: "scrubber", on: node)
        scrubbers.append(process)
        var options = ScrubOptions()
        options.liveFractionThreshold = threshold
        options.scoSizeBytes = config.scoBytes
        options.compress = compress
        options.leaseSeconds = 30
        options.workDirectory = node.dataDirectory + "/scrub-tmp"
        let scrubber = Scrubber(
            volume: try VolumeName(validating: device), backend: store, options: options, env: env, logger: logger)
        trace.add("scrub \(device) in \(process.name)\(killAfter.map { " (killed after \($0) steps)" } ?? "")")
        count("scrub")
        let trace = self.trace
        process.spawn { [self] in
            do throws(VDError) {
                let summary = try await scrubber.run()
                trace.add(
                    "scrub of \(device) done: \(summary.rewrittenSCOs) SCO(s) rewritten, result \(summary.resultID.map(String.init) ?? "none")\(summary.stoppedBecause.map { " (\($0))" } ?? "")"
                )
            } catch {
                trace.add("scrub of \(device) failed: \(error)")
                scrubErrors[process.id] = error
            }
            scrubsFinished.insert(process.id)
        }
        if let killAfter {
            let end = scheduler.steps + killAfter
            scheduler.run(until: { scheduler.steps >= end || failure != nil })
            if process.isAlive {
                process.kill()
                trace.add("scrubber \(process.name) killed")
            }
        }
        return process
    }

    func runCheck(repair: Bool) throws {
        guard !store.outage else { return }
        let names = devices.keys.sorted()
        guard !names.isEmpty else { return }
        try runCheck(names[scheduler.below(names.count)], repair: repair)
    }

    func runCheck(_ device: String, repair: Bool) throws {
        let (process, env) = makeProcess("check", role: "check", on: node)
        var checker = NamespaceCheck()
        checker.repair = repair
        checker.workDirectory = node.dataDirectory + "/check-tmp"
        let check = checker
        let store = self.store
        let volumeName = try VolumeName(validating: device)
        trace.add("check\(repair ? " --repair" : "") \(device)")
        count(repair ? "check-repair" : "check")
        let result = try runIn(process, "check") { () async throws(VDError) -> CheckReport in
            try await check.run(volume: volumeName, backend: store, env: env) { _ in }
        }
        switch result {
        case .success(let report):
            if !report.problems.isEmpty {
                throw fail("check of \(device): \(report.problems.joined(separator: "; "))")
            }
            if !report.removedOrphans.isEmpty { trace.add("check removed \(report.removedOrphans)") }
        case .failure(let error):
            trace.add("check of \(device) could not run: \(error)")
        }
    }

    // MARK: crashes

    enum CrashKind: String {
        case none, process, power, flashLost, drained
    }

    func crash(_ kind: CrashKind) throws {
        trace.add("CRASH: \(kind.rawValue)")
        count("crash-\(kind.rawValue)")
        try crashRecovery(kind)
    }

    /// Stored-through epoch of every volume (what a restart from the backend can count on).
    func storedEpochs() -> [String: UInt64] {
        var result: [String: UInt64] = [:]
        for name in devices.keys {
            if let volume = volume(name) { result[name] = volume.uploadStatus.storedThrough.rawValue }
        }
        return result
    }

    func crashRecovery(_ requested: CrashKind) throws {
        var kind = requested
        if powerLossPending {
            // A failpoint standing for a power loss fired since: this crash is that power loss.
            powerLossPending = false
            if kind == .process { kind = .power }
        }
        // The peer does not crash: what it has in flight finishes first (its replies are checked as usual).
        for device in peerDevices.sorted() { try quiesce(device) }
        let stored = storedEpochs()
        let inSync = kind == .flashLost ? devicesInSync() : []
        routerProcess.kill()
        if kind == .power || kind == .flashLost {
            for scrubber in scrubbers { scrubber.kill() }
        }
        // Let the client see its lost connections.
        scheduler.run(until: { !scheduler.hasReadyJobs })
        try processCompletions()
        switch kind {
        case .power:
            node.fs.powerLoss()
            node.maps.powerLoss()
        case .flashLost:
            node.fs.wipe(node.flashDirectory)
            node.maps.forget(prefix: node.flashDirectory)
        default:
            break
        }
        for id in inFlight.keys.sorted() { inFlight[id] = nil }
        frozen = []
        node.router = nil
        var verifyKind = kind
        var verifyStored = stored
        if let pending = pendingLoss, Self.rank(pending.kind) >= Self.rank(kind) {
            trace.add("the \(pending.kind.rawValue) before this crash was not verified yet: verifying as that")
            verifyKind = pending.kind
            verifyStored = pending.stored.merging(stored) { min($0, $1) }
        }
        dtlProtected = verifyKind == .flashLost && pendingLoss == nil ? inSync : []
        if !dtlProtected.isEmpty {
            trace.add("DTL in sync at the loss: \(dtlProtected.sorted()) keep every replied write")
            count("flash-lost-dtl-in-sync")
        }
        try boot(afterFlashLoss: verifyKind == .flashLost)
        try verifyAfterLoss(verifyKind, stored: verifyStored)
    }

    static func rank(_ kind: CrashKind) -> Int {
        switch kind {
        case .none, .drained: 0
        case .process: 1
        case .power: 2
        case .flashLost: 3
        }
    }

    /// Verifies after a loss, remembering it until the model adopted what survived.
    func verifyAfterLoss(_ kind: CrashKind, stored: [String: UInt64]) throws {
        if Self.rank(kind) >= 2 { pendingLoss = (kind, stored) }
        try verifyEverything(after: kind, stored: stored)
        pendingLoss = nil
        dtlProtected = []
    }

    /// A clean stop (drain), then the local flash is lost, then a restart from the backend alone.
    func drainAndRestoreFromBackend() throws {
        trace.add("drain, lose the local flash, restore from the backend")
        count("restore")
        try quiesce()
        let router = self.router
        let result = try runIn(routerProcess, "drain") { () async throws(VDError) -> Bool in
            let results = await router.stop(drainTimeoutSeconds: 60)
            return results.allSatisfy { $0.1.drained }
        }
        routerProcess.kill()
        node.router = nil
        guard case .success(true) = result else {
            trace.add("the drain did not finish (backend down?): restarting with the local flash")
            try boot()
            try verifyEverything(after: .process, stored: [:])
            return
        }
        for name in devices.keys { devices[name]!.allStored() }
        node.fs.wipe(node.flashDirectory)
        node.maps.forget(prefix: node.flashDirectory)
        try boot()
        try verifyEverything(after: .drained, stored: [:])
    }

    /// A clean stop (drain), then every volume attached from the backend on another node, which serves them from
    /// then on (`vd volume attach` on a fresh machine).
    func moveToAnotherNode() throws {
        trace.add("drain, then attach every volume on another node")
        count("move")
        try quiesce()
        let router = self.router
        let result = try runIn(routerProcess, "drain") { () async throws(VDError) -> (Bool, Bool) in
            let results = await router.stop(drainTimeoutSeconds: 60)
            return (results.allSatisfy { $0.1.drained }, results.allSatisfy { $0.1.released })
        }
        routerProcess.kill()
        node.router = nil
        guard case .success(let (drained, released)) = result, drained else {
            trace.add("the drain did not finish (backend down?): restarting where it was")
            try boot()
            try verifyEverything(after: .process, stored: [:])
            return
        }
        for scrubber in scrubbers { scrubber.kill() }
        // Attaching reads the namespaces: the operator waits for the backend.
        if store.outage {
            store.outage = false
            outageUntilOperation = nil
            trace.add("backend outage ends (to attach)")
        }
        let (next, ordered) = try attachEverything(
            of: try VolumeRegistry.list(dataDirectory: node.dataDirectory, fs: node.fs)
        ) { [store] _ in store }
        node = next
        for name in devices.keys { devices[name]!.allStored() }
        if ownership && !released {
            // The release did not reach the backend: the new node waits the leases out (`vd volume takeover`).
            trace.add("not every owner record was released: \(next.name) takes the volumes over")
            _ = try takeOverAll(on: next, ordered, store: link(next))
        } else {
            try boot()
        }
        try verifyEverything(after: .drained, stored: [:])
    }

    static let leaseSeconds = 3600.0

    // MARK: clones across owners

    /// How a router asks the owner of a clone's parent to record or forget the clone (the cluster API in `vd
    /// serve`): the owner records it and waits until its table is on the backend. `owner` finds the node at call time.
    func cloneRegistrar(toward owner: @escaping @Sendable (Simulation) -> SimNode?) -> Router.RemoteCloneRegistrar {
        { [self] (parent, snapshot, epoch, clone, present, _) async throws(VDError) in
            guard let node = owner(self), let router = node.router, let process = node.routerProcess,
                let target = router.volume(named: parent)
            else { throw VDError(.notFound, "no router serves \(parent)") }
            try await process.call { () async throws(VDError) in
                if present, let epoch, target.snapshotTable.snapshot(named: snapshot)?.epoch != epoch {
                    throw VDError(.notFound, "\(parent) has no snapshot \(snapshot) at epoch \(epoch)")
                }
                try target.setClone(clone.rawValue, ofSnapshot: snapshot, present: present)
                let through = present ? target.snapshotTable.snapshot(named: snapshot)?.epoch ?? 0 : 0
                guard await target.waitUntilStored(through: through, timeoutSeconds: 60) else {
                    throw VDError(.timeout, "\(parent)@\(snapshot) and its table did not reach the backend")
                }
            }
        }
    }

    /// The peer router, started on first use.
    func bootPeer() throws -> SimNode {
        if let peer, peer.router != nil { return peer }
        let peer = self.peer ?? SimNode(name: "peer", scheduler: scheduler)
        self.peer = peer
        let (process, env) = makeProcess("peer-router", role: "peer-router", on: peer)
        peer.routerProcess = process
        let configuration = routerConfiguration(for: peer)
        let backends = SimBackends(store: link(peer), compress: compress)
        let logger = self.logger
        let registrar = cloneRegistrar(toward: { $0.node })
        let started = try runIn(process, "peer router start") {
            () async throws(VDError) -> (Router, [(VolumeName, VDError)]) in
            let router = try Router(configuration: configuration, backends: backends, logger: logger, environment: env)
            router.remoteCloneRegistrar = registrar
            return (router, await router.openAll { _ in })
        }
        guard case .success(let (router, failures)) = started else {
            throw fail("the peer router does not start: \(started)")
        }
        peer.router = router
        for (name, error) in failures {
            // A backend that is down or failing when the peer starts: the volume opens once it answers.
            guard error.code == .backend else { throw fail("the peer's \(name) does not open: \(error)") }
            if store.outage {
                store.outage = false
                outageUntilOperation = nil
                trace.add("backend outage ends (to open \(name) on the peer)")
            }
            var attempts = 0
            while true {
                attempts += 1
                let opened = try runIn(process, "peer opens \(name)") { () async throws(VDError) -> Bool in
                    _ = try await router.openVolume(named: name)
                    return true
                }
                guard case .failure(let again) = opened else { break }
                if again.code == .backend && attempts < 10 { continue }
                throw fail("the peer's \(name) does not open with the backend back: \(again)")
            }
        }
        return peer
    }

    /// The peer router is killed (or its node loses power) and starts again: its clones open through new views of
    /// their parents and must read what the crash allows (the main node is not affected).
    func crashPeer() throws {
        guard let peer, peer.routerProcess != nil, !peerDevices.isEmpty else { return }
        let power = scheduler.chance(0.5)
        trace.add("CRASH of the peer router: \(power ? "power" : "process")")
        count("crash-peer")
        for device in peerDevices.sorted() { try quiesce(device) }
        var stored: [String: UInt64] = [:]
        for name in peerDevices { stored[name] = volume(name)?.uploadStatus.storedThrough.rawValue }
        peer.routerProcess?.kill()
        scheduler.run(until: { !scheduler.hasReadyJobs })
        try processCompletions()
        if power {
            peer.fs.powerLoss()
            peer.maps.powerLoss()
        }
        peer.router = nil
        _ = try bootPeer()
        for name in peerDevices.sorted() {
            guard let moved = volume(name) else { throw fail("\(name) is not served by the peer after its restart") }
            try accept(
                name, observed: try readWhole(name, moved), after: power ? .power : .process, stored: stored[name])
        }
    }

    /// `vd volume move CLONE --to peer` for a clone no other device of the main node reads through: the parent's
    /// snapshot and table reach the backend, the clone is drained and released to the peer, which serves it from
    /// then on, reading its parent through a backend view while the parent's owner goes on (scrubs, crashes,
    /// moves, takeovers). An operator's move: no failpoint fires during it.
    func moveCloneToPeer() throws {
        let registrations = try VolumeRegistry.list(dataDirectory: node.dataDirectory, fs: node.fs)
        let parents = Set(registrations.compactMap { $0.config.parent?.volume.rawValue })
        let candidates = registrations.filter { registration in
            let name = registration.config.name.rawValue
            return registration.config.parent != nil && !parents.contains(name) && devices[name] != nil
                && !frozen.contains(name) && volume(name) != nil
        }.map(\.config.name.rawValue)
        guard !candidates.isEmpty else { return }
        let name = candidates[scheduler.below(candidates.count)]
        try quiesce()
        guard let clone = volume(name), let parentLink = clone.config.parent else { return }
        trace.add("move clone \(name) (of \(parentLink.volume)@\(parentLink.snapshot)) to the peer router")
        count("clone-move")
        let armed = scheduler.armedFailpoints
        scheduler.armedFailpoints = [:]
        defer { scheduler.armedFailpoints.merge(armed) { kept, _ in kept } }
        if store.outage {
            store.outage = false
            outageUntilOperation = nil
            trace.add("backend outage ends (to move \(name))")
        }
        let peer = try bootPeer()
        let router = self.router
        let (fs, dataDirectory, flash, peerName) = (node.fs, node.dataDirectory, node.flashDirectory, peer.name)
        let random = SimRandomSource(scheduler: scheduler)
        let released = try runIn(routerProcess, "move \(name) away") { () async throws(VDError) -> Bool in
            if let parent = clone.parent?.source as? Volume {
                guard await parent.waitUntilStored(through: parentLink.epoch, timeoutSeconds: 120) else {
                    return false
                }
            }
            guard let closed = await router.closeVolume(clone.name, drainTimeoutSeconds: 60, releaseTo: peerName)
            else { return false }
            guard closed.released else {
                _ = try await router.openVolume(named: clone.name, retakingOwnRelease: true)
                return false
            }
            try VolumeRegistry.remove(dataDirectory: dataDirectory, name: clone.name, fs: fs)
            let path = flash + "/" + clone.name.rawValue
            if fs.fileExists(path) { try fs.rename(path, path + ".moved-to-\(peerName)-" + random.hexToken()) }
            return true
        }
        switch released {
        case .failure(let error): throw fail("moving \(name) to the peer failed on the main router: \(error)")
        case .success(false):
            trace.add("\(name) stays (its parent's snapshot or its own data did not reach the backend in time)")
            return
        case .success(true): break
        }
        let peerRouter = peer.router!
        let peerStore = link(peer)
        var attempts = 0
        while true {
            attempts += 1
            let taken = try runIn(peer.routerProcess!, "peer takes \(name)") { () async throws(VDError) -> Bool in
                if try VolumeRegistry.read(dataDirectory: peer.dataDirectory, name: clone.name, fs: peer.fs) == nil {
                    _ = try await VolumeAdministration.attach(
                        dataDirectory: peer.dataDirectory, flashDirectory: peer.flashDirectory, fs: peer.fs,
                        random: random, name: clone.name, backendName: "sim", backend: peerStore)
                }
                _ = try await peerRouter.openVolume(named: clone.name)
                return true
            }
            if case .failure(let error) = taken {
                // Injected backend faults: try again, as an operator would.
                if error.code == .backend && attempts < 10 { continue }
                throw fail("the peer cannot take \(name): \(error)")
            }
            break
        }
        peerDevices.insert(name)
        devices[name]!.allStored()
        trace.add("the peer serves \(name)")
        // The moved clone reads exactly what it held (drained). Only it: a verification adopts what it reads as
        // durable, and the main node's devices were not flushed by this move.
        guard let moved = volume(name) else { throw fail("the peer does not serve \(name)") }
        try accept(name, observed: try readWhole(name, moved), after: .drained, stored: nil)
    }

    /// The node's link to the store (cut to partition it; without ownership, the store itself).
    func link(_ node: SimNode) -> any ObjectStore {
        guard ownership else { return store }
        if let existing = links[node.name] { return existing }
        let link = PartitionedStore(store, scheduler: scheduler)
        links[node.name] = link
        return link
    }

    /// The router is cut off from the backend (its link fails every request), another node takes every volume over
    /// (`vd volume takeover`: waits the lease out, next generation, from the backend alone), then the old router's
    /// link comes back: it renews into a fence, refuses I/O, and uploads what it still had, late. None of that may
    /// become history: the new node must read what a flash loss at the cut allows (everything stored by then).
    func takeOverOnAnotherNode() throws {
        trace.add("partition the router from the backend; another node takes its volumes over")
        count("takeover")
        try quiesce()
        let stored = storedEpochs()
        let inSync = devicesInSync()
        let old = node
        let oldLink = links[old.name]!
        oldLink.cut = true
        if store.outage {
            store.outage = false
            outageUntilOperation = nil
            trace.add("backend outage ends (for the taker)")
        }
        let (next, ordered) = try attachEverything(
            of: try VolumeRegistry.list(dataDirectory: old.dataDirectory, fs: old.fs)
        ) { self.link($0) }
        node = next
        let router = try takeOverAll(on: next, ordered, store: link(next))
        trace.add("\(next.name) serves \(router.volumes.map(\.name.rawValue)); the old router's link is back")
        // The old router comes back: it must fence itself, and anything it uploads now must never be read.
        oldLink.cut = false
        pendingLoss = (.flashLost, stored)
        let end = scheduler.now + .seconds(scheduler.between(5...60))
        scheduler.run(until: { scheduler.now >= end || failure != nil })
        if let failure { throw failure }
        old.routerProcess?.kill()
        old.router = nil
        if !routerProcess.isAlive { throw RouterKilled() }
        dtlProtected = inSync
        if !inSync.isEmpty {
            trace.add("DTL in sync at the takeover: \(inSync.sorted()) keep every replied write")
            count("takeover-dtl-in-sync")
        }
        try verifyAfterLoss(.flashLost, stored: stored)
    }

    /// A new node with every volume of `registrations` attached from the backend (`vd volume attach`), parents
    /// first (a clone opens only once its parent is open); clones lost earlier are left out.
    func attachEverything(
        of registrations: [VolumeRegistration], backend: (SimNode) -> any ObjectStore
    ) throws -> (SimNode, [VolumeRegistration]) {
        nodeCount += 1
        let next = SimNode(name: "node\(nodeCount)", scheduler: scheduler)
        let cli = scheduler.makeProcess("attach#\(scheduler.steps)")
        cli.role = "cli"
        let store = backend(next)
        let random = SimRandomSource(scheduler: scheduler)
        let ordered = registrations.sorted {
            ($0.config.parent == nil ? 0 : 1, $0.config.name) < ($1.config.parent == nil ? 0 : 1, $1.config.name)
        }.filter { !lostClones.contains($0.config.name.rawValue) }
        for registration in ordered {
            let name = registration.config.name
            let attached = try runIn(cli, "attach \(name)") { () async throws(VDError) -> Bool in
                _ = try await VolumeAdministration.attach(
                    dataDirectory: next.dataDirectory, flashDirectory: next.flashDirectory, fs: next.fs, random: random,
                    name: name, backendName: "sim", backend: store)
                return true
            }
            if case .failure(let error) = attached { throw fail("cannot attach \(name) on \(next.name): \(error)") }
        }
        return (next, ordered)
    }

    /// Starts a router on `next` and takes every registered volume over (waiting out the leases of the router that
    /// held them). A router killed at a failpoint meanwhile is started again and goes on where it stopped.
    func takeOverAll(
        on next: SimNode, _ ordered: [VolumeRegistration], store nextStore: any ObjectStore
    ) throws -> Router {
        while true {
            let (process, env) = makeProcess("router", role: "router", on: next)
            next.routerProcess = process
            let configuration = routerConfiguration
            let backends = SimBackends(store: nextStore, compress: compress)
            let logger = self.logger
            let network = dtlNetwork(from: next)
            let started = try runIn(process, "router start") { () async throws(VDError) -> Router in
                let router = try Router(
                    configuration: configuration, backends: backends, logger: logger, environment: env)
                if let network { router.enableDTL(network) }
                return router
            }
            guard case .success(let router) = started else {
                throw fail("the taking router does not start: \(started)")
            }
            next.router = router
            router.remoteCloneRegistrar = cloneRegistrar(toward: { $0.peer })
            var died = false
            for registration in ordered where !lostClones.contains(registration.config.name.rawValue) {
                let name = registration.config.name
                if router.volume(named: name) != nil { continue }
                let taken = try runIn(process, "take over \(name)", timeout: .seconds(Self.leaseSeconds * 2 + 600)) {
                    () async throws(VDError) -> Volume in
                    let lease = try await router.takeOver(registration)
                    do throws(VDError) {
                        return try await router.open(registration, taken: lease) { _ in }
                    } catch  where error.code == .dataLoss {
                        // The DTL peer was not in sync: `vd volume takeover --accept-loss`.
                        let again = try await router.takeOver(registration)
                        return try await router.open(registration, taken: again, acceptLoss: true) { _ in }
                    }
                }
                guard case .failure(let error) = taken else { continue }
                if !process.isAlive {
                    died = true
                    break
                }
                if error.message.contains("which no longer exists")
                    || error.message.contains("which is not open on this router")
                {
                    trace.add(
                        "clone \(name) is lost with its parent's snapshot (it never reached the backend): \(error)")
                    devices[name.rawValue] = nil
                    lostClones.insert(name.rawValue)
                    continue
                }
                throw fail("cannot take \(name) over on \(next.name): \(error)")
            }
            if !died { return router }
            trace.add("the taking router died at a failpoint: starting it again")
            if powerLossPending {
                powerLossPending = false
                next.fs.powerLoss()
                next.maps.powerLoss()
            }
            next.router = nil
        }
    }

    // MARK: verification

    /// Reads every device and snapshot whole and checks them against the model for what `kind` of crash allows.
    /// `full`: every snapshot read whole; otherwise those a crash may have changed (never replied, or reappeared) and
    /// two others chosen by the seed (reads during the run check them too; the end of the run reads them all).
    func verifyEverything(after kind: CrashKind, stored: [String: UInt64] = [:], full: Bool = false) throws {
        // Reads of data only the backend holds cannot be served while it is down: the check waits for it.
        if store.outage {
            store.outage = false
            outageUntilOperation = nil
            trace.add("backend outage ends (to verify everything)")
        }
        // A snapshot that was never replied may hold, after a power or flash loss, any state its device may recover
        // to (whatever survived of the epochs it covers): widen what it may read before the devices are adopted.
        if kind == .power || kind == .flashLost {
            for key in snapshots.keys.sorted() where !snapshots[key]!.confirmed {
                let snapshot = snapshots[key]!
                guard !peerDevices.contains(snapshot.volume), let model = devices[snapshot.volume] else { continue }
                for sector in 0..<snapshot.contents.count {
                    var allowed = snapshot.allowed(sector)
                    allowed.insert(model.storedFloor[sector])
                    for write in model.writes[sector] ?? [] { allowed.insert(write.id) }
                    if allowed.count > 1 { snapshots[key]!.ambiguous[sector] = allowed }
                }
            }
        }
        for name in devices.keys.sorted() {
            guard let volume = volume(name) else {
                throw fail("volume \(name) is not open after the restart")
            }
            let observed = try readWhole(name, volume)
            try accept(name, observed: observed, after: crashKind(kind, of: name), stored: stored[name])
        }
        for key in snapshots.keys.sorted() {
            let snapshot = snapshots[key]!
            guard let volume = volume(snapshot.volume) else { continue }
            let deviceKind = crashKind(kind, of: snapshot.volume)
            let record = volume.snapshotTable.snapshot(named: snapshot.name)
            if snapshot.deleted {
                if record != nil && deviceKind != .flashLost && deviceKind != .drained {
                    throw fail("deleted snapshot \(key) exists again after a \(deviceKind.rawValue) crash")
                }
                if record == nil { snapshots[key] = nil }
                if record == nil { continue }
                snapshots[key]!.deleted = false
            }
            guard let record else {
                if snapshot.confirmed {
                    let lostAllowed = deviceKind == .flashLost && snapshot.epoch > (stored[snapshot.volume] ?? 0)
                    if !lostAllowed {
                        throw fail("snapshot \(key) (epoch \(snapshot.epoch)) is gone after a \(deviceKind.rawValue)")
                    }
                }
                trace.add("snapshot \(key) did not survive the \(deviceKind.rawValue) (never replied or not stored)")
                snapshots[key] = nil
                continue
            }
            let mustRead = full || !snapshot.confirmed || !snapshot.ambiguous.isEmpty || snapshot.deleted
            snapshots[key]!.confirmed = true
            snapshots[key]!.epoch = record.epoch
            if mustRead || scheduler.chance(2.0 / Double(max(1, snapshots.count))) { try verifySnapshot(key) }
        }
    }

    func verifySnapshot(_ key: String) throws {
        guard let snapshot = snapshots[key], let volume = volume(snapshot.volume),
            let record = volume.snapshotTable.snapshot(named: snapshot.name)
        else { return }
        let view = SnapshotView(volume: volume, snapshot: record)
        let observed = try readWhole(key, view)
        var mismatches: [String] = []
        for (sector, value) in observed.enumerated() {
            if snapshot.allowed(sector).contains(value) {
                snapshots[key]!.resolve(sector, value)
            } else if mismatches.count < 8 {
                mismatches.append(
                    "sector \(sector) (cluster \(sector / 8)): read write \(value), expected \(snapshot.allowed(sector).sorted())"
                )
            }
        }
        if !mismatches.isEmpty { throw fail("snapshot \(key) reads wrong data: \(mismatches.joined(separator: "; "))") }
    }

    /// The whole device as write ids per sector.
    func readWhole(_ name: String, _ device: any BlockDevice) throws -> [UInt32] {
        let total = Int(config.volumeBytes / 512)
        let routerProcess = process(for: name)
        guard routerProcess.isAlive else { throw RouterKilled() }
        var values = [UInt32](repeating: 0, count: total)
        // A verification observes: an armed failpoint waits until it is done (a kill would fail the read).
        let armed = scheduler.armedFailpoints
        scheduler.armedFailpoints = [:]
        defer { scheduler.armedFailpoints.merge(armed) { kept, _ in kept } }
        let chunk = 2048
        var first = 0
        while first < total {
            let count = min(chunk, total - first)
            let offset = UInt64(first) * 512
            var attempts = 0
            var result: Result<ByteBuffer, VDError>
            repeat {
                attempts += 1
                result = try runIn(client, "read \(name)") { () async throws(VDError) -> ByteBuffer in
                    try await routerProcess.call { () async throws(VDError) -> ByteBuffer in
                        try await device.read(offset: offset, length: UInt32(count * 512))
                    }
                }
                if case .failure(let error) = result, error.code == .backend, store.outage {
                    store.outage = false
                    outageUntilOperation = nil
                    trace.add("backend outage ends (to read \(name) whole)")
                    continue
                }
                if case .failure = result, store.injectedFaults > 0, attempts < 5 { continue }
                break
            } while true
            let bytes: ByteBuffer
            switch result {
            case .success(let data): bytes = data
            case .failure(let error):
                guard routerProcess.isAlive else { throw RouterKilled() }
                throw fail("reading \(name) sectors \(first)+\(count) failed: \(error)")
            }
            var garbage: [Int] = []
            bytes.withUnsafeReadableBytes { raw in
                for index in 0..<count {
                    let sector = first + index
                    if let id = SectorPattern.identify(
                        UnsafeRawBufferPointer(rebasing: raw[(index * 512)..<((index + 1) * 512)]),
                        sector: UInt64(sector))
                    {
                        values[sector] = id
                    } else {
                        garbage.append(sector)
                    }
                }
            }
            if !garbage.isEmpty {
                throw fail(
                    "\(name) returns bytes no write wrote in sectors \(garbage.prefix(8).map(String.init).joined(separator: ", "))"
                )
            }
            first += count
        }
        return values
    }

    /// Checks what a restart gave against what `kind` allows, then makes it the model.
    func accept(_ name: String, observed: [UInt32], after requested: CrashKind, stored: UInt64?) throws {
        // A flash loss of a device whose DTL mirror was in sync: the peer held every replied write.
        let kind = requested == .flashLost && dtlProtected.contains(name) ? CrashKind.process : requested
        var model = devices[name]!
        let covered = coveredSeq[name] ?? 0
        var mismatches: [String] = []
        // The prefix rule after a power loss: the newest surviving write bounds what must have survived.
        var survivorIssue: UInt64 = 0
        for sector in 0..<model.sectorCount {
            let value = observed[sector]
            let list = model.writes[sector] ?? []
            var allowed: [UInt32] = []
            switch kind {
            case .none, .process, .drained:
                allowed = [model.current(sector)]
            case .power:
                let floor = list.lastIndex { $0.replySeq <= covered || $0.durable }
                allowed =
                    [floor.map { list[$0].id } ?? model.storedFloor[sector]] + list[((floor ?? -1) + 1)...].map(\.id)
            case .flashLost:
                let bound = stored ?? 0
                let floor = list.lastIndex { $0.epochAtReply <= bound }
                allowed =
                    [floor.map { list[$0].id } ?? model.storedFloor[sector]] + list[((floor ?? -1) + 1)...].map(\.id)
            }
            if let pending = model.inFlight[sector] { allowed.append(pending) }
            if !allowed.contains(value) {
                if mismatches.count < 8 {
                    mismatches.append(
                        "sector \(sector) (cluster \(sector / 8)): read write \(value), allowed \(allowed)")
                }
                continue
            }
            // Which write survived (zeroes cannot tell one zeroing from another: no evidence).
            if kind == .power, value != 0, let entry = list.last(where: { $0.id == value }) {
                survivorIssue = max(survivorIssue, entry.issueSeq)
            }
        }
        if !mismatches.isEmpty {
            throw fail(
                "after a \(kind.rawValue) crash, \(name) reads wrong data: \(mismatches.joined(separator: "; "))")
        }
        if kind == .power && survivorIssue > 0 {
            // Every write replied before the newest survivor was issued is before it in the journal: it survived.
            for sector in 0..<model.sectorCount {
                let list = model.writes[sector] ?? []
                guard let required = list.lastIndex(where: { $0.replySeq < survivorIssue && $0.replySeq > 0 }) else {
                    continue
                }
                let observedIndex = list.lastIndex { $0.id == observed[sector] } ?? -1
                if observedIndex < required && model.inFlight[sector] != observed[sector] {
                    throw fail(
                        "after a power loss \(name) is not a prefix of its writes: sector \(sector) lost write \(list[required].id) (replied before write-issue \(survivorIssue) that survived)"
                    )
                }
            }
        }
        // Adopt what was read.
        let reply = nextReply()
        let epoch = volume(name)?.openEpoch ?? 0
        if kind == .flashLost || kind == .drained {
            model.adopt(observed, stored: true)
        } else {
            for sector in 0..<model.sectorCount {
                let value = observed[sector]
                var list = model.writes[sector] ?? []
                if model.inFlight[sector] == value && value != model.current(sector) {
                    // An operation in flight at the crash landed (recovery may finish one, e.g. a rollback). It may
                    // re-instate an older write's value, but it is a new change of this epoch: recorded as such, not
                    // as that older write (which would claim the backend held it already).
                    list.append(SectorWrite(id: value, replySeq: reply, issueSeq: 0, epochAtReply: epoch))
                } else if let index = list.lastIndex(where: { $0.id == value }) {
                    list.removeSubrange((index + 1)...)
                } else if value == model.storedFloor[sector] && (kind == .power) {
                    list = []
                } else if value != model.current(sector) || model.inFlight[sector] == value {
                    // Recovered state, durable now; it says nothing about the order of writes (issue 0).
                    list.append(SectorWrite(id: value, replySeq: reply, issueSeq: 0, epochAtReply: epoch))
                }
                model.writes[sector] = list.isEmpty ? nil : list
            }
            model.inFlight = [:]
        }
        devices[name] = model
        // A restart syncs what it recovered: everything now read is durable. A device the crash did not touch (the
        // peer's, read again after the main node's crash) synced nothing: its replied writes stay unflushed.
        if kind != .none { coveredSeq[name] = events }
    }
}

final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, VDError>?
}

extension SimKeyValueStores {
    /// Forgets every store under `prefix` (their files were on a lost disk).
    package func forget(prefix: String) {
        forgetStores { $0.hasPrefix(prefix) }
    }
}

/// The router died at an armed failpoint before a verification could read from it: the run recovers as from a crash.
struct RouterKilled: Error {}
