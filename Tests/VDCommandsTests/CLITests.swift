import ArgumentParser
import Testing
@testable import VDCommands
import VolumeCore

/// Parsing, validation and help text of the vd command line (no process, no router).
@Suite struct CLITests {
    @Test func parsesEveryCommand() throws {
        #expect(try VDCommand.parseAsRoot(["serve", "--data-dir", "/d", "--nbd-socket", "/s"]) is ServeCommand)
        #expect(try VDCommand.parseAsRoot(["volume", "create", "v", "--size", "20G"]) is VolumeCommand.Create)
        #expect(try VDCommand.parseAsRoot(["volume", "list", "--json"]) is VolumeCommand.List)
        #expect(try VDCommand.parseAsRoot(["volume", "attach", "v", "--backend", "file:///x"]) is VolumeCommand.Attach)
        #expect(try VDCommand.parseAsRoot(["snapshot", "create", "v", "s"]) is SnapshotCommand.Create)
        #expect(try VDCommand.parseAsRoot(["snapshot", "rollback", "v", "s", "--force"]) is SnapshotCommand.Rollback)
        #expect(try VDCommand.parseAsRoot(["clone", "create", "v@s", "c"]) is CloneCommand.Create)
        #expect(try VDCommand.parseAsRoot(["backend", "check", "--create-bucket"]) is BackendCommand.Check)
        let create = try #require(try VDCommand.parseAsRoot(["volume", "create", "v", "--size", "4T", "--cluster-size", "64K"]) as? VolumeCommand.Create)
        #expect(create.size == "4T" && create.clusterSize == "64K")
    }

    @Test func rejectsBadInputWithClearMessages() {
        func message(_ arguments: [String]) -> String {
            do {
                _ = try VDCommand.parseAsRoot(arguments)
                return ""
            } catch {
                return VDCommand.message(for: error)
            }
        }
        #expect(message(["volume", "create", "v", "--size", "12X"]).contains("'12X' is not a size"))
        #expect(message(["volume", "create", "bad/name", "--size", "1G"]).contains("may contain only"))
        #expect(message(["volume", "create", "v"]).contains("--size"))
        #expect(message(["clone", "create", "nosnapshot", "c"]).contains("PARENT@SNAPSHOT"))
        #expect(message(["snapshot", "create", "v", "a@b"]).contains("snapshot name"))
        #expect(message(["frobnicate"]).contains("Unexpected argument") || message(["frobnicate"]).contains("frobnicate"))
    }

    @Test func helpTextExplainsTheCommands() {
        let root = VDCommand.helpMessage()
        for word in ["serve", "volume", "snapshot", "clone", "nbd+unix"] { #expect(root.contains(word), "\(word)") }
        let snapshot = VDCommand.helpMessage(for: SnapshotCommand.self)
        #expect(snapshot.contains("VOLUME@SNAPSHOT"))
        let rollback = VDCommand.helpMessage(for: SnapshotCommand.Rollback.self)
        #expect(rollback.contains("--force"))
        let serve = VDCommand.helpMessage(for: ServeCommand.self)
        #expect(serve.contains("SIGTERM") && serve.contains("--nbd-socket"))
        let clone = VDCommand.helpMessage(for: CloneCommand.Create.self)
        #expect(clone.contains("PARENT@SNAPSHOT"))
    }

    @Test func configurationFileIsCheckedStrictly() throws {
        let path = NSTemporaryDirectoryPath() + "/vd-conf-\(UInt64.random(in: 0...UInt64.max)).toml"
        try "[upload]\nmax_age_seconds = 5\n[sco]\nsize = \"8M\"\n".write(toFile: path, atomically: true, encoding: .utf8)
        let loaded = try VDConfiguration.load(path: path)
        #expect(loaded.volumeOptions.uploadAgeSecondsMax == 5)
        #expect(loaded.volumeOptions.scoSizeBytes == 8 << 20)
        try "[upload]\nmax_agee_seconds = 5\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: VDError.self) { _ = try VDConfiguration.load(path: path) }
        do {
            _ = try VDConfiguration.load(path: path)
        } catch {
            #expect(error.message.contains("max_agee_seconds"))
        }
        try "[sco]\nsize = \"lots\"\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: VDError.self) { _ = try VDConfiguration.load(path: path) }
        // The built-in local backend needs no url; any other backend does.
        try "[backends.local]\ncompression = true\n".write(toFile: path, atomically: true, encoding: .utf8)
        let local = try VDConfiguration.load(path: path)
        #expect(local.backendCompression["local"] == true)
        #expect(local.backendURLs["local"] != nil)
        try "[backends.other]\ncompression = true\n".write(toFile: path, atomically: true, encoding: .utf8)
        do {
            _ = try VDConfiguration.load(path: path)
            Issue.record("a backend without url was accepted")
        } catch {
            #expect(error.message.contains("backends.other needs a url"))
        }
    }
}

import Foundation
func NSTemporaryDirectoryPath() -> String {
    var directory = NSTemporaryDirectory()
    while directory.hasSuffix("/") { directory.removeLast() }
    return directory
}
