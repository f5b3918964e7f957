// Snapshots, rollback and clones through the real router, its management API and real NBD clients.

import Foundation
import Testing
import VolumeTesting

/// A deterministic writer with an exact client-side model: writes 64 KiB blocks at queue depth 1 into a region and
/// records them in order, so the content after any number of completed writes can be rebuilt.
final class ModelWriter: @unchecked Sendable {
    static let blockBytes = 64 << 10
    let regionStart: UInt64
    let regionBytes: Int
    private let lock = NSLock()
    private var writes: [(offset: Int, seed: UInt64)] = []
    private var stopRequested = false
    private var failure: String?
    private let done = DispatchSemaphore(value: 0)

    init(regionStart: UInt64, regionBytes: Int) {
        self.regionStart = regionStart
        self.regionBytes = regionBytes
    }

    static func block(seed: UInt64) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        var words = [UInt64](repeating: 0, count: blockBytes / 8)
        for i in 0..<words.count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            words[i] = state
        }
        return words.withUnsafeBytes { Array($0) }
    }

    var completed: Int {
        lock.lock()
        defer { lock.unlock() }
        return writes.count
    }

    func start(socketPath: String, export: String) {
        Thread.detachNewThread { [self] in
            defer { done.signal() }
            do {
                let client = try NBDTestClient(socketPath: socketPath, export: export)
                var seed: UInt64 = 1
                while true {
                    lock.lock()
                    let stop = stopRequested
                    lock.unlock()
                    if stop { break }
                    let offset = Int(seed &* 7919 % UInt64(regionBytes / Self.blockBytes)) * Self.blockBytes
                    try client.write(offset: regionStart + UInt64(offset), Self.block(seed: seed))
                    lock.lock()
                    writes.append((offset, seed))
                    lock.unlock()
                    seed += 1
                    usleep(2_000)  // a steady trickle: the model is checked for every write a snapshot call spans
                }
                client.disconnect()
            } catch {
                lock.lock()
                failure = "\(error)"
                lock.unlock()
            }
        }
    }

    /// Stops the writer; returns its error, if any.
    func stop() -> String? {
        lock.lock()
        stopRequested = true
        lock.unlock()
        done.wait()
        lock.lock()
        defer { lock.unlock() }
        return failure
    }

    /// The region's content after the first `count` writes, built on `model` (which holds the first `from`).
    func advance(_ model: inout [UInt8], from: Int, to count: Int) {
        lock.lock()
        let slice = Array(writes[from..<count])
        lock.unlock()
        for write in slice {
            model.replaceSubrange(write.offset..<(write.offset + Self.blockBytes), with: Self.block(seed: write.seed))
        }
    }
}

@Suite(.serialized) struct SnapshotIntegrationTests {
    func sha256(_ path: String) throws -> String {
        try ProcessRunner.run("sha256sum", [path]).output.split(separator: " ").first.map(String.init) ?? ""
    }

    /// Copies an export to a file with nbdcopy.
    func copyExport(_ uri: String, to path: String) throws {
        let copied = try ProcessRunner.run("nbdcopy", [uri, path])
        #expect(copied.succeeded, "\(copied.error)")
    }

    @Test func snapshotsUnderWriteLoadAreStableAndMatchTheModel() throws {
        let directory = try TemporaryDirectory("vd-snap")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", "24M"]).succeeded)
        try server.start()
        defer { _ = try? server.stop() }
        // fio keeps writing [0, 12 MiB); the model writer owns [12 MiB, 20 MiB).
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: try ProcessRunner.which("fio"))
        fio.arguments = [
            "--name=load", "--ioengine=nbd", "--uri=\(server.uri("vol1"))", "--rw=randwrite", "--bssplit=4k/50:64k/50",
            "--size=12M", "--iodepth=8", "--time_based", "--runtime=300", "--rate=4m", "--thread",
        ]
        fio.standardOutput = FileHandle.nullDevice
        fio.standardError = FileHandle.nullDevice
        try fio.run()
        // fio does not stop on SIGTERM inside the nbd engine: the load generator (one process: --thread) is killed.
        defer { if fio.isRunning { kill(fio.processIdentifier, SIGKILL) } }
        let writer = ModelWriter(regionStart: 12 << 20, regionBytes: 8 << 20)
        writer.start(socketPath: server.socketPath, export: "vol1")
        var model = [UInt8](repeating: 0, count: 8 << 20)
        var modelCount = 0
        var hashes: [(String, String)] = []
        var generator = SystemRandomNumberGenerator()
        for index in 0..<20 {
            Thread.sleep(forTimeInterval: Double.random(in: 1...4, using: &generator))
            let before = writer.completed
            let created = try server.cli(["snapshot", "create", "vol1", "s\(index)"])
            let after = writer.completed
            #expect(created.succeeded, "\(created.error)")
            let file = directory.path + "/s\(index).raw"
            try copyExport(server.uri("vol1@s\(index)"), to: file)
            hashes.append(("s\(index)", try sha256(file)))
            // The model region equals the model after k writes, for some k the snapshot call spanned.
            let data = try Data(contentsOf: URL(fileURLWithPath: file))
            let region = [UInt8](data[(12 << 20)..<(20 << 20)])
            writer.advance(&model, from: modelCount, to: before)
            modelCount = before
            var candidate = model
            func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
                a.count == b.count && a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
            }
            var matched = same(candidate, region)
            var k = before
            while !matched && k < after {
                writer.advance(&candidate, from: k, to: k + 1)
                k += 1
                matched = same(candidate, region)
            }
            #expect(matched, "snapshot s\(index) does not match the model after \(before)...\(after) writes")
            try FileManager.default.removeItem(atPath: file)
        }
        #expect(writer.stop() == nil)
        kill(fio.processIdentifier, SIGKILL)
        fio.waitUntilExit()
        // Hash every snapshot again at the end: unchanged.
        for (name, hash) in hashes {
            let file = directory.path + "/\(name).again.raw"
            try copyExport(server.uri("vol1@\(name)"), to: file)
            #expect(try sha256(file) == hash, "snapshot \(name) changed")
            try FileManager.default.removeItem(atPath: file)
        }
        let listed = try server.cli(["snapshot", "list", "vol1", "--json"])
        #expect(listed.output.components(separatedBy: "\"name\"").count - 1 == 20)
    }

    @Test func rollbackRefusesConnectedClientsAndSurvivesRestart() throws {
        let directory = try TemporaryDirectory("vd-rb")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", "32M"]).succeeded)
        try server.start()
        let uri = server.uri("vol1")
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0xaa 0 8M", uri]).succeeded)
        #expect(try server.cli(["snapshot", "create", "vol1", "good"]).succeeded)
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0xbb 4M 8M", uri]).succeeded)
        #expect(try server.cli(["snapshot", "create", "vol1", "later"]).succeeded)
        // A connected client blocks the rollback; the message says so and what to do.
        let client = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        let refused = try server.cli(["snapshot", "rollback", "vol1", "good"])
        #expect(!refused.succeeded)
        #expect(refused.error.contains("NBD client(s) connected") && refused.error.contains("--force"), "\(refused.error)")
        let forced = try server.cli(["snapshot", "rollback", "vol1", "good", "--force"])
        #expect(forced.succeeded, "\(forced.error)")
        #expect(throws: (any Error).self) { _ = try client.read(offset: 0, length: 4096) }
        let check = ["-f", "raw", "-c", "read -P 0xaa 0 8M", "-c", "read -P 0 8M 24M", uri]
        let read = try ProcessRunner.run("qemu-io", check)
        #expect(read.succeeded && !read.output.contains("failed"), "\(read.output)")
        let snapshots = try server.cli(["snapshot", "list", "vol1"])
        #expect(snapshots.output.contains("good") && !snapshots.output.contains("later"))
        // kill -9 and restart: still rolled back.
        server.kill9()
        try server.start()
        defer { _ = try? server.stop() }
        let again = try ProcessRunner.run("qemu-io", check)
        #expect(again.succeeded && !again.output.contains("failed"), "\(again.output)")
    }

    @Test func clonesAreIsolatedNestAndSurviveCrashAndBackendRestart() throws {
        let directory = try TemporaryDirectory("vd-clone")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "golden", "--size", "32M"]).succeeded)
        try server.start()
        func io(_ export: String, _ commands: [String], readOnly: Bool = false) throws -> Bool {
            var arguments = ["-f", "raw"]
            if readOnly { arguments.append("-r") }
            for command in commands { arguments += ["-c", command] }
            let result = try ProcessRunner.run("qemu-io", arguments + [server.uri(export)])
            return result.succeeded && !result.output.contains("failed")
        }
        #expect(try io("golden", ["write -P 0x10 0 16M"]))
        #expect(try server.cli(["snapshot", "create", "golden", "base"]).succeeded)
        let started = Date()
        let clone = try server.cli(["clone", "create", "golden@base", "vm1"])
        #expect(clone.succeeded, "\(clone.error)")
        #expect(Date().timeIntervalSince(started) < 5)
        #expect(try io("vm1", ["read -P 0x10 0 16M", "read -P 0 16M 16M"]))
        // Parent writes after the snapshot stay out of the clone; clone writes stay out of the parent.
        #expect(try io("golden", ["write -P 0x20 0 4M"]))
        #expect(try io("vm1", ["write -P 0x30 8M 4M", "read -P 0x10 0 4M"]))
        #expect(try io("golden", ["read -P 0x20 0 4M", "read -P 0x10 8M 4M"]))
        // A clone of the clone.
        #expect(try server.cli(["snapshot", "create", "vm1", "v1"]).succeeded)
        #expect(try server.cli(["clone", "create", "vm1@v1", "vm2"]).succeeded)
        #expect(try io("vm2", ["read -P 0x10 0 8M", "read -P 0x30 8M 4M", "read -P 0x10 12M 4M"]))
        // The snapshot export of the parent is read-only and unchanged.
        #expect(try io("golden@base", ["read -P 0x10 0 16M"], readOnly: true))
        // Deleting a snapshot that has clones is refused, naming them.
        let refused = try server.cli(["snapshot", "delete", "golden", "base"])
        #expect(!refused.succeeded && refused.error.contains("vm1"), "\(refused.error)")
        // kill -9, restart: same content.
        server.kill9()
        try server.start()
        #expect(try io("vm2", ["read -P 0x10 0 8M", "read -P 0x30 8M 4M"]))
        #expect(try io("vm1", ["read -P 0x10 0 8M", "read -P 0x30 8M 4M"]))
        // Clean stop (everything uploaded), lose the flash, restart from the backend alone.
        #expect(try server.stop() == 0)
        try FileManager.default.removeItem(atPath: directory.path + "/data/flash")
        try server.start()
        defer { _ = try? server.stop() }
        #expect(try io("golden", ["read -P 0x20 0 4M", "read -P 0x10 4M 12M"]))
        #expect(try io("vm1", ["read -P 0x10 0 8M", "read -P 0x30 8M 4M", "read -P 0x10 12M 4M"]))
        #expect(try io("vm2", ["read -P 0x10 0 8M", "read -P 0x30 8M 4M"]))
        let info = try server.cli(["volume", "info", "vm2"])
        #expect(info.output.contains("vm1@v1"), "\(info.output)")
    }

    @Test func managementErrorsAreClear() throws {
        let directory = try TemporaryDirectory("vd-err")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        #expect(try server.cli(["volume", "create", "vol1", "--size", "16M"]).succeeded)
        try server.start()
        let unknownVolume = try server.cli(["snapshot", "create", "ghost", "s1"])
        #expect(unknownVolume.error.contains("no volume named ghost"), "\(unknownVolume.error)")
        #expect(try server.cli(["snapshot", "create", "vol1", "s1"]).succeeded)
        let duplicate = try server.cli(["snapshot", "create", "vol1", "s1"])
        #expect(duplicate.error.contains("already has a snapshot named s1"), "\(duplicate.error)")
        let unknownSnapshot = try server.cli(["snapshot", "rollback", "vol1", "nope"])
        #expect(unknownSnapshot.error.contains("no snapshot named nope"), "\(unknownSnapshot.error)")
        let badClone = try server.cli(["clone", "create", "vol1", "c"])
        #expect(badClone.error.contains("PARENT@SNAPSHOT"), "\(badClone.error)")
        let duplicateVolume = try server.cli(["clone", "create", "vol1@s1", "vol1"])
        #expect(duplicateVolume.error.contains("already exists"), "\(duplicateVolume.error)")
        #expect(try server.cli(["clone", "create", "vol1@s1", "c1"]).succeeded)
        let parentDelete = try server.cli(["volume", "delete", "vol1"])
        #expect(parentDelete.error.contains("has clones: c1"), "\(parentDelete.error)")
        for result in [unknownVolume, duplicate, unknownSnapshot, parentDelete] {
            #expect(!result.succeeded)
            #expect(!result.error.contains("Fatal error") && !result.error.contains("Stack"), "\(result.error)")
        }
        // With the router down the CLI works on the data directory itself, and says so.
        #expect(try server.stop() == 0)
        let offline = try server.cli(["snapshot", "list", "vol1"])
        #expect(offline.succeeded, "\(offline.error)")
        #expect(offline.output.contains("s1"))
        let missing = try server.cli(["snapshot", "list", "ghost"])
        #expect(!missing.succeeded && missing.error.contains("no volume named ghost"))
    }
}
