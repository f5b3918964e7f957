// The deterministic simulation as part of the test suite: a batch of seeds, each a whole node (router, volumes,
// uploader, scrubber, checker) on a simulated disk, map store, backend and clock, checked against the model after
// every step. A failing seed is printed with its trace; `tools/sim.sh --replay SEED` reruns it.

import Foundation
import Testing
import VolumeSimulation

@Suite struct SimulationTests {
    static let seedCount = Int(ProcessInfo.processInfo.environment["VD_SIM_SEEDS"] ?? "") ?? 64
    static let firstSeed = UInt64(ProcessInfo.processInfo.environment["VD_SIM_FIRST_SEED"] ?? "") ?? 1

    @Test func seededRuns() async throws {
        var failures: [String] = []
        for index in 0..<Self.seedCount {
            let seed = Self.firstSeed + UInt64(index)
            var config = SimulationConfig(seed: seed)
            config.operations = 120
            let report = await SimulationRunner.runAsync(config)
            if let failure = report.failure {
                failures.append(
                    "seed \(seed): \(failure)\n" + report.trace.suffix(60).map { "    \($0)" }.joined(separator: "\n"))
            }
        }
        #expect(failures.isEmpty, "\(failures.count) seed(s) failed (replay with tools/sim.sh --replay SEED):\n\(failures.joined(separator: "\n"))")
    }
}
