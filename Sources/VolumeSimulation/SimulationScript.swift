// Scripted runs of the simulation: a test writes the exact sequence of events of a scenario (a crash at a named
// point, a backend that refuses one kind of object, a power loss right after a roll) and the same model checks every
// read and every recovery. Each of the data-safety issue's scenarios is one such script.

import Foundation
import Synchronization
package import VolumeCore

/// What a script may do. Every call runs on the simulation thread, in virtual time.
package final class SimulationScript: @unchecked Sendable {
    let simulation: Simulation

    init(_ simulation: Simulation) { self.simulation = simulation }

    /// Runs `body` against a fresh node with volume `vol1` (8 MiB, 1 MiB SCOs); the report says whether every
    /// check held. Seeded like any run (scheduling and backend latency), without random faults unless configured.
    package static func run(
        seed: UInt64, tolerateErrors: Bool = false, mapChunkClusters: Int? = nil,
        _ body: @escaping @Sendable (SimulationScript) throws -> Void
    ) -> SimulationReport {
        var configured = SimulationConfig(seed: seed)
        configured.backendFaults = false
        configured.tolerateErrors = tolerateErrors
        configured.mapChunkClusters = mapChunkClusters
        let config = configured
        let result = Mutex<SimulationReport?>(nil)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            let simulation = Simulation(config: config)
            if !config.backendFaults {
                simulation.store.faults = SimObjectStore.Faults()
            }
            let report = simulation.runScript { try body(SimulationScript(simulation)) }
            result.withLock { $0 = report }
            done.signal()
        }
        thread.name = "script seed \(seed)"
        thread.stackSize = 64 << 20
        thread.start()
        done.wait()
        return result.withLock { $0! }
    }

    package var store: SimObjectStore { simulation.store }
    package var fs: SimFileSystem { simulation.node.fs }
    package var maps: SimKeyValueStores { simulation.node.maps }
    package var flashDirectory: String { simulation.node.flashDirectory }

    /// Writes sectors `sectors` of `device` with fresh data and waits for the reply.
    package func write(_ device: String = "vol1", sectors: Range<Int>, fua: Bool = false) throws {
        try simulation.waitFor(simulation.startWrite(kind: .data, device: device, range: sectors, fua: fua))
    }

    package func trim(_ device: String = "vol1", sectors: Range<Int>) throws {
        try simulation.waitFor(simulation.startWrite(kind: .trim, device: device, range: sectors, fua: false))
    }

    package func flush(_ device: String = "vol1") throws {
        try simulation.waitFor(simulation.startFlush(device))
    }

    /// Takes snapshot `name`; false when the request did not complete (the router died meanwhile).
    @discardableResult
    package func snapshot(_ name: String, of device: String = "vol1") throws -> Bool {
        try simulation.waitFor(simulation.startSnapshotCreate(device, name: name))
        return simulation.snapshots["\(device)@\(name)"]?.confirmed ?? false
    }

    package func deleteSnapshot(_ name: String, of device: String = "vol1") throws {
        try simulation.snapshotDelete("\(device)@\(name)")
    }

    package func rollback(_ device: String = "vol1", to name: String) throws {
        try simulation.rollback("\(device)@\(name)")
    }

    /// Runs the scheduler for `seconds` of virtual time (uploads, age-based seals, scrub application happen).
    package func wait(seconds: Double) throws {
        try simulation.wait(.seconds(double: seconds))
    }

    /// The router (role "router") or a scrubber ("scrubber") is killed when it reaches failpoint `name`.
    package func arm(_ name: String, role: String = "router") {
        simulation.scheduler.armedFailpoints[name] = role
    }

    package enum Crash: String { case process, power, flashLost }

    /// The router crashes (if a failpoint did not already end it), the machine loses power, or the local flash is
    /// lost; the router starts again and everything is read back and checked.
    package func crash(_ kind: Crash) throws {
        switch kind {
        case .process: try simulation.crash(.process)
        case .power: try simulation.crash(.power)
        case .flashLost: try simulation.crash(.flashLost)
        }
    }

    /// A clean stop that uploads everything, the local flash lost, a restart from the backend alone.
    package func drainAndRestoreFromBackend() throws { try simulation.drainAndRestoreFromBackend() }

    /// Starts `vd scrub`; returns at once (the scrub runs as its own process).
    package func startScrub(_ device: String = "vol1", threshold: Double = 0.9) throws -> SimProcess {
        try simulation.startScrub(device, threshold: threshold, killAfter: nil)
    }

    /// Runs the scheduler until `condition` holds (or `seconds` of virtual time pass).
    package func runUntil(seconds: Double = 600, _ condition: @escaping () -> Bool) throws {
        try simulation.runUntil("script condition", timeout: .seconds(double: seconds), condition)
    }

    /// Whether a scrubber's run ended (or it was killed).
    package func scrubDone(_ process: SimProcess) -> Bool {
        simulation.scrubsFinished.contains(process.id) || !process.isAlive
    }

    /// The error a scrubber's run ended with (nil: it succeeded, or has not ended).
    package func scrubError(_ process: SimProcess) -> VDError? { simulation.scrubErrors[process.id] }

    package func check(_ device: String = "vol1", repair: Bool) throws {
        try simulation.runCheck(device, repair: repair)
    }

    /// Reads everything back and checks it against the model (exact: nothing crashed).
    package func verify() throws { try simulation.verifyEverything(after: .none, full: true) }

    /// The epoch every earlier one of which, and itself, is on the backend.
    package func storedEpoch(_ device: String = "vol1") -> UInt64 {
        simulation.volume(device)?.uploadStatus.storedThrough.rawValue ?? 0
    }

    package func trace(_ line: String) { simulation.trace.add(line) }

    /// A failed expectation of the script itself.
    package func fail(_ message: String) -> any Error { simulation.fail(message) }
}

extension Simulation {
    /// Boots, creates vol1, runs `body`, then checks everything one last time.
    func runScript(_ body: () throws -> Void) -> SimulationReport {
        scheduler.bindToCurrentThread()
        do {
            try boot()
            try createVolume("vol1")
            try body()
            try checkInvariants()
            try quiesce()
            try verifyEverything(after: .none, full: true)
        } catch let error as SimFailure {
            report.failure = error.message
        } catch {
            report.failure = "unexpected error: \(error)"
        }
        if report.failure == nil, let escaped = scheduler.escaped { report.failure = "nondeterminism: \(escaped)" }
        report.steps = scheduler.steps
        report.virtualSeconds = scheduler.now.seconds
        report.trace = trace.tail
        releaseAll()
        return report
    }
}
