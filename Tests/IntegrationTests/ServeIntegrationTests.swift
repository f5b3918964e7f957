// `vd serve` driven by real NBD clients: nbdinfo, qemu-io, qemu-img, fio. Each test runs its own router on a
// temporary data directory with the embedded local-directory backend.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct ServeIntegrationTests {
    /// A data directory with one volume and a running router.
    struct Fixture {
        let directory: TemporaryDirectory
        let server: VDServer

        init(size: String = "256M", volume: String = "vol1", extra: [String] = []) throws {
            directory = try TemporaryDirectory("vd-it")
            server = try VDServer(dataDirectory: directory.path + "/data", extraArguments: extra)
            let created = try server.cli(["volume", "create", volume, "--size", size])
            #expect(created.succeeded, "volume create failed: \(created.error)")
            try server.start()
        }

        func finish() {
            _ = try? server.stop()
            directory.remove()
        }
    }

    @Test func nbdinfoReportsSizeFlagsAndBlockSizes() throws {
        let f = try Fixture(size: "1G")
        defer { f.finish() }
        let result = try ProcessRunner.run("nbdinfo", ["--json", f.server.uri("vol1")])
        #expect(result.succeeded, "\(result.error)")
        let json = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any]
        let export = (json?["exports"] as? [[String: Any]])?.first
        #expect(export?["export-size"] as? Int == 1 << 30)
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero"] {
            #expect(export?[flag] as? Bool == true, "\(flag)")
        }
        #expect(export?["is_read_only"] as? Bool == false)
        #expect(export?["block_size_minimum"] as? Int == 1)  // byte-granular, as qemu-nbd
        #expect(export?["block_size_preferred"] as? Int == 4096)
        #expect(export?["block_size_maximum"] as? Int == 32 << 20)
        // An unknown export is refused, not served.
        let unknown = try ProcessRunner.run("nbdinfo", [f.server.uri("nope")])
        #expect(!unknown.succeeded)
    }

    @Test func qemuIOPatternsFUAZeroesAndDiscard() throws {
        let f = try Fixture()
        defer { f.finish() }
        let uri = f.server.uri("vol1")
        let write = try ProcessRunner.run(
            "qemu-io",
            [
                "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -f -P 0xcd 1M 64k", "-c", "write -P 0x5a 3000 5000",
                "-c", "write -z 2M 512k", "-c", "discard 4M 1M", uri,
            ])
        #expect(write.succeeded, "\(write.output)\(write.error)")
        let read = try ProcessRunner.run(
            "qemu-io",
            [
                "-f", "raw", "-c", "read -P 0xab 0 3000", "-c", "read -P 0x5a 3000 5000", "-c", "read -P 0xab 8000 1040576",
                "-c", "read -P 0xcd 1M 64k", "-c", "read -P 0 2M 512k", "-c", "read -P 0 4M 1M", uri,
            ])
        #expect(read.succeeded, "\(read.output)\(read.error)")
        #expect(!read.output.contains("Pattern verification failed"))
        // The check can fail: a wrong pattern is reported.
        let wrong = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "read -P 0x11 0 4096", uri])
        #expect(wrong.output.contains("Pattern verification failed") || !wrong.succeeded)
    }

    @Test func qemuImgConvertInAndOutCompares() throws {
        let f = try Fixture(size: "64M")
        defer { f.finish() }
        let image = f.directory.path + "/source.raw"
        // A sparse image with some data, some zeroes and holes.
        #expect(try ProcessRunner.run("qemu-img", ["create", "-f", "raw", image, "64M"]).succeeded)
        let fill = try ProcessRunner.run(
            "qemu-io",
            ["-f", "raw", "-c", "write -P 0x61 0 3M", "-c", "write -P 0x62 10M 128k", "-c", "write -P 0x63 63M 1M", image])
        #expect(fill.succeeded, "\(fill.error)")
        let uri = f.server.uri("vol1")
        let toVolume = try ProcessRunner.run("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", image, uri])
        #expect(toVolume.succeeded, "\(toVolume.error)")
        let compare = try ProcessRunner.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, uri])
        #expect(compare.succeeded, "\(compare.output)\(compare.error)")
        let back = f.directory.path + "/back.raw"
        let fromVolume = try ProcessRunner.run("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, back])
        #expect(fromVolume.succeeded, "\(fromVolume.error)")
        #expect(try ProcessRunner.run("cmp", [image, back]).succeeded)
        // A changed byte makes compare fail.
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0x01 5M 512", uri]).succeeded)
        #expect(!(try ProcessRunner.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, uri])).succeeded)
    }

    @Test func fioVerifiesMixedBlockSizes() throws {
        let f = try Fixture(size: "256M")
        defer { f.finish() }
        let result = try ProcessRunner.run(
            "fio",
            [
                "--name=mixed", "--ioengine=nbd", "--uri=\(f.server.uri("vol1"))", "--rw=randwrite",
                "--bssplit=512/10:4k/40:16k/20:64k/20:1m/10", "--size=128M", "--io_size=64M", "--iodepth=16",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            ], currentDirectory: f.directory.path)
        #expect(result.succeeded, "\(result.output)\(result.error)")
        #expect(result.output.contains("err= 0"))
    }

    @Test func secondServeOnTheSameDataDirectoryIsRefused() throws {
        let f = try Fixture(size: "16M")
        defer { f.finish() }
        let second = try VDServer(
            dataDirectory: f.server.dataDirectory, socketPath: f.directory.path + "/other.sock")
        #expect(throws: TestToolError.self) { try second.start(timeoutSeconds: 20) }
        #expect(second.output.contains("in use by vd serve (pid \(f.server.pid)"), "\(second.output)")
        // Volume commands go through the running router, and a new volume is exported at once.
        let create = try f.server.cli(["volume", "create", "vol2", "--size", "1G"])
        #expect(create.succeeded, "\(create.error)")
        #expect(!create.error.contains("working on it directly"))
        let info = try ProcessRunner.run("nbdinfo", ["--size", f.server.uri("vol2")])
        #expect(info.output.trimmingCharacters(in: .whitespacesAndNewlines) == "\(1 << 30)", "\(info.output)\(info.error)")
    }

    @Test func cliErrorsAreClear() throws {
        let directory = try TemporaryDirectory("vd-cli")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        let badSize = try server.cli(["volume", "create", "v", "--size", "12X"])
        #expect(badSize.status != 0)
        #expect(badSize.error.contains("'12X' is not a size"))
        let unaligned = try server.cli(["volume", "create", "v", "--size", "1000"])
        #expect(unaligned.error.contains("not a multiple of the cluster size"))
        let unknown = try server.cli(["volume", "info", "ghost"])
        #expect(unknown.error.contains("no volume named ghost"))
        let badName = try server.cli(["volume", "create", "a@b", "--size", "1G"])
        #expect(badName.error.contains("may contain only"))
        #expect(try server.cli(["volume", "create", "v", "--size", "1G"]).succeeded)
        let duplicate = try server.cli(["volume", "create", "v", "--size", "1G"])
        #expect(duplicate.error.contains("already exists"))
        let list = try server.cli(["volume", "list", "--json"])
        #expect(list.output.contains("\"name\" : \"v\""))
        #expect(try server.cli(["volume", "delete", "v"]).succeeded)
        #expect(try server.cli(["volume", "list"]).output.contains("no volumes"))
    }

    @Test func sigtermDrainsEverythingToTheBackend() throws {
        let f = try Fixture(size: "64M")
        defer { f.finish() }
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 8M", f.server.uri("vol1")]).succeeded)
        let status = try f.server.stop()
        #expect(status == 0, "\(f.server.output)")
        #expect(f.server.output.contains("the backend holds every write"))
        let tlogs = try FileManager.default.contentsOfDirectory(atPath: f.server.dataDirectory + "/backend/vol1/tlog")
        #expect(!tlogs.isEmpty)
    }
}
