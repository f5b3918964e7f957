// The deterministic simulation as part of the test suite: a batch of seeds, each a whole node (router, volumes,
// uploader, scrubber, checker) on a simulated disk, map store, backend and clock, checked against the model after
// every step. A failing seed is printed with its trace; `tools/sim.sh --replay SEED --ops N` reruns it.
//
// VD_SIM_SEEDS, VD_SIM_FIRST_SEED and VD_SIM_OPS change the batch (longer runs: tools/sim.sh).

import Foundation
import Testing
import VolumeSimulation

@Suite struct SimulationTests {
    static let environment = ProcessInfo.processInfo.environment
    static let seedCount = Int(environment["VD_SIM_SEEDS"] ?? "") ?? 200
    static let firstSeed = UInt64(environment["VD_SIM_FIRST_SEED"] ?? "") ?? 1
    static let operations = Int(environment["VD_SIM_OPS"] ?? "") ?? 60
    /// Seeds run at once (each on a thread of its own).
    static let parallelism = max(1, ProcessInfo.processInfo.activeProcessorCount)

    @Test func seededRuns() async throws {
        let seeds = (0..<Self.seedCount).map { Self.firstSeed + UInt64($0) }
        let reports = await withTaskGroup(of: SimulationReport.self) { group in
            var reports: [SimulationReport] = []
            var next = 0
            func start() {
                guard next < seeds.count else { return }
                var config = SimulationConfig(seed: seeds[next])
                config.operations = Self.operations
                next += 1
                group.addTask { await SimulationRunner.runAsync(config) }
            }
            for _ in 0..<Self.parallelism { start() }
            for await report in group {
                reports.append(report)
                start()
            }
            return reports.sorted { $0.seed < $1.seed }
        }
        let failures = reports.filter { !$0.passed }
        let operations = reports.reduce(0) { $0 + $1.operations }
        print(
            "simulation: \(reports.count) seeds from \(Self.firstSeed), \(operations) operations, \(failures.count) failed"
        )
        let details = failures.map { report in
            "seed \(report.seed): \(report.failure!)\n"
                + report.trace.suffix(60).map { "    \($0)" }.joined(separator: "\n")
        }
        #expect(
            failures.isEmpty,
            "\(failures.count) seed(s) failed (replay with tools/sim.sh --replay SEED --ops \(Self.operations)):\n\(details.joined(separator: "\n"))"
        )
    }
}

/// Several routers contending for one volume's owner lease on virtual time, with drifting clocks, partitions from the
/// store (requests lost before or after they land) and kills: never two valid leases at once, one owner per
/// generation. VD_SIM_LEASE_SEEDS sets how many seeds.
@Suite struct LeaseSimulationTests {
    static let seeds = Int(ProcessInfo.processInfo.environment["VD_SIM_LEASE_SEEDS"] ?? "") ?? 60

    @Test func contendingRoutersNeverBothOwn() async throws {
        let reports = await withTaskGroup(of: LeaseSimulationReport.self) { group in
            for seed in 1...UInt64(Self.seeds) {
                group.addTask { LeaseSimulation.run(seed: seed) }
            }
            var all: [LeaseSimulationReport] = []
            for await report in group { all.append(report) }
            return all.sorted { $0.seed < $1.seed }
        }
        for report in reports where !report.passed {
            let tail = report.trace.suffix(80).joined(separator: "\n")
            Issue.record("lease seed \(report.seed): \(report.violations.joined(separator: "; "))\n\(tail)")
        }
        let takeovers = reports.reduce(0) { $0 + $1.takeovers }
        let fencings = reports.reduce(0) { $0 + $1.fencings }
        let partitions = reports.reduce(0) { $0 + $1.partitions }
        print(
            "lease simulation: \(reports.count) seeds, \(reports.reduce(0) { $0 + $1.acquisitions }) acquisitions, \(takeovers) takeovers, \(fencings) fencings, \(partitions) partitions, \(reports.reduce(0) { $0 + $1.kills }) kills"
        )
        // The faults must actually exercise takeovers and fencing.
        #expect(takeovers > Self.seeds / 2)
        #expect(fencings > 0)
    }
}
