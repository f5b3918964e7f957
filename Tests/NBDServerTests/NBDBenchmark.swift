// A benchmark, not a test: fio (ioengine=nbd) against NBDServer + MemoryBlockDevice and against
// `nbdkit memory` in the same run, printing IOPS and the ratio. Off unless NBD_BENCH_SECONDS is set; run it on a
// release build:
//
//   NBD_BENCH_SECONDS=10 swift test -c release -Xswiftc -enable-testing --filter NBDBenchmark
//
// NBD_BENCH_DEVICE=null compares protocol handling alone (nbdkit's null plugin); NBD_BENCH_QEMU=1 adds qemu-nbd on
// a /dev/shm file; NBD_BENCH_ROUNDS sets the rounds (medians are reported); NBD_BENCH_JOBS picks the workloads
// (comma-separated names below); NBD_BENCH_EXECUTION picks where device commands run: `loop`, `global`, or a byte
// threshold for `.adaptive` (default: NBDDeviceExecution.default).

import Foundation
import NBDServer
import NIOCore
import NIOPosix
import Testing
import VolumeCore
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

        // NBD_BENCH_DEVICE=null compares protocol handling alone: a device that drops writes and reads zeroes
        // against nbdkit's null plugin.
        let nullDevice = ProcessInfo.processInfo.environment["NBD_BENCH_DEVICE"] == "null"
        let device: any BlockDevice = nullDevice ? NullBlockDevice(sizeBytes: size) : MemoryBlockDevice(sizeBytes: size)
        let server = NBDServer(
            configuration: NBDServerConfiguration(unixSocketPath: directory + "/vd.sock", deviceExecution: execution),
            exports: NBDStaticExportProvider([NBDExport(name: "bench", device: device)]), eventLoopGroup: group,
            logger: testLogger)
        try await server.start()

        guard let nbdkit = findTool("nbdkit") else {
            throw ToolFailure(description: "'nbdkit' is not installed: run `apt-get install -y nbdkit`")
        }
        let plugin = nullDevice ? "null" : "memory"
        let kit = Process()
        kit.executableURL = URL(fileURLWithPath: nbdkit)
        kit.arguments = ["-f", "-U", directory + "/kit.sock", plugin, "\(size)"]
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

        // NBD_BENCH_QEMU=1 adds qemu-nbd serving a sparse raw file in /dev/shm (memory-backed, like the others).
        var qemu: Process?
        let shmFile = "/dev/shm/nbd-bench-\(ProcessInfo.processInfo.processIdentifier).raw"
        if ProcessInfo.processInfo.environment["NBD_BENCH_QEMU"] != nil {
            guard let qemuNBD = findTool("qemu-nbd") else {
                throw ToolFailure(description: "'qemu-nbd' is not installed: run `apt-get install -y qemu-utils`")
            }
            #expect(FileManager.default.createFile(atPath: shmFile, contents: nil))
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: shmFile))
            try handle.truncate(atOffset: size)
            try handle.close()
            let process = Process()
            process.executableURL = URL(fileURLWithPath: qemuNBD)
            process.arguments = [
                "-k", directory + "/qemu.sock", "-f", "raw", "--cache=writeback", "--aio=threads", "-t", "-e", "8",
                shmFile,
            ]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            qemu = process
            while !FileManager.default.fileExists(atPath: directory + "/qemu.sock") {
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        defer {
            if let qemu {
                kill(qemu.processIdentifier, SIGKILL)
                qemu.waitUntilExit()
                try? FileManager.default.removeItem(atPath: shmFile)
            }
        }

        // Alternate the servers for several rounds and report medians: the machine may be shared and noisy.
        let rounds = ProcessInfo.processInfo.environment["NBD_BENCH_ROUNDS"].flatMap { Int($0) } ?? 3
        var report = "NBD benchmark (\(rounds) rounds of \(seconds) s, \(execution), \(plugin) device), medians:\n"
        for workload in Self.workloads where selected.contains(workload.name) {
            var ours: [(iops: Double, bandwidth: Double)] = []
            var theirs: [(iops: Double, bandwidth: Double)] = []
            var qemus: [(iops: Double, bandwidth: Double)] = []
            for _ in 0..<rounds {
                ours.append(
                    try await fio(
                        uri: "nbd+unix:///bench?socket=\(directory)/vd.sock", workload, seconds: seconds, in: directory)
                )
                theirs.append(
                    try await fio(
                        uri: "nbd+unix:///?socket=\(directory)/kit.sock", workload, seconds: seconds, in: directory))
                if qemu != nil {
                    qemus.append(
                        try await fio(
                            uri: "nbd+unix:///?socket=\(directory)/qemu.sock", workload, seconds: seconds, in: directory
                        ))
                }
            }
            func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }
            if !qemus.isEmpty {
                let qemuIOPS = median(qemus.map(\.iops))
                report += String(
                    format: "  %-18@ qemu-nbd (/dev/shm) %8.0f IOPS | NBDServer/qemu-nbd ratio %.2f  (qemu-nbd %@)\n",
                    workload.name, qemuIOPS, median(ours.map(\.iops)) / qemuIOPS,
                    qemus.map { String(format: "%.0f", $0.iops) }.joined(separator: " "))
            }
            let oursIOPS = median(ours.map(\.iops))
            let theirsIOPS = median(theirs.map(\.iops))
            report += String(
                format: "  %-18@ NBDServer %8.0f IOPS %7.1f MB/s | nbdkit %-6@ %8.0f IOPS %7.1f MB/s | ratio %.2f"
                    + "  (ours %@; nbdkit %@)\n",
                workload.name, oursIOPS, median(ours.map(\.bandwidth)) / 1e6, plugin, theirsIOPS,
                median(theirs.map(\.bandwidth)) / 1e6, oursIOPS / theirsIOPS,
                ours.map { String(format: "%.0f", $0.iops) }.joined(separator: " "),
                theirs.map { String(format: "%.0f", $0.iops) }.joined(separator: " "))
            #expect(oursIOPS > 0)
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

/// Drops writes and reads zeroes: the cost of the protocol alone.
private final class NullBlockDevice: BlockDevice {
    let info: BlockDeviceInfo
    private let zeroes: ByteBuffer

    init(sizeBytes: UInt64) {
        info = BlockDeviceInfo(sizeBytes: sizeBytes, preferredBlockSizeBytes: 4096)
        zeroes = ByteBuffer(repeating: 0, count: 1 << 20)
    }

    func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
        if length <= zeroes.readableBytes { return zeroes.getSlice(at: 0, length: Int(length))! }
        return ByteBuffer(repeating: 0, count: Int(length))
    }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {}
    func flush() async throws(VDError) {}
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError) {}
    func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {}
    func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] {
        [BlockExtent(lengthBytes: UInt64(length), isHole: true, isZero: true)]
    }
}
