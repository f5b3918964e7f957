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
        subcommands: [Create.self, List.self, Delete.self, Rollback.self, Diff.self, ExportDiff.self])

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

extension SnapshotCommand {
    struct Diff: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The extents whose content differs between two snapshots, or a snapshot and the live volume.",
            discussion: """
                Computed from the map and the transaction logs of the epochs in between, in time proportional to
                what changed (not to the volume's size); no data is read. An extent is "zero" when the newer
                version reads zeroes there (trimmed or zeroed). For a clone, FROM may be PARENT@SNAPSHOT, the
                snapshot it was cloned from. Over NBD, the export VOLUME[@TO] offers the same as the meta context
                qemu:dirty-bitmap:FROM.
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Volume name.") var volume: String
        @Argument(help: "The older snapshot (PARENT@SNAPSHOT: a clone's base).") var from: String
        @Argument(help: "The newer snapshot (default: the live volume).") var to: String?
        @Flag(name: .long, help: "Print JSON: {\"extents\": [{\"offset\": N, \"length\": N, \"zero\": false}, ...]}.")
        var json = false

        func run() async throws {
            let configuration = try global.load()
            let request = DiffRequest(from: from, to: to)
            let diff = try await ServiceAccess.with(configuration, command: "vd snapshot diff", quiet: json) {
                (service) throws(VDError) in try await service.diff(volume, request)
            }
            if json {
                print(try jsonString(diff))
                return
            }
            let data = diff.extents.filter { !$0.zero }.reduce(0) { $0 + $1.length }
            let zero = diff.extents.filter(\.zero).reduce(0) { $0 + $1.length }
            print(
                "\(volume): \(from) -> \(to ?? "live"): \(diff.extents.count) extents, \(ByteSize.format(data)) changed data, \(ByteSize.format(zero)) zeroed"
            )
            guard !diff.extents.isEmpty else { return }
            var rows = [["OFFSET", "LENGTH", "NOW"]]
            for extent in diff.extents {
                rows.append(["\(extent.offset)", "\(extent.length)", extent.zero ? "zero" : "data"])
            }
            print(table(rows))
        }
    }

    struct ExportDiff: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export-diff",
            abstract: "Write what changed between two snapshots (with its data) to a file: an incremental backup.",
            discussion: """
                vd snapshot export-diff VOLUME@FROM VOLUME@TO FILE   the increment from FROM to TO
                vd snapshot export-diff VOLUME@TO FILE               a full copy of TO (every extent holding data)
                The file is a checksummed stream (docs/backup.md); `vd volume import-diff` applies it to a volume that
                holds FROM (or to an empty one, for a full copy). The file appears under its name only once complete.
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "[VOLUME@FROM] VOLUME@TO FILE") var arguments: [String]

        struct Parsed {
            var volume: String
            var from: String?
            var to: String
            var file: String
        }

        static func split(_ text: String) throws -> (volume: String, snapshot: String) {
            let parts = text.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw ValidationError("expected VOLUME@SNAPSHOT, got '\(text)'")
            }
            return (parts[0], parts[1])
        }

        func parsed() throws -> Parsed {
            switch arguments.count {
            case 2:
                let to = try Self.split(arguments[0])
                return Parsed(volume: to.volume, from: nil, to: to.snapshot, file: arguments[1])
            case 3:
                let from = try Self.split(arguments[0])
                let to = try Self.split(arguments[1])
                // A clone's increment from its parent's snapshot: PARENT@SNAP CLONE@TO.
                let fromName = from.volume == to.volume ? from.snapshot : arguments[0]
                return Parsed(volume: to.volume, from: fromName, to: to.snapshot, file: arguments[2])
            default:
                throw ValidationError("expected VOLUME@FROM VOLUME@TO FILE, or VOLUME@TO FILE for a full copy")
            }
        }

        func validate() throws { _ = try parsed() }

        func run() async throws {
            let configuration = try global.load()
            let parsed = try parsed()
            let request = ExportDiffRequest(from: parsed.from, to: parsed.to, path: absolutePath(parsed.file))
            let status = try await ServiceAccess.with(configuration, command: "vd snapshot export-diff") {
                (service) throws(VDError) in try await service.exportDiff(parsed.volume, request)
            }
            print(
                "exported \(parsed.volume) \(parsed.from.map { "\($0) -> " } ?? "full copy of ")\(parsed.to) to \(parsed.file): \(status.extents) extents, \(ByteSize.format(status.dataBytes)) data, \(ByteSize.format(status.zeroBytes)) zeroed, \(ByteSize.format(status.streamBytes)) written"
            )
        }
    }
}

/// `path` made absolute against the current directory (the router may run elsewhere).
func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
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
