// vd scrub and vd check against a running router: space comes back, nothing readable changes, and killing the
// scrubber or the router at any step loses nothing and leaks nothing for good.

import Foundation
import Testing
import VolumeCore
import VolumeTesting

@Suite(.serialized) struct ScrubIntegrationTests {
    struct Setup {
        let directory: TemporaryDirectory
        let config: String
        let server: VDServer

        init(routerEnvironment: [String: String] = [:]) throws {
            directory = try TemporaryDirectory("vd-scrub")
            config = directory.path + "/vd.toml"
            try """
            [sco]
            size = "1M"
            [upload]
            max_age_seconds = 1
            max_pending = "16M"
            [cache]
            size = "64M"
            [scrub]
            poll_seconds = 1
            delete_grace_seconds = 0.5
            """.write(toFile: config, atomically: true, encoding: .utf8)
            server = try VDServer(
                dataDirectory: directory.path + "/data", extraArguments: ["--config", config], environment: routerEnvironment)
            #expect(try server.cli(["volume", "create", "vol1", "--size", "32M", "--config", config]).succeeded)
            try server.start()
        }

        func vd(_ arguments: [String], environment: [String: String] = [:]) throws -> ProcessResult {
            try ProcessRunner.run(
                server.binary, arguments + ["--data-dir", server.dataDirectory, "--config", config], environment: environment)
        }

        func io(_ export: String, _ commands: [String]) throws -> Bool {
            var arguments = ["-f", "raw"]
            if export.contains("@") { arguments.append("-r") }
            for command in commands { arguments += ["-c", command] }
            let result = try ProcessRunner.run("qemu-io", arguments + [server.uri(export)])
            return result.succeeded && !result.output.contains("failed")
        }

        /// CRC32C of every MiB of an export, as a fingerprint of its content.
        func fingerprint(_ export: String) throws -> [UInt32] {
            let client = try NBDTestClient(socketPath: server.socketPath, export: export)
            defer { client.disconnect() }
            return try stride(from: 0, to: Int(client.sizeBytes), by: 1 << 20).map {
                CRC32C.checksum(try client.read(offset: UInt64($0), length: 1 << 20))
            }
        }

        var backendSCOBytes: UInt64 {
            let directory = server.dataDirectory + "/backend/vol1/sco"
            return ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).reduce(0) { total, name in
                let size = (try? FileManager.default.attributesOfItem(atPath: directory + "/" + name)[.size] as? NSNumber)??.uint64Value ?? 0
                return total + size
            }
        }

        /// Waits until every scrub result is applied and its sources are gone (vd check clean).
        func waitUntilScrubSettles(timeoutSeconds: Double = 60) throws -> ProcessResult {
            let deadline = Date().addingTimeInterval(timeoutSeconds)
            var last = ProcessResult(status: 1, output: "", error: "")
            while Date() < deadline {
                let results = (try? FileManager.default.contentsOfDirectory(atPath: server.dataDirectory + "/backend/vol1/scrub")) ?? []
                let ids = results.filter { !$0.hasSuffix(".applied") }
                let applied = results.filter { $0.hasSuffix(".applied") }
                if ids.count == applied.count {
                    last = try vd(["check", "vol1"])
                    if last.succeeded { return last }
                }
                Thread.sleep(forTimeInterval: 0.5)
            }
            return last
        }

        func finish() {
            _ = try? server.stop()
            directory.remove()
        }
    }

    /// Creates 8 MiB of garbage: data overwritten after a snapshot that is then deleted.
    func makeGarbage(_ s: Setup, round: Int) throws {
        #expect(try s.io("vol1", ["write -P \(0x40 + round) 16M 8M"]))
        #expect(try s.vd(["snapshot", "create", "vol1", "g\(round)"]).succeeded)
        #expect(try s.io("vol1", ["write -P \(0x60 + round) 16M 8M"]))
        #expect(try s.vd(["snapshot", "delete", "vol1", "g\(round)"]).succeeded)
        Thread.sleep(forTimeInterval: 2.5)  // sealed and uploaded (max_age_seconds = 1)
    }

    @Test func scrubGivesSpaceBackAndChangesNothingReadable() throws {
        let s = try Setup()
        defer { s.finish() }
        #expect(try s.io("vol1", ["write -P 0x11 0 16M"]))
        #expect(try s.vd(["snapshot", "create", "vol1", "base"]).succeeded)
        #expect(try s.vd(["clone", "create", "vol1@base", "c1"]).succeeded)
        #expect(try s.io("c1", ["write -P 0x22 4M 2M"]))
        try makeGarbage(s, round: 1)
        try makeGarbage(s, round: 2)
        let before = (vol: try s.fingerprint("vol1"), base: try s.fingerprint("vol1@base"), clone: try s.fingerprint("c1"))
        let stored = s.backendSCOBytes
        let scrub = try s.vd(["scrub", "--volume", "vol1", "--json"])
        #expect(scrub.succeeded, "\(scrub.output)\(scrub.error)")
        let check = try s.waitUntilScrubSettles()
        #expect(check.succeeded, "\(check.output)\(check.error)")
        let reclaimed = stored - s.backendSCOBytes
        // Round 1 leaves its first 8 MiB dead; round 2 overwrites round 1's second 8 MiB (dead too) and leaves its
        // own first 8 MiB dead: 24 MiB of garbage (plus a few KiB of SCO headers).
        let garbage: UInt64 = 24 << 20
        let ratio = Double(reclaimed) / Double(garbage)
        print("scrub reclaimed \(reclaimed) bytes for \(garbage) bytes of garbage: ratio \(String(format: "%.2f", ratio))")
        #expect(ratio > 0.9 && ratio < 1.1, "reclaimed \(reclaimed) for \(garbage)")
        #expect(try s.fingerprint("vol1") == before.vol)
        #expect(try s.fingerprint("vol1@base") == before.base)
        #expect(try s.fingerprint("c1") == before.clone)
        // Restart from the backend alone: same content, snapshots and clone included.
        #expect(try s.server.stop() == 0)
        try FileManager.default.removeItem(atPath: s.server.dataDirectory + "/flash")
        try s.server.start()
        #expect(try s.fingerprint("vol1") == before.vol)
        #expect(try s.fingerprint("vol1@base") == before.base)
        #expect(try s.fingerprint("c1") == before.clone)
        #expect(try s.vd(["check", "vol1"]).succeeded)
    }

    @Test func scrubUnderWriteLoadAndCloneReads() throws {
        let s = try Setup()
        defer { s.finish() }
        #expect(try s.io("vol1", ["write -P 0x11 0 32M"]))
        #expect(try s.vd(["snapshot", "create", "vol1", "base"]).succeeded)
        #expect(try s.vd(["clone", "create", "vol1@base", "c1"]).succeeded)
        let cloneBefore = try s.fingerprint("c1")
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: try ProcessRunner.which("fio"))
        fio.arguments = [
            "--name=load", "--ioengine=nbd", "--uri=\(s.server.uri("vol1"))", "--rw=randwrite", "--bs=4k", "--size=24M",
            "--io_size=48M", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--thread",
        ]
        let output = Pipe()
        fio.standardOutput = output
        fio.standardError = output
        fio.currentDirectoryURL = URL(fileURLWithPath: s.directory.path)
        try fio.run()
        var scrubs = 0
        while fio.isRunning {
            // Old versions only the deleted snapshots read become garbage as fio overwrites them.
            _ = try s.vd(["snapshot", "create", "vol1", "t\(scrubs)"])
            _ = try s.vd(["snapshot", "delete", "vol1", "t\(scrubs)"])
            let scrub = try s.vd(["scrub", "--volume", "vol1", "--threshold", "0.9"])
            #expect(scrub.succeeded, "\(scrub.error)")
            #expect(try s.fingerprint("c1") == cloneBefore)
            scrubs += 1
        }
        fio.waitUntilExit()
        let log = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(fio.terminationStatus == 0, "\(log)")
        #expect(!log.contains("verify: bad"))
        #expect(scrubs > 0)
        let check = try s.waitUntilScrubSettles()
        #expect(check.succeeded, "\(check.output)\(check.error)")
        #expect(try s.fingerprint("c1") == cloneBefore)
    }

    @Test(arguments: ["after-lease", "after-replay", "after-sco-upload", "before-result", "after-result"])
    func killingTheScrubberLosesAndLeaksNothing(failpoint: String) throws {
        let s = try Setup()
        defer { s.finish() }
        #expect(try s.io("vol1", ["write -P 0x11 0 16M"]))
        // Half-live SCOs, so the scrub copies (and can be killed while uploading).
        #expect(try s.vd(["snapshot", "create", "vol1", "keep"]).succeeded)
        #expect(try s.io("vol1", ["write -P 0x12 0 16M"]))
        for offset in stride(from: 0, to: 16, by: 2) { #expect(try s.io("vol1", ["write -P 0x13 \(offset)M 1M"])) }
        #expect(try s.vd(["snapshot", "delete", "vol1", "keep"]).succeeded)
        Thread.sleep(forTimeInterval: 2.5)
        let before = try s.fingerprint("vol1")
        let killed = try s.vd(["scrub", "--volume", "vol1", "--threshold", "0.9"], environment: ["VD_FAILPOINT": failpoint])
        #expect(!killed.succeeded, "the scrubber was not killed at \(failpoint)")
        // The dead scrubber's lease names a process of this host that is gone: the rerun takes it over.
        let rerun = try s.vd(["scrub", "--volume", "vol1", "--threshold", "0.9"])
        #expect(rerun.succeeded, "\(rerun.output)\(rerun.error)")
        let check = try s.waitUntilScrubSettles()
        #expect(check.succeeded, "after \(failpoint): \(check.output)\(check.error)")
        #expect(!check.output.contains("orphan"), "\(check.output)")
        #expect(try s.fingerprint("vol1") == before)
    }

    @Test(arguments: ["router-scrub-after-entry", "router-scrub-after-marker", "router-scrub-mid-delete"])
    func killingTheRouterWhileApplyingIsRepaired(failpoint: String) throws {
        let s = try Setup(routerEnvironment: ["VD_FAILPOINT": failpoint])
        defer { s.finish() }
        #expect(try s.io("vol1", ["write -P 0x11 0 16M"]))
        try makeGarbage(s, round: 1)
        let before = try s.fingerprint("vol1")
        #expect(try s.vd(["scrub", "--volume", "vol1"]).succeeded)
        // The router applies the result and dies at the failpoint.
        let deadline = Date().addingTimeInterval(30)
        while s.server.process?.isRunning == true && Date() < deadline { Thread.sleep(forTimeInterval: 0.2) }
        #expect(s.server.process?.isRunning == false, "the router did not reach \(failpoint)")
        // Restart without the failpoint: the next pass repairs whatever was left half done.
        let restarted = try VDServer(
            dataDirectory: s.server.dataDirectory, extraArguments: ["--config", s.config])
        try restarted.start()
        defer { _ = try? restarted.stop() }
        let check = try s.waitUntilScrubSettles()
        #expect(check.succeeded, "after \(failpoint): \(check.output)\(check.error)")
        let after = try NBDTestClient(socketPath: restarted.socketPath, export: "vol1")
        var fingerprint: [UInt32] = []
        for offset in stride(from: 0, to: Int(after.sizeBytes), by: 1 << 20) {
            fingerprint.append(CRC32C.checksum(try after.read(offset: UInt64(offset), length: 1 << 20)))
        }
        #expect(fingerprint == before)
    }
}
