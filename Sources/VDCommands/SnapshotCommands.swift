// `vd snapshot create|list|delete|rollback` and `vd clone create`.

import ArgumentParser
import Foundation
import ManagementAPI
import VolumeCore

struct SnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Zero-copy snapshots: create, list, delete, roll back.",
        discussion: """
            A snapshot is taken at a consistent point (every write replied before it is in it, none issued after) and
            costs the same whatever the volume's size. Export one read-only as VOLUME@SNAPSHOT over NBD, e.g.
              qemu-img convert -O qcow2 'nbd+unix:///vol1@s1?socket=SOCKET' backup.qcow2
            """,
        subcommands: [Create.self, List.self, Delete.self, Rollback.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Take a snapshot of a volume.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Volume name.") var volume: String
        @Argument(help: "Snapshot name: letters, digits, '.', '_', '-'.") var name: String

        func validate() throws {
            do { try SnapshotTable.validateName(name) } catch { throw ValidationError(error.message) }
        }

        func run() async throws {
            let configuration = try global.load()
            let request = CreateSnapshotRequest(name: name)
            let snapshot = try await ServiceAccess.with(configuration, command: "vd snapshot create") {
                (service) throws(VDError) in try await service.createSnapshot(volume, request)
            }
            print("created snapshot \(volume)@\(snapshot.name)")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List a volume's snapshots.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Volume name.") var volume: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            let configuration = try global.load()
            let snapshots = try await ServiceAccess.with(configuration, command: "vd snapshot list", quiet: json) {
                (service) throws(VDError) in try await service.listSnapshots(volume)
            }
            if json {
                print(try jsonString(snapshots))
                return
            }
            if snapshots.isEmpty {
                print("volume \(volume) has no snapshots")
                return
            }
            var rows = [["NAME", "CREATED", "WRITTEN SINCE PREVIOUS", "ON BACKEND", "CLONES"]]
            for s in snapshots {
                rows.append([
                    s.name, ISO8601DateFormatter().string(from: s.createdAt), ByteSize.format(s.writtenSincePreviousBytes),
                    s.onBackend ? "yes" : "not yet", s.clones.isEmpty ? "-" : s.clones.joined(separator: ","),
                ])
            }
            print(table(rows))
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a snapshot (refused while clones read through it).",
            discussion: "Frees nothing by itself: `vd scrub` gives back the space only this snapshot referenced.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Volume name.") var volume: String
        @Argument(help: "Snapshot name.") var name: String

        func run() async throws {
            let configuration = try global.load()
            try await ServiceAccess.with(configuration, command: "vd snapshot delete") { (service) throws(VDError) in
                try await service.deleteSnapshot(volume, name)
            }
            print("deleted snapshot \(volume)@\(name)")
        }
    }

    struct Rollback: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Return a volume to a snapshot's content; later snapshots are deleted.",
            discussion: "Refused while NBD clients are connected to the volume, unless --force (which disconnects them).")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Volume name.") var volume: String
        @Argument(help: "Snapshot name.") var name: String
        @Flag(name: .long, help: "Disconnect the volume's NBD clients instead of refusing.") var force = false

        func run() async throws {
            let configuration = try global.load()
            let request = RollbackRequest(force: force)
            _ = try await ServiceAccess.with(configuration, command: "vd snapshot rollback") { (service) throws(VDError) in
                try await service.rollback(volume, name, request)
            }
            print("rolled back \(volume) to snapshot \(name)")
        }
    }
}

struct CloneCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone",
        abstract: "Thin, writable clones of snapshots.",
        subcommands: [Create.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a writable thin clone of PARENT@SNAPSHOT named CHILD.",
            discussion: """
                The clone reads what it never wrote from the snapshot and writes to its own namespace; creating it
                copies nothing. Clones of clones work. The snapshot cannot be deleted while the clone exists.
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "PARENT@SNAPSHOT") var source: String
        @Argument(help: "Name of the new volume.") var child: String

        func validate() throws {
            let parts = source.split(separator: "@", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw ValidationError("the source must be PARENT@SNAPSHOT (e.g. golden@base), got '\(source)'")
            }
            do { try VolumeName.validate(child) } catch { throw ValidationError(error.message) }
        }

        func run() async throws {
            let configuration = try global.load()
            let parts = source.split(separator: "@").map(String.init)
            let request = CreateCloneRequest(parent: parts[0], snapshot: parts[1], name: child)
            let status = try await ServiceAccess.with(configuration, command: "vd clone create") { (service) throws(VDError) in
                try await service.createClone(request)
            }
            print("created clone \(status.name) of \(source) (\(ByteSize.format(status.sizeBytes)))")
        }
    }
}
