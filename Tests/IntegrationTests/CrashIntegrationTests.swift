// Crash consistency through real clients: fio writes with periodic flushes, vd serve is killed with SIGKILL at a
// random moment, restarted, and every write fio saw completed must be there (FioCrashCheck, from fio's own logs: fio
// 3.33's verify state cannot tell the writes in flight at the crash from completed ones). Then the local flash is
// deleted and the volume restarts from the backend alone.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct CrashIntegrationTests {
    /// fio's write job: verify headers in every block, a flush every 8 writes, the issued writes in `issued.log` and
    /// the completed ones in `done_clat.1.log`, killing vd serve after `killAfter` seconds.
    func writeJob(uri: String, seed: Int, killCommand: String, killAfter: Int) -> [String] {
        [
            "--name=crash", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bssplit=4k/60:16k/20:64k/20",
            "--size=96M", "--iodepth=16", "--verify=crc32c", "--do_verify=0", "--fsync=8", "--randseed=\(seed)",
            "--time_based", "--runtime=60", "--write_iolog=issued.log", "--write_lat_log=done", "--log_offset=1",
            "--trigger-timeout=\(killAfter)", "--trigger=\(killCommand)",
        ]
    }

    @Test(arguments: [11, 23, 37])
    func killNineThenVerify(seed: Int) throws {
        let directory = try TemporaryDirectory("vd-crash")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", "128M"]).succeeded)
        try server.start()
        defer { _ = try? server.stop() }
        var generator = SystemRandomNumberGenerator()
        let killAfter = Int.random(in: 2...5, using: &generator)
        let written = try ProcessRunner.run(
            "fio",
            writeJob(uri: server.uri("vol1"), seed: seed, killCommand: "kill -9 \(server.pid)", killAfter: killAfter),
            currentDirectory: directory.path)
        // fio loses its server mid-job: its exit status is an error, but it wrote its logs.
        let check = try FioCrashCheck(
            iolog: String(contentsOfFile: directory.path + "/issued.log", encoding: .utf8),
            completionLog: String(contentsOfFile: directory.path + "/done_clat.1.log", encoding: .utf8))
        try server.start()
        let image = directory.path + "/image.raw"
        let copied = try ProcessRunner.run("nbdcopy", [server.uri("vol1"), image])
        try #require(copied.succeeded, "nbdcopy: \(copied.error)")
        let outcome = check.check(image: try Data(contentsOf: URL(fileURLWithPath: image)))
        let summary =
            "seed \(seed), killed after \(killAfter) s: \(check.issued.count) writes issued, "
            + "\(check.completed.filter { $0 }.count) completed; \(outcome.writtenBlocks) written blocks checked, "
            + "\(outcome.undeterminedBlocks) blocks under writes in flight skipped"
        #expect(
            outcome.writtenBlocks >= 256,
            "too little was written before the kill to check anything: \(summary)\n\(written.output)")
        #expect(outcome.failures.isEmpty, "\(summary)\n\(outcome.failures.prefix(20).joined(separator: "\n"))")
    }

    /// The check above is not vacuous: when the writes really are lost (the local flash is deleted after the kill,
    /// before anything reached the backend), it reports them.
    @Test func theCrashCheckReportsLostWrites() throws {
        let directory = try TemporaryDirectory("vd-crash-lost")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", "128M"]).succeeded)
        try server.start()
        defer { _ = try? server.stop() }
        _ = try ProcessRunner.run(
            "fio", writeJob(uri: server.uri("vol1"), seed: 5, killCommand: "kill -9 \(server.pid)", killAfter: 2),
            currentDirectory: directory.path)
        let check = try FioCrashCheck(
            iolog: String(contentsOfFile: directory.path + "/issued.log", encoding: .utf8),
            completionLog: String(contentsOfFile: directory.path + "/done_clat.1.log", encoding: .utf8))
        try FileManager.default.removeItem(atPath: directory.path + "/data/flash")
        try server.start()
        let image = directory.path + "/image.raw"
        try #require(try ProcessRunner.run("nbdcopy", [server.uri("vol1"), image]).succeeded)
        let outcome = check.check(image: try Data(contentsOf: URL(fileURLWithPath: image)))
        #expect(outcome.writtenBlocks >= 256)
        // What reached the backend before the kill survives; the open journal's writes are gone.
        #expect(!outcome.failures.isEmpty, "no loss reported among \(outcome.writtenBlocks) written blocks")
    }

    @Test func restartFromTheBackendAloneAfterLosingFlash() throws {
        let directory = try TemporaryDirectory("vd-restore")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", "128M"]).succeeded)
        try server.start()
        let written = try ProcessRunner.run(
            "fio",
            [
                "--name=restore", "--ioengine=nbd", "--uri=\(server.uri("vol1"))", "--rw=randwrite", "--bs=16k",
                "--size=96M", "--io_size=48M", "--iodepth=16", "--verify=crc32c", "--do_verify=0",
                "--verify_state_save=1",
            ], currentDirectory: directory.path)
        #expect(written.succeeded, "\(written.error)")
        // A clean stop uploads everything; then the local flash is lost.
        #expect(try server.stop() == 0)
        try FileManager.default.removeItem(atPath: directory.path + "/data/flash")
        try server.start()
        let verified = try ProcessRunner.run(
            "fio",
            [
                "--name=restore", "--ioengine=nbd", "--uri=\(server.uri("vol1"))", "--rw=randwrite", "--bs=16k",
                "--size=96M", "--io_size=48M", "--iodepth=16", "--verify=crc32c", "--verify_only",
                "--verify_state_load=1",
                "--verify_fatal=1",
            ], currentDirectory: directory.path)
        #expect(verified.succeeded, "\(verified.output)\(verified.error)")
        _ = try? server.stop()
    }

    @Test func afterKillAndFlashLossTheBackendPrefixSurvives() throws {
        let directory = try TemporaryDirectory("vd-prefix")
        defer { directory.remove() }
        // Seal every second so data reaches the backend quickly.
        let config = directory.path + "/vd.toml"
        try "[upload]\nmax_age_seconds = 1\n".write(toFile: config, atomically: true, encoding: .utf8)
        let server = try VDServer(dataDirectory: directory.path + "/data", extraArguments: ["--config", config])
        #expect(try server.cli(["volume", "create", "vol1", "--size", "64M", "--config", config]).succeeded)
        try server.start()
        let uri = server.uri("vol1")
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0x41 0 4M", uri]).succeeded)
        // Wait until that write's TLog is on the backend.
        let tlogDirectory = directory.path + "/data/backend/vol1/tlog"
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, ((try? FileManager.default.contentsOfDirectory(atPath: tlogDirectory)) ?? []).isEmpty {
            usleep(100_000)
        }
        #expect(!((try? FileManager.default.contentsOfDirectory(atPath: tlogDirectory)) ?? []).isEmpty)
        // A second write, then an immediate kill and loss of the local flash.
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0x42 8M 1M", uri]).succeeded)
        server.kill9()
        try FileManager.default.removeItem(atPath: directory.path + "/data/flash")
        try server.start()
        defer { _ = try? server.stop() }
        let first = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "read -P 0x41 0 4M", uri])
        #expect(first.succeeded && !first.output.contains("failed"), "\(first.output)")
        // The second write is all there or not at all (prefix consistency); never a mix or garbage.
        let newer = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "read -P 0x42 8M 1M", uri])
        let older = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "read -P 0 8M 1M", uri])
        let newerOK = newer.succeeded && !newer.output.contains("failed")
        let olderOK = older.succeeded && !older.output.contains("failed")
        #expect(newerOK != olderOK, "second write is neither fully present nor fully absent")
    }
}
