// Crash consistency through real clients: fio writes with periodic flushes and saves its verify state, vd serve is
// killed with SIGKILL at a random moment, restarted, and fio verifies every write it saw completed. Then the local
// flash is deleted and the volume restarts from the backend alone.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct CrashIntegrationTests {
    /// fio's write job: verify state saved, a flush every 8 writes, killing vd serve after `killAfter` seconds.
    func writeJob(uri: String, seed: Int, killCommand: String?, killAfter: Int) -> [String] {
        var arguments = [
            "--name=crash", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bssplit=4k/60:16k/20:64k/20",
            "--size=96M", "--iodepth=16", "--verify=crc32c", "--do_verify=0", "--verify_state_save=1", "--fsync=8",
            "--randseed=\(seed)", "--time_based", "--runtime=60",
        ]
        if let killCommand { arguments += ["--trigger-timeout=\(killAfter)", "--trigger=\(killCommand)"] }
        return arguments
    }

    func verifyJob(uri: String, seed: Int) -> [String] {
        [
            "--name=crash", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bssplit=4k/60:16k/20:64k/20",
            "--size=96M", "--iodepth=16", "--verify=crc32c", "--verify_only", "--verify_state_load=1",
            "--randseed=\(seed)", "--verify_fatal=1",
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
            "fio", writeJob(uri: server.uri("vol1"), seed: seed, killCommand: "kill -9 \(server.pid)", killAfter: killAfter),
            currentDirectory: directory.path)
        // fio loses its server mid-job: its exit status is an error, but it saved the verify state.
        #expect(FileManager.default.fileExists(atPath: directory.path + "/local-crash-0-verify.state"), "\(written.output)")
        try server.start()
        let verified = try ProcessRunner.run("fio", verifyJob(uri: server.uri("vol1"), seed: seed), currentDirectory: directory.path)
        #expect(verified.succeeded, "seed \(seed), killed after \(killAfter) s:\n\(verified.output)\(verified.error)")
        #expect(!verified.output.contains("verify: bad"))
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
                "--size=96M", "--io_size=48M", "--iodepth=16", "--verify=crc32c", "--do_verify=0", "--verify_state_save=1",
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
                "--size=96M", "--io_size=48M", "--iodepth=16", "--verify=crc32c", "--verify_only", "--verify_state_load=1",
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
