// vd-sim: runs the deterministic simulation for many seeds (tools/sim.sh wraps it).
//
//   vd-sim --seeds N [--first S] [--ops M] [--jobs J]   every failing seed is printed with the tail of its trace
//   vd-sim --replay SEED [--ops M]                      one seed with its full trace as it runs
// Exit status 1 if any seed fails.

import ArgumentParser
import Foundation
import Synchronization
import VolumeSimulation

@main
struct SimCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vd-sim", abstract: "Runs VolumeDriver's deterministic simulation for many seeds.")

    @Option(help: "How many seeds to run.") var seeds: Int = 100
    @Option(help: "The first seed.") var first: UInt64 = 1
    @Option(help: "Operations per seed.") var ops: Int = 200
    @Option(help: "Seeds run at once (each on its own thread).") var jobs: Int = 2
    @Option(help: "Run only this seed, printing its whole trace as it runs.") var replay: UInt64?
    @Option(help: "Trace lines printed for a failing seed.") var traceLines: Int = 120
    @Flag(help: "No crashes, power losses or flash losses.") var noCrashes = false
    @Flag(help: "No backend faults.") var noFaults = false
    @Flag(help: "No scrubs.") var noScrubs = false
    @Option(
        help: "Owner leases and takeovers: on, off, or by seed (one seed in four; the default).")
    var ownership: String = "by-seed"
    @Option(
        help:
            "A DTL peer mirroring volumes in sync mode (with ownership): on, off, or by seed (half of the ownership seeds; the default)."
    )
    var dtl: String = "by-seed"

    func config(_ seed: UInt64, verbose: Bool) -> SimulationConfig {
        var config = SimulationConfig(seed: seed)
        config.operations = ops
        config.verbose = verbose
        config.crashes = !noCrashes
        config.backendFaults = !noFaults
        config.scrubs = !noScrubs
        config.ownership = ownership == "on" ? true : ownership == "off" ? false : nil
        config.dtl = dtl == "on" ? true : dtl == "off" ? false : nil
        return config
    }

    func run() throws {
        if getenv("SWIFT_DETERMINISTIC_HASHING") == nil {
            FileHandle.standardError.write(
                Data("note: SWIFT_DETERMINISTIC_HASHING=1 is not set; a seed may not replay identically\n".utf8))
        }
        if let replay {
            let report = SimulationRunner.run(config(replay, verbose: true))
            print(summary(report))
            if let failure = report.failure { print("FAILED seed \(replay): \(failure)") }
            throw ExitCode(report.passed ? 0 : 1)
        }
        let next = Mutex(0)
        let failed = Mutex<[SimulationReport]>([])
        let totals = Mutex((operations: 0, virtualSeconds: 0.0, steps: UInt64(0), counts: [String: Int]()))
        let started = Date()
        let group = DispatchGroup()
        for _ in 0..<max(1, jobs) {
            group.enter()
            let thread = Thread {
                while true {
                    let index = next.withLock { value -> Int in
                        defer { value += 1 }
                        return value
                    }
                    guard index < seeds else { break }
                    let seed = first + UInt64(index)
                    let report = SimulationRunner.run(config(seed, verbose: false))
                    totals.withLock {
                        $0.operations += report.operations
                        $0.virtualSeconds += report.virtualSeconds
                        $0.steps += report.steps
                        $0.counts.merge(report.counts, uniquingKeysWith: +)
                    }
                    if !report.passed {
                        failed.withLock { $0.append(report) }
                        print("seed \(seed) FAILED after \(report.operations) operations: \(report.failure!)")
                        for line in report.trace.suffix(traceLines) { print("    \(line)") }
                    }
                }
                group.leave()
            }
            thread.stackSize = 64 << 20
            thread.start()
        }
        group.wait()
        let failures = failed.withLock { $0 }.sorted { $0.seed < $1.seed }
        let (operations, virtualSeconds, steps, counts) = totals.withLock {
            ($0.operations, $0.virtualSeconds, $0.steps, $0.counts)
        }
        print("events: " + counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        print(
            "\(seeds) seed(s) from \(first), \(operations) operations, \(steps) steps, \(Int(virtualSeconds)) s virtual in \(String(format: "%.1f", Date().timeIntervalSince(started))) s: \(failures.isEmpty ? "all passed" : "\(failures.count) FAILED: \(failures.map { String($0.seed) }.joined(separator: " "))")"
        )
        if !failures.isEmpty { throw ExitCode(1) }
    }

    func summary(_ report: SimulationReport) -> String {
        let counts = report.counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        return
            "seed \(report.seed): \(report.operations) operations, \(report.steps) steps, \(String(format: "%.1f", report.virtualSeconds)) s virtual; \(counts)"
    }
}
