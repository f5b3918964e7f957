// A benchmark, not a test: fio (ioengine=nbd) against NBDServer + MemoryBlockDevice and against
// `nbdkit memory` in the same run, printing IOPS and the ratio. Off unless NBD_BENCH_SECONDS is set; run it on a
// release build:
//
//   NBD_BENCH_SECONDS=10 swift test -c release -Xswiftc -enable-testing --filter NBDBenchmark
//
// NBD_BENCH_JOBS picks the workloads (comma-separated names below); NBD_BENCH_EXECUTION picks where device commands
// run: `loop`, `global`, or a byte threshold for `.adaptive` (default: NBDDeviceExecution.default).

import Foundation
import NBDServer
import NIOCore
import NIOPosix
import Testing
import VolumeTesting

private let benchSeconds = ProcessInfo.processInfo.environment["NBD_BENCH_SECONDS"].flatMap { Int($0) }

@Suite(.serialized) struct NBDBenchmark {
    private struct Workload {
        var name: String
        var arguments: [String]
    }

    private static let workloads: [Workload] = [
        Workload(name: "randwrite-4k-qd32", arguments: ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
        Workload(name: "randread-4k-qd32", arguments: ["--rw=randread", "--bs=4k", "--iodepth=32"]),
        Workload(name: "write-1m-qd8", arguments: ["--rw=write", "--bs=1m", "--iodepth=8"]),
        Workload(name: "randwrite-4k-qd1", arguments: ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ]

    @Test(.enabled(if: benchSeconds != nil, "set NBD_BENCH_SECONDS to run the benchmark"))
    func fioAgainstNBDServerAndNbdkit() async throws {
        let seconds = benchSeconds ?? 10
        let selected =
            ProcessInfo.processInfo.environment["NBD_BENCH_JOBS"].map { $0.split(separator: ",").map(String.init) }
            ?? ["randwrite-4k-qd32"]
        let size: UInt64 = 1 << 30
        let execution: NBDDeviceExecution
        switch ProcessInfo.processInfo.environment["NBD_BENCH_EXECUTION"] {
        case "global": execution = .globalConcurrentExecutor
        case "loop": execution = .eventLoop
        case let value?: execution = UInt32(value).map { .adaptive(largeRequestBytes: $0) } ?? .default
        case nil: execution = .default
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let directory = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let device = MemoryBlockDevice(sizeBytes: size)
        let server = NBDServer(
            configuration: NBDServerConfiguration(unixSocketPath: directory + "/vd.sock", deviceExecution: execution),
            exports: NBDStaticExportProvider([NBDExport(name: "bench", device: device)]), eventLoopGroup: group,
            logger: testLogger)
        try await server.start()

        guard let nbdkit = findTool("nbdkit") else {
            throw ToolFailure(description: "'nbdkit' is not installed: run `apt-get install -y nbdkit`")
        }
        let kit = Process()
        kit.executableURL = URL(fileURLWithPath: nbdkit)
        kit.arguments = ["-f", "-U", directory + "/kit.sock", "memory", "\(size)"]
        // Not the test's own stdout: `swift test` waits for every holder of that pipe to close it.
        kit.standardOutput = FileHandle.nullDevice
        kit.standardError = FileHandle.nullDevice
        try kit.run()
        defer {
            kill(kit.processIdentifier, SIGKILL)  // nbdkit started from here does not always honour SIGTERM
            kit.waitUntilExit()
        }
        while !FileManager.default.fileExists(atPath: directory + "/kit.sock") {
            try await Task.sleep(for: .milliseconds(20))
        }

        var report = "NBD benchmark (\(seconds) s per run, \(execution)):\n"
        for workload in Self.workloads where selected.contains(workload.name) {
            let ours = try await fio(
                uri: "nbd+unix:///bench?socket=\(directory)/vd.sock", workload, seconds: seconds, in: directory)
            let theirs = try await fio(
                uri: "nbd+unix:///?socket=\(directory)/kit.sock", workload, seconds: seconds, in: directory)
            let line = String(
                format: "  %-20@ NBDServer %8.0f IOPS %7.1f MB/s | nbdkit memory %8.0f IOPS %7.1f MB/s | ratio %.2f\n",
                workload.name, ours.iops, ours.bandwidth / 1e6, theirs.iops, theirs.bandwidth / 1e6,
                ours.iops / theirs.iops)
            report += line
            #expect(ours.iops > 0)
        }
        print(report)
        await server.stop()
        try await group.shutdownGracefully()
    }

    private func fio(
        uri: String, _ workload: Workload, seconds: Int, in directory: String
    ) async throws -> (iops: Double, bandwidth: Double) {
        let output = try await runTool(
            "fio",
            [
                "--name=\(workload.name)", "--ioengine=nbd", "--uri=\(uri)", "--size=1g", "--time_based",
                "--runtime=\(seconds)", "--output-format=json", "--randrepeat=0",
            ] + workload.arguments,
            package: "fio", timeout: .seconds(seconds + 60), currentDirectory: directory)
        guard let start = output.firstIndex(of: "{"),
            let json = try JSONSerialization.jsonObject(with: Data(output[start...].utf8)) as? [String: Any],
            let job = (json["jobs"] as? [[String: Any]])?.first
        else { throw ToolFailure(description: "cannot parse fio output: \(output)") }
        let side = (workload.arguments.contains { $0.contains("read") && !$0.contains("write") }) ? "read" : "write"
        let stats = job[side] as? [String: Any] ?? [:]
        return ((stats["iops"] as? Double) ?? 0, Double((stats["bw_bytes"] as? Int) ?? 0))
    }
}
