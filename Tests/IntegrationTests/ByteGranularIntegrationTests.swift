// Byte-granular NBD requests (minimum block size 1, as qemu-nbd advertises): libnbd clients refuse requests below the
// advertised minimum, so with 512 a file system on `nbdfuse` could not even be created.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct ByteGranularIntegrationTests {
    @Test func smallUnalignedWritesReadBackExactly() throws {
        let directory = try TemporaryDirectory("vd-bytes")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        defer { _ = try? server.stop() }
        #expect(try server.cli(["volume", "create", "vol1", "--size", "16M"]).succeeded)
        try server.start()
        let info = try ProcessRunner.run("nbdinfo", ["--json", server.uri("vol1")])
        #expect(info.output.contains("\"block_size_minimum\": 1"), "\(info.output)")

        var model = [UInt8](repeating: 0, count: 3 * 4096)
        let client = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        var rng = SeededRandom(seed: 16)
        // Writes of 1 to 700 bytes at odd offsets, some within one cluster, some across a cluster boundary.
        for _ in 0..<200 {
            let length = Int(rng.next() % 700) + 1
            let offset = Int(rng.next() % UInt64(model.count - length))
            let data = (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            try client.write(offset: UInt64(offset), data)
            model.replaceSubrange(offset..<(offset + length), with: data)
        }
        #expect(try client.read(offset: 0, length: model.count) == model)
        #expect(try client.read(offset: 4093, length: 7) == Array(model[4093..<4100]))
        // And qemu's client, which sends them as they are now that the minimum is 1.
        let io = try ProcessRunner.run(
            "qemu-io",
            ["-f", "raw", "-c", "write -P 0x5a 10 100", "-c", "read -P 0x5a 10 100", server.uri("vol1")])
        #expect(io.succeeded && !io.output.contains("Pattern verification failed"), "\(io.output) \(io.error)")
        #expect(try client.read(offset: 9, length: 1) == [model[9]])
        #expect(try client.read(offset: 110, length: 1) == [model[110]])
    }

    @Test func aFileSystemOnNbdfuse() throws {
        for tool in ["nbdfuse", "fuse2fs", "fusermount3", "mkfs.ext4", "e2fsck"] { _ = try ProcessRunner.which(tool) }
        try #require(FileManager.default.fileExists(atPath: "/dev/fuse"), "FUSE needs /dev/fuse")
        let directory = try TemporaryDirectory("vd-fuse")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        defer { _ = try? server.stop() }
        #expect(try server.cli(["volume", "create", "vol1", "--size", "64M"]).succeeded)
        try server.start()

        let mount = directory.path + "/nbd"
        let files = directory.path + "/fs"
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: files, withIntermediateDirectories: true)
        let disk = mount + "/disk"
        let fuse = try ProcessRunner.start(
            "nbdfuse", ["-P", directory.path + "/nbdfuse.pid", disk, server.uri("vol1")])
        defer {
            _ = try? ProcessRunner.run("fusermount3", ["-u", files])
            _ = try? ProcessRunner.run("fusermount3", ["-u", mount])
            fuse.terminate()
            fuse.waitUntilExit()
        }
        #expect(ProcessRunner.waitFor(path: directory.path + "/nbdfuse.pid", seconds: 20), "nbdfuse did not start")

        // 100 bytes at offset 10 through the kernel's page cache and nbdfuse (a sub-512 NBD write).
        let hundred = (0..<100).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ 1) }
        let handle = try #require(FileHandle(forUpdatingAtPath: disk))
        try handle.seek(toOffset: 10)
        try handle.write(contentsOf: Data(hundred))
        try handle.synchronize()
        try handle.seek(toOffset: 0)
        let head = try #require(try handle.read(upToCount: 120))
        try handle.close()
        #expect(Array(head[10..<110]) == hundred)
        #expect(Array(head[0..<10]) == [UInt8](repeating: 0, count: 10))
        let client = try NBDTestClient(socketPath: server.socketPath, export: "vol1")
        #expect(try client.read(offset: 10, length: 100) == hundred, "the write reached the volume")

        // mkfs.ext4 and fuse2fs on the nbdfuse file: files written, unmounted, mounted again and read back.
        let mkfs = try ProcessRunner.run("mkfs.ext4", ["-q", "-F", disk])
        #expect(mkfs.succeeded, "\(mkfs.error)")
        // fuse2fs in the foreground, so its exit (after an unmount) says everything it held reached the disk: an
        // unmount returns before a daemonized fuse2fs has written its superblock and bitmaps back.
        var fuse2fs: pid_t?
        func mountFileSystem() throws {
            let pid = try ProcessRunner.spawn("fuse2fs", ["-f", disk, files, "-o", "fakeroot"])
            fuse2fs = pid
            let deadline = Date().addingTimeInterval(30)
            while !ProcessRunner.isMounted(files) && Date() < deadline { usleep(20_000) }
            try #require(ProcessRunner.isMounted(files), "fuse2fs did not mount \(files)")
        }
        func unmountFileSystem() throws {
            #expect(try ProcessRunner.run("fusermount3", ["-u", files]).succeeded)
            if let pid = fuse2fs {
                #expect(ProcessRunner.waitForExit(pid, seconds: 60) == 0, "fuse2fs did not finish cleanly")
                fuse2fs = nil
            }
        }
        try mountFileSystem()
        var written: [String: Data] = [:]
        for index in 0..<20 {
            let bytes = Data((0..<(index * 997 + 13)).map { UInt8(truncatingIfNeeded: $0 &* (index + 1)) })
            let name = "file\(index)"
            try bytes.write(to: URL(fileURLWithPath: files + "/" + name))
            written[name] = bytes
        }
        try unmountFileSystem()
        try mountFileSystem()
        for (name, bytes) in written {
            #expect(FileManager.default.contents(atPath: files + "/" + name) == bytes, "\(name) read back")
        }
        try unmountFileSystem()
        let fsck = try ProcessRunner.run("e2fsck", ["-fn", disk])
        #expect(fsck.succeeded, "\(fsck.output)")
    }
}
