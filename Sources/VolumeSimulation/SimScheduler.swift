// The heart of the deterministic simulation: one thread runs every task of every simulated process, one job at a
// time, picking the next runnable job with a seeded generator; time is virtual and jumps to the next timer when
// nothing can run. A seed therefore replays the same interleaving, the same faults and the same crashes.
//
// A simulated process is a TaskExecutor: tasks started for it (with executor preference) run only through the
// scheduler. Killing a process drops its runnable jobs and every job that would later be enqueued for it, so its
// tasks simply never run again (like a killed process); calls from other processes into it fail with a lost
// connection. Anything that escapes to a real thread (a real clock, a thread pool) is detected and fails the run.

package import Foundation
import HeapModule
import Synchronization
package import VolumeCore
package import VolumeTesting

/// The scheduler of one simulation run. Everything in it is touched only from the simulation thread.
package final class SimScheduler: @unchecked Sendable {
    package let seed: UInt64
    /// The generator behind every random choice of the run (scheduling, faults, workload).
    package var random: SeededRandom
    /// Virtual time since the start of the run.
    package private(set) var now: Duration = .zero
    /// The wall clock at virtual time zero (fixed, so runs replay).
    package let startDate = Date(timeIntervalSince1970: 1_790_000_000)
    package private(set) var currentProcess: SimProcess?
    package private(set) var steps: UInt64 = 0
    package let trace: SimTrace

    private var ready: [(process: SimProcess, job: UnownedJob)] = []
    private let foreign = Mutex<[(SimProcess, UnownedJob)]>([])
    private var timers = Heap<SimTimer>()
    private var timerSequence: UInt64 = 0
    private var nextProcessID = 1
    private let thread = Mutex<pthread_t?>(nil)
    /// Set when a job was enqueued from another thread: the run is not deterministic any more.
    package private(set) var escaped: String?
    /// Failpoints armed by the workload: the process that reaches one is killed there.
    package var armedFailpoints: [String: String] = [:]
    /// Called after a failpoint killed its process (the workload may turn the kill into a power loss).
    package var failpointFired: ((String) -> Void)?

    package init(seed: UInt64, trace: SimTrace) {
        self.seed = seed
        random = SeededRandom(seed: seed)
        self.trace = trace
    }

    package func makeProcess(_ name: String) -> SimProcess {
        defer { nextProcessID += 1 }
        return SimProcess(scheduler: self, name: name, id: nextProcessID)
    }

    // MARK: random

    package func nextRandom() -> UInt64 { random.next() }
    package func chance(_ probability: Double) -> Bool {
        Double(random.next() >> 11) / Double(1 << 53) < probability
    }
    package func below(_ bound: Int) -> Int {
        precondition(bound > 0)
        return Int(random.next() % UInt64(bound))
    }
    package func between(_ range: ClosedRange<Int>) -> Int { range.lowerBound + below(range.count) }

    // MARK: jobs

    fileprivate func enqueue(_ job: UnownedJob, for process: SimProcess) {
        let onThread = thread.withLock { owner -> Bool in
            guard let owner else { return true }
            return pthread_equal(owner, pthread_self()) != 0
        }
        guard onThread else {
            // A continuation resumed on another thread (a real timer, a thread pool, NIO): not reproducible.
            foreign.withLock { $0.append((process, job)) }
            return
        }
        guard process.isAlive else { return }
        ready.append((process, job))
    }

    /// Binds the scheduler to the calling thread (the simulation thread).
    package func bindToCurrentThread() {
        thread.withLock { $0 = pthread_self() }
    }

    /// Runs one job, or fires the next timer when no job is ready. False when nothing is left to do.
    package func step() -> Bool {
        let strays = foreign.withLock { strays -> [(SimProcess, UnownedJob)] in
            defer { strays = [] }
            return strays
        }
        if !strays.isEmpty {
            if escaped == nil { escaped = "a job of \(strays[0].0.name) was enqueued from another thread" }
            for (process, job) in strays where process.isAlive { ready.append((process, job)) }
        }
        steps += 1
        while !ready.isEmpty {
            let index = Int(random.next() % UInt64(ready.count))
            let (process, job) = ready[index]
            ready[index] = ready[ready.count - 1]
            ready.removeLast()
            guard process.isAlive else { continue }
            currentProcess = process
            job.runSynchronously(on: process.asUnownedTaskExecutor())
            currentProcess = nil
            return true
        }
        while let timer = timers.popMin() {
            guard timer.process.isAlive else { continue }
            if timer.deadline > now { now = timer.deadline }
            timer.fire()
            return true
        }
        return false
    }

    /// Drops every job and timer (the run is over; their tasks are never resumed).
    package func releaseAll() {
        ready = []
        timers = Heap()
        foreign.withLock { $0 = [] }
    }

    /// Whether anything is runnable now (without advancing time).
    package var hasReadyJobs: Bool { !ready.isEmpty }

    /// Runs until `done()` holds. Returns false if the run stalled (nothing left to run while `done()` is false)
    /// or exceeded `maxSteps`.
    @discardableResult
    package func run(until done: () -> Bool, maxSteps: UInt64 = 50_000_000) -> Bool {
        let limit = steps + maxSteps
        while !done() {
            guard steps < limit, step() else { return false }
        }
        return true
    }

    /// Runs until no job is ready and the next timer is past `duration` from now (time advances to that point).
    package func run(for duration: Duration) {
        let end = now + duration
        while true {
            if ready.isEmpty, let next = timers.min, next.deadline > end { break }
            if ready.isEmpty && timers.isEmpty { break }
            _ = step()
        }
        if now < end { now = end }
    }

    // MARK: time

    /// Suspends the calling task until virtual time `duration` from now.
    package func sleep(for duration: Duration) async {
        guard let process = currentProcess else {
            preconditionFailure("a simulated sleep outside a simulated process")
        }
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            addTimer(after: max(.zero, duration), process: process) { continuation.resume() }
        }
    }

    package func addTimer(after duration: Duration, process: SimProcess, _ fire: @escaping () -> Void) {
        timerSequence += 1
        timers.insert(SimTimer(deadline: now + duration, sequence: timerSequence, process: process, fire: fire))
    }

    // MARK: failpoints and invariants

    /// Invariants the code under test found broken (each ends the run).
    package private(set) var invariantFailures: [String] = []

    /// An invariant broken as seen from outside the code under test (the simulated world's own checks).
    package func reportInvariantFailure(_ message: String) { invariantFailed(message) }

    fileprivate func invariantFailed(_ message: String) {
        let process = currentProcess
        invariantFailures.append("\(process?.name ?? "?"): \(message)")
        trace.add("INVARIANT VIOLATED in \(process?.name ?? "?"): \(message)")
        process?.kill()
    }

    fileprivate func failpoint(_ name: String) {
        guard let process = currentProcess, armedFailpoints[name] == process.role else { return }
        armedFailpoints[name] = nil
        trace.add("failpoint \(name): \(process.name) killed")
        process.kill()
        failpointFired?(name)
    }
}

struct SimTimer: Comparable {
    var deadline: Duration
    var sequence: UInt64
    var process: SimProcess
    var fire: () -> Void
    static func < (a: SimTimer, b: SimTimer) -> Bool { (a.deadline, a.sequence) < (b.deadline, b.sequence) }
    static func == (a: SimTimer, b: SimTimer) -> Bool { a.deadline == b.deadline && a.sequence == b.sequence }
}

/// A bounded record of what happened, printed when a seed fails.
package final class SimTrace: @unchecked Sendable {
    private var lines: [String] = []
    private var dropped = 0
    package let linesMax: Int
    package var verbose: Bool
    package var clock: (() -> Duration)?

    package init(linesMax: Int = 4000, verbose: Bool = false) {
        self.linesMax = linesMax
        self.verbose = verbose
    }

    package func add(_ line: String) {
        let stamped = clock.map { "[\(Self.format($0()))] \(line)" } ?? line
        if verbose { print(stamped) }
        lines.append(stamped)
        if lines.count > linesMax {
            lines.removeFirst(lines.count - linesMax)
            dropped += 1
        }
    }

    package var tail: [String] { lines }

    static func format(_ duration: Duration) -> String {
        String(format: "%.6f", duration.seconds)
    }
}

/// A simulated process: an executor whose jobs run only through the scheduler.
package final class SimProcess: TaskExecutor, @unchecked Sendable, CustomStringConvertible {
    package let scheduler: SimScheduler
    package let name: String
    package let id: Int
    /// What the process is (for failpoints): "router", "scrubber", "client".
    package var role: String = ""
    package private(set) var isAlive = true
    private var pendingCalls: [Int: (VDError) -> Void] = [:]
    private var nextCall = 0
    private var onKill: [() -> Void] = []

    init(scheduler: SimScheduler, name: String, id: Int) {
        self.scheduler = scheduler
        self.name = name
        self.id = id
    }

    package var description: String { name }

    package func enqueue(_ job: consuming ExecutorJob) {
        scheduler.enqueue(UnownedJob(job), for: self)
    }

    /// Starts a task of this process.
    @discardableResult
    package func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        Task(executorPreference: self) { await body() }
    }

    /// Runs `body` in this process on behalf of a caller in another process (a request over a connection): the
    /// caller gets the result, or a lost-connection error if this process dies first.
    package func call<T: Sendable>(_ body: @escaping @Sendable () async throws(VDError) -> T) async throws(VDError) -> T
    {
        let result: Result<T, VDError> = await withUnsafeContinuation { continuation in
            guard isAlive else {
                continuation.resume(returning: .failure(VDError(.io, "connection to \(name) lost")))
                return
            }
            nextCall += 1
            let id = nextCall
            pendingCalls[id] = { error in continuation.resume(returning: .failure(error)) }
            spawn { [self] in
                let outcome: Result<T, VDError>
                do throws(VDError) { outcome = .success(try await body()) } catch { outcome = .failure(error) }
                guard isAlive, pendingCalls.removeValue(forKey: id) != nil else { return }
                continuation.resume(returning: outcome)
            }
        }
        return try result.get()
    }

    /// Runs `action` when the process is killed (the file system and the map drop its state).
    package func whenKilled(_ action: @escaping () -> Void) { onKill.append(action) }

    /// Kills the process: none of its jobs runs again; callers waiting on it see a lost connection.
    package func kill() {
        guard isAlive else { return }
        isAlive = false
        let calls = pendingCalls
        pendingCalls = [:]
        for (_, fail) in calls.sorted(by: { $0.key < $1.key }) { fail(VDError(.io, "connection to \(name) lost")) }
        for action in onKill { action() }
        onKill = []
    }
}

/// Virtual time for a simulated process.
package struct SimClock: VDClock {
    let scheduler: SimScheduler
    package init(scheduler: SimScheduler) { self.scheduler = scheduler }
    package func now() -> MonotonicInstant { MonotonicInstant(sinceOrigin: scheduler.now) }
    package func wallNow() -> Date { scheduler.startDate.addingTimeInterval(scheduler.now.seconds) }
    package func sleep(for duration: Duration) async { await scheduler.sleep(for: duration) }
}

/// The run's seeded generator.
package struct SimRandomSource: RandomSource {
    let scheduler: SimScheduler
    package init(scheduler: SimScheduler) { self.scheduler = scheduler }
    package func next() -> UInt64 { scheduler.nextRandom() }
}

/// Tasks of one simulated process; blocking work runs inline after a yield (other tasks may run first).
package struct SimTaskRunner: TaskRunner {
    package let process: SimProcess
    package init(process: SimProcess) { self.process = process }

    @discardableResult
    package func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> { process.spawn(body) }

    package func blocking<T: Sendable>(_ body: @escaping @Sendable () throws(VDError) -> T) async throws(VDError) -> T {
        await Task.yield()
        guard process.isAlive else {
            // Killed while this task waited: it never runs again (the caller is never resumed either).
            await withUnsafeContinuation { (_: UnsafeContinuation<Void, Never>) in }
            preconditionFailure("unreachable")
        }
        return try body()
    }

    package func failpoint(_ name: String) { process.scheduler.failpoint(name) }

    package func invariantFailed(_ message: String) { process.scheduler.invariantFailed(message) }
}
