// Incremental backup end to end with real clients: `vd snapshot diff`, the `qemu:dirty-bitmap:SNAPSHOT` meta context
// read by qemu-img map (x-dirty-bitmap) and by libnbd, and export-diff / import-diff restoring a snapshot chain onto
// another volume byte for byte; a damaged or truncated stream changes nothing.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct BackupIntegrationTests {
    struct Extent: Codable, Hashable {
        var offset: UInt64
        var length: UInt64
        var zero: Bool
    }

    struct Diff: Codable {
        var extents: [Extent]
    }

    static let mib: UInt64 = 1 << 20

    @Test func diffDirtyBitmapsAndAStreamChainRestoreASnapshot() throws {
        let directory = try TemporaryDirectory("vd-backup")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data")
        defer { _ = try? server.stop() }
        for volume in ["vol1", "vol2", "vol3"] {
            #expect(try server.cli(["volume", "create", volume, "--size", "64M"]).succeeded)
        }
        try server.start()
        func io(_ export: String, _ commands: [String]) throws {
            let result = try ProcessRunner.run(
                "qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [server.uri(export)])
            #expect(result.succeeded && !result.output.contains("error"), "\(result.output) \(result.error)")
        }
        try io("vol1", ["write -P 0x11 0 4M", "write -P 0x12 10M 1M", "write -P 0x13 30M 64k"])
        #expect(try server.cli(["snapshot", "create", "vol1", "s1"]).succeeded)
        // After s1: data over part of the first write, new data further on, zeroes over the second write, and a
        // sub-cluster write (a whole cluster changes).
        try io(
            "vol1", ["write -P 0x21 2M 512k", "write -P 0x22 40M 128k", "write -z 10M 1M", "write -P 0x23 50001 100"])
        #expect(try server.cli(["snapshot", "create", "vol1", "s2"]).succeeded)
        try io("vol1", ["write -P 0x31 20M 1M"])  // after s2: in the live diff only

        let expected = [
            Extent(offset: 49152, length: 4096, zero: false),
            Extent(offset: 2 * Self.mib, length: Self.mib / 2, zero: false),
            Extent(offset: 10 * Self.mib, length: Self.mib, zero: true),
            Extent(offset: 40 * Self.mib, length: 128 << 10, zero: false),
        ]
        let diff = try server.cli(["snapshot", "diff", "vol1", "s1", "s2", "--json"])
        #expect(diff.succeeded, "\(diff.error)")
        #expect(try JSONDecoder().decode(Diff.self, from: Data(diff.output.utf8)).extents == expected)
        let live = try server.cli(["snapshot", "diff", "vol1", "s1", "--json"])
        #expect(
            try JSONDecoder().decode(Diff.self, from: Data(live.output.utf8)).extents
                == (expected[0..<3] + [Extent(offset: 20 * Self.mib, length: Self.mib, zero: false), expected[3]]))
        let missing = try server.cli(["snapshot", "diff", "vol1", "nosuch"])
        #expect(!missing.succeeded && missing.error.contains("no snapshot nosuch"), "\(missing.error)")

        // A clone diffs against the snapshot it was cloned from: exactly what it wrote.
        #expect(try server.cli(["clone", "create", "vol1@s1", "c1"]).succeeded)
        try io("c1", ["write -P 0x51 8M 256k", "write -z 0 64k"])
        let cloneDiff = try server.cli(["snapshot", "diff", "c1", "vol1@s1", "--json"])
        #expect(cloneDiff.succeeded, "\(cloneDiff.error)")
        #expect(
            try JSONDecoder().decode(Diff.self, from: Data(cloneDiff.output.utf8)).extents == [
                Extent(offset: 0, length: 64 << 10, zero: true),
                Extent(offset: 8 * Self.mib, length: 256 << 10, zero: false),
            ])
        let wrongBase = try server.cli(["snapshot", "diff", "c1", "vol1@s2"])
        #expect(!wrongBase.succeeded && wrongBase.error.contains("not the snapshot volume c1 was cloned from"))

        // qemu-img map with x-dirty-bitmap: QEMU reports dirty areas as "data": false (the bitmap's flag takes the
        // place of base:allocation's hole flag).
        let map = try ProcessRunner.run(
            "qemu-img",
            [
                "map", "--output=json", "--image-opts",
                "driver=nbd,server.type=unix,server.path=\(server.socketPath),export=vol1@s2,x-dirty-bitmap=qemu:dirty-bitmap:s1",
            ])
        #expect(map.succeeded, "\(map.error)")
        struct MapEntry: Codable {
            var start: UInt64
            var length: UInt64
            var data: Bool
        }
        let entries = try JSONDecoder().decode([MapEntry].self, from: Data(map.output.utf8))
        var dirty: [ClosedRange<UInt64>] = []
        for entry in entries where !entry.data {
            dirty.append(entry.start...(entry.start + entry.length - 1))
        }
        #expect(dirty == expected.map { $0.offset...($0.offset + $0.length - 1) }, "\(map.output)")

        // nbdinfo prints the same map.
        let nbdinfo = try ProcessRunner.run("nbdinfo", ["--map=qemu:dirty-bitmap:s1", server.uri("vol1@s2")])
        #expect(nbdinfo.succeeded, "\(nbdinfo.error)")
        let dirtyLines = nbdinfo.output.split(separator: "\n").filter { $0.hasSuffix("dirty") }.map {
            $0.split(separator: " ", omittingEmptySubsequences: true).prefix(2).map { UInt64($0) ?? 0 }
        }
        #expect(dirtyLines == expected.map { [$0.offset, $0.length] }, "\(nbdinfo.output)")

        // libnbd: both contexts on the live volume, one BLOCK_STATUS each over the whole volume.
        let script = """
            import nbd, sys, json
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.add_meta_context("qemu:dirty-bitmap:s1")
            h.set_export_name("vol1")
            h.connect_unix(sys.argv[1])
            assert h.can_meta_context("qemu:dirty-bitmap:s1")
            size = h.get_size()
            dirty = []
            offset = 0
            while offset < size:
                seen = {}
                def cb(metacontext, off, entries, err):
                    seen[metacontext] = entries
                    return 0
                h.block_status(min(size - offset, 1 << 30), offset, cb)
                entries = seen["qemu:dirty-bitmap:s1"]
                assert "base:allocation" in seen
                pos = offset
                for i in range(0, len(entries), 2):
                    if entries[i + 1] & 1:
                        dirty.append([pos, entries[i]])
                    pos += entries[i]
                offset = pos
            print(json.dumps(dirty))
            """
        let nbd = try ProcessRunner.run("/usr/bin/python3", ["-c", script, server.socketPath])
        #expect(nbd.succeeded, "\(nbd.error)")
        let liveDirty = try JSONDecoder().decode([[UInt64]].self, from: Data(nbd.output.utf8))
        #expect(
            liveDirty == [
                [49152, 4096], [2 * Self.mib, Self.mib / 2], [10 * Self.mib, Self.mib], [20 * Self.mib, Self.mib],
                [40 * Self.mib, 128 << 10],
            ])

        // A full copy of s1 and the s1 -> s2 increment rebuild s2 on vol2, byte for byte.
        let full = directory.path + "/vol1-s1.vddiff"
        let increment = directory.path + "/vol1-s1-s2.vddiff"
        let exportFull = try server.cli(["snapshot", "export-diff", "vol1@s1", full])
        #expect(exportFull.succeeded, "\(exportFull.error)")
        let exportIncrement = try server.cli(["snapshot", "export-diff", "vol1@s1", "vol1@s2", increment])
        #expect(exportIncrement.succeeded, "\(exportIncrement.error)")
        #expect(!FileManager.default.fileExists(atPath: increment + ".partial"))
        let incrementSize = try #require(try FileManager.default.attributesOfItem(atPath: increment)[.size] as? UInt64)
        #expect(incrementSize < 2 * Self.mib, "the increment holds the changed data only (\(incrementSize) bytes)")
        #expect(try server.cli(["volume", "import-diff", "vol2", full, "--snapshot", "s1"]).succeeded)
        let restore = try server.cli(["volume", "import-diff", "vol2", increment, "--snapshot", "s2"])
        #expect(restore.succeeded, "\(restore.error)")
        func dump(_ export: String) throws -> String {
            let file = directory.path + "/" + export.replacingOccurrences(of: "@", with: "-") + ".raw"
            let copy = try ProcessRunner.run("nbdcopy", [server.uri(export), file])
            #expect(copy.succeeded, "\(copy.error)")
            return file
        }
        #expect(try ProcessRunner.run("cmp", [try dump("vol1@s2"), try dump("vol2")]).succeeded)
        #expect(try ProcessRunner.run("cmp", [try dump("vol1@s1"), try dump("vol2@s1")]).succeeded)

        // The target must hold the stream's base: an increment needs its FROM snapshot, a full copy an empty volume.
        let noBase = try server.cli(["volume", "import-diff", "vol3", increment])
        #expect(!noBase.succeeded && noBase.error.contains("has no snapshot s1"), "\(noBase.error)")
        let notEmpty = try server.cli(["volume", "import-diff", "vol1", full])
        #expect(!notEmpty.succeeded && notEmpty.error.contains("is not empty"), "\(notEmpty.error)")
        try io("vol2", ["write -P 0x44 60M 4k"])
        let changed = try server.cli(["volume", "import-diff", "vol2", increment])
        #expect(!changed.succeeded && changed.error.contains("changed since its snapshot s1"), "\(changed.error)")

        // A damaged stream (one payload byte flipped) and a truncated one are refused and change nothing, even with
        // --force.
        var bytes = try Data(contentsOf: URL(fileURLWithPath: increment))
        let damaged = directory.path + "/damaged.vddiff"
        bytes[bytes.count - 100] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: damaged))
        let refused = try server.cli(["volume", "import-diff", "vol3", damaged, "--force"])
        #expect(!refused.succeeded && refused.error.contains("checksum mismatch"), "\(refused.error)")
        let truncated = directory.path + "/truncated.vddiff"
        try Data(try Data(contentsOf: URL(fileURLWithPath: increment)).prefix(Int(incrementSize) - 32)).write(
            to: URL(fileURLWithPath: truncated))
        let cut = try server.cli(["volume", "import-diff", "vol3", truncated, "--force"])
        #expect(!cut.succeeded && cut.error.contains("ends early"), "\(cut.error)")
        let vol3 = try dump("vol3")
        let zeroes = directory.path + "/zeroes.raw"
        #expect(try ProcessRunner.run("truncate", ["-s", "64M", zeroes]).succeeded)
        #expect(try ProcessRunner.run("cmp", [vol3, zeroes]).succeeded, "a refused stream wrote nothing")
    }
}
