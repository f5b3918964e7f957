// `vd volume create|list|info|delete|attach`: through the running router, or offline (see ServiceAccess).

import ArgumentParser
import FlashIO
import Foundation
import ManagementAPI
import VolumeCore
import VolumeRouter

struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume",
        abstract: "Create, list, inspect, attach and delete volumes.",
        subcommands: [
            Create.self, List.self, Info.self, Delete.self, Attach.self, Move.self, Takeover.self, DTL.self,
            ImportDiff.self,
        ])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a thin-provisioned volume (it uses no space until written).",
            discussion: "With a router running, the new volume is exported at once.")

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name: letters, digits, '.', '_', '-'.")
        var name: String

        @Option(
            name: .long, help: ArgumentHelp("Size, with an optional K, M, G or T suffix (e.g. 20G).", valueName: "size")
        )
        var size: String

        @Option(
            name: .long,
            help: ArgumentHelp("Cluster size, a power of two from 4K to 64K (default 4K).", valueName: "size"))
        var clusterSize: String?

        @Option(
            name: .long,
            help: ArgumentHelp(
                "Backend: a configured name (default: default_backend) or a URL (file:///DIR, s3://BUCKET?endpoint=HOST:PORT&scheme=http).",
                valueName: "name|url"))
        var backend: String?

        func validate() throws {
            do {
                try VolumeName.validate(name)
                _ = try ByteSize.parse(size)
                if let clusterSize { _ = try ByteSize.parse(clusterSize) }
            } catch {
                throw ValidationError(error.message)
            }
        }

        func run() async throws {
            let configuration = try global.load()
            let sizeBytes = try ByteSize.parse(size)
            var clusterBytes: UInt32?
            if let clusterSize {
                let value = try ByteSize.parse(clusterSize)
                guard value <= UInt64(UInt32.max) else {
                    throw VDError.invalidArgument("cluster size \(clusterSize) is too large")
                }
                clusterBytes = UInt32(value)
            }
            let request = CreateVolumeRequest(
                name: name, sizeBytes: sizeBytes, clusterSizeBytes: clusterBytes, backend: backend)
            let status = try await ServiceAccess.with(configuration, command: "vd volume create") {
                (service) throws(VDError) in
                try await service.createVolume(request)
            }
            print(
                "created volume \(status.name): \(ByteSize.format(status.sizeBytes)), cluster \(ByteSize.format(UInt64(status.clusterSizeBytes))), backend '\(status.backend)'"
                    + (status.online
                        ? "; exported as nbd+unix:///\(status.name)?socket=\(configuration.effectiveSocketPath)" : ""))
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the volumes of the data directory (or, with --cluster, of the whole backend).")

        @OptionGroup var global: GlobalOptions

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        @Flag(
            name: .long,
            help: "Every volume in the backend with its owner node, generation and lease age (routers sharing it).")
        var cluster = false

        @Option(
            name: .long,
            help: ArgumentHelp(
                "With --cluster: the backend (name or URL); the default backend otherwise.", valueName: "backend"))
        var backend: String?

        func run() async throws {
            let configuration = try global.load()
            if cluster {
                try await listCluster(configuration)
                return
            }
            let volumes = try await ServiceAccess.with(configuration, command: "vd volume list", quiet: true) {
                (service) throws(VDError) in try await service.listVolumes()
            }
            if json {
                print(try jsonString(volumes))
                return
            }
            if volumes.isEmpty {
                print("no volumes in \(configuration.dataDirectory)")
                return
            }
            var rows = [["NAME", "SIZE", "CLUSTER", "BACKEND", "PARENT", "SNAPSHOTS", "STATE"]]
            for v in volumes {
                rows.append([
                    v.name, ByteSize.format(v.sizeBytes), ByteSize.format(UInt64(v.clusterSizeBytes)), v.backend,
                    v.parent.map { "\($0.volume)@\($0.snapshot)" } ?? "-", v.online ? "\(v.snapshots.count)" : "-",
                    v.online ? "served" : "stopped",
                ])
            }
            print(table(rows))
        }

        private func listCluster(_ configuration: VDConfiguration) async throws {
            let backend = self.backend
            let volumes = try await ServiceAccess.with(configuration, command: "vd volume list", quiet: true) {
                (service) throws(VDError) in try await service.clusterVolumes(backend: backend)
            }
            if json {
                print(try jsonString(volumes))
                return
            }
            if volumes.isEmpty {
                print("no volumes in the backend")
                return
            }
            var rows = [["NAME", "OWNER", "GENERATION", "LEASE", "LAST RENEWAL", "STATE"]]
            for v in volumes {
                let state: String
                if let error = v.error {
                    state = "record unreadable: \(error)"
                } else if v.owner == nil {
                    state = "never owned"
                } else if v.released == true {
                    state = "released" + (v.releasedTo.map { " to \($0)" } ?? "")
                } else if let age = v.leaseAgeSeconds, let lease = v.leaseSeconds, age > lease {
                    state = "lease expired?"
                } else {
                    state = "owned"
                }
                rows.append([
                    v.name, v.owner ?? "-", v.generation.map(String.init) ?? "-",
                    v.leaseSeconds.map { "\(Int($0)) s" } ?? "-",
                    v.leaseAgeSeconds.map { String(format: "%.1f s ago", $0) } ?? "-", state,
                ])
            }
            print(table(rows))
        }
    }

    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show a volume: configuration, parent, snapshots, space written and referenced.")

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        func run() async throws {
            let configuration = try global.load()
            let volume = try await ServiceAccess.with(configuration, command: "vd volume info", quiet: json) {
                (service) throws(VDError) in try await service.volumeStatus(name)
            }
            if json {
                print(try jsonString(volume))
                return
            }
            var lines = [
                "volume \(volume.name)",
                "  id:            \(volume.id)",
                "  size:          \(ByteSize.format(volume.sizeBytes)) (\(volume.sizeBytes) bytes), cluster \(ByteSize.format(UInt64(volume.clusterSizeBytes)))",
                "  created:       \(ISO8601DateFormatter().string(from: volume.createdAt))",
                "  backend:       \(volume.backend)",
                "  parent:        \(volume.parent.map { "\($0.volume)@\($0.snapshot) (thin clone)" } ?? "none")",
                "  state:         \(volume.online ? "served by vd serve, \(volume.connections ?? 0) NBD connection(s)" : "not served")",
            ]
            if let space = volume.space {
                lines.append(
                    "  written:       \(ByteSize.format(space.writtenBytes)) (all SCOs over the volume's life)")
                lines.append(
                    "  referenced:    \(ByteSize.format(space.referencedBytes)) (read by the volume or its snapshots)")
                lines.append("  reclaimable:   \(ByteSize.format(space.reclaimableBytes)) (vd scrub gives it back)")
                lines.append(
                    "  local flash:   \(ByteSize.format(space.localFlashBytes)); not yet on the backend: \(ByteSize.format(space.unstoredBytes))"
                )
            }
            if let error = volume.lastUploadError { lines.append("  upload error:  \(error)") }
            if let dtl = volume.dtl {
                let state = dtl.state.replacingOccurrences(of: "_", with: " ")
                lines.append(
                    "  DTL:           \(dtl.mode == "none" ? "none (writes not yet on the backend exist on this node only)" : "\(dtl.mode) to \(dtl.peer ?? "?"), \(state)")\(dtl.unansweredBytes > 0 ? ", \(ByteSize.format(dtl.unansweredBytes)) unanswered" : "")"
                )
                if let error = dtl.lastError, dtl.state != "in_sync" { lines.append("  DTL error:     \(error)") }
            }
            lines.append("  snapshots:     \(volume.snapshots.isEmpty ? "none" : "")")
            for snapshot in volume.snapshots {
                lines.append(
                    "    \(snapshot.name)  \(ISO8601DateFormatter().string(from: snapshot.createdAt))  +\(ByteSize.format(snapshot.writtenSincePreviousBytes))  \(snapshot.onBackend ? "on backend" : "local only")\(snapshot.clones.isEmpty ? "" : "  clones: " + snapshot.clones.joined(separator: ", "))"
                )
            }
            print(lines.joined(separator: "\n"))
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a volume: its data on the backend and on local flash. This cannot be undone.",
            discussion: "Refused while clones of it exist; its NBD clients are disconnected.")

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        func run() async throws {
            let configuration = try global.load()
            try await ServiceAccess.with(configuration, command: "vd volume delete") { (service) throws(VDError) in
                try await service.deleteVolume(name)
            }
            print("deleted volume \(name)")
        }
    }

    struct Attach: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Register a volume that exists on a backend (move it to this node, or recover a lost disk).",
            discussion: """
                Reads the volume's configuration from its namespace on the backend, registers it here and rebuilds
                its map from the backend's TLogs (with progress), up to the last TLog uploaded. A clone needs its
                parent attached first. Stop the router that owned the volume first (SIGTERM uploads everything):
                two routers writing one namespace would damage it.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name (its namespace on the backend).")
        var name: String

        @Option(
            name: .long,
            help: ArgumentHelp(
                "Backend: a configured name or a URL (s3://BUCKET?endpoint=HOST:PORT, file:///DIR).",
                valueName: "name|url"))
        var backend: String?

        func run() async throws {
            let configuration = try global.load()
            let request = AttachVolumeRequest(name: name, backend: backend)
            let status = try await ServiceAccess.with(configuration, command: "vd volume attach") {
                (service) throws(VDError) in
                try await service.attachVolume(request)
            }
            print(
                "attached volume \(status.name) (\(ByteSize.format(status.sizeBytes))) from backend '\(status.backend)' with \(status.snapshots.count) snapshot(s)"
            )
        }
    }
}

func directoryBytes(_ path: String) -> UInt64 {
    let names = (try? Syscall.listDirectory(path)) ?? []
    var total: UInt64 = 0
    for name in names {
        if let attributes = try? FileManager.default.attributesOfItem(atPath: path + "/" + name),
            let size = attributes[.size] as? NSNumber
        {
            total += size.uint64Value
        }
    }
    return total
}

func jsonString<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.dateEncodingStrategy = .iso8601
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

func table(_ rows: [[String]]) -> String {
    guard let first = rows.first else { return "" }
    var widths = first.map(\.count)
    for row in rows {
        for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) }
    }
    return rows.map { row in
        row.enumerated().map { i, cell in cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ").trimmingCharacters(in: .whitespaces)
    }.joined(separator: "\n")
}

extension VolumeCommand {
    struct ImportDiff: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "import-diff",
            abstract: "Apply a stream written by `vd snapshot export-diff` to a volume.",
            discussion: """
                The whole stream is verified first (every record's checksum and its place in the stream): a damaged
                or truncated file changes nothing. Then its extents are written (zero extents unmapped) and flushed.
                Apply a full copy to an empty volume of the same size, then each increment in order to the volume
                holding its FROM; --snapshot names the version just restored, so the next increment has its base.
                Unless --force, an increment needs a snapshot named after its FROM with no change since, and a full
                copy an empty volume. An apply that fails midway (a full disk) leaves the volume partly updated:
                run the same import again (it writes absolute contents, so repeating it is harmless).
                """)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Volume name.") var volume: String
        @Argument(help: "The stream file.") var file: String
        @Option(name: .long, help: "Take a snapshot with this name once the stream is applied.") var snapshot: String?
        @Flag(
            name: .long,
            help:
                "Apply even if the volume does not hold the stream's base (a snapshot named FROM, unchanged since; an empty volume for a full copy)."
        )
        var force = false

        func run() async throws {
            let configuration = try global.load()
            let request = ImportDiffRequest(path: absolutePath(file), snapshot: snapshot, force: force)
            let status = try await ServiceAccess.with(configuration, command: "vd volume import-diff") {
                (service) throws(VDError) in try await service.importDiff(volume, request)
            }
            print(
                "imported \(file) into \(volume) (\(status.from.map { "\($0) -> " } ?? "full copy of ")\(status.to)): \(status.extents) extents, \(ByteSize.format(status.dataBytes)) data, \(ByteSize.format(status.zeroBytes)) zeroed\(status.snapshot.map { "; snapshot \($0) taken" } ?? "")"
            )
        }
    }

    struct Move: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move a volume this router owns to another router sharing the backend (vd serve --node).",
            discussion: """
                Disconnects the volume's NBD clients here, uploads everything still on local flash (the volume stays
                here if that does not finish within the drain timeout), releases its owner record to NODE and has
                NODE take it at once (its cluster API, with the shared token in VD_CLUSTER_TOKEN). Clients then
                connect to NODE; this router refuses the volume from then on.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        @Option(name: .long, help: ArgumentHelp("The node to move the volume to.", valueName: "node"))
        var to: String

        @Option(
            name: .long, help: ArgumentHelp("Seconds to wait for the upload before giving up.", valueName: "seconds"))
        var drainTimeout: Double?

        func run() async throws {
            let configuration = try global.load()
            let request = MoveVolumeRequest(to: to, drainTimeoutSeconds: drainTimeout)
            let name = self.name
            let moved = try await ServiceAccess.with(configuration, command: "vd volume move") {
                (service) throws(VDError) in
                try await service.moveVolume(name, request)
            }
            print(
                "moved volume \(moved.volume) from \(moved.from) to \(moved.to) (generation \(moved.generation)) in \(String(format: "%.2f", moved.totalSeconds)) s; \(ByteSize.format(moved.unstoredBytesAtStart)) were uploaded first (\(String(format: "%.2f", moved.drainSeconds)) s)"
            )
        }
    }

    struct Takeover: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Take a volume whose owner router is gone (stopped renewing its lease) and serve it here.",
            discussion: """
                Needs a router started with --node. Waits the owner's lease out (lease x 1.01/0.99 + 1 s, measured
                by this router's clock from its first read of the owner record), then writes the next generation of
                the record and opens the volume from the backend: everything the old owner stored is there. With a
                DTL (`vd volume dtl`), the writes not yet stored are fetched from the volume's DTL peer (which may be
                this router) and recovered too; if the peer cannot be reached, or was not in sync when the owner was
                lost, the takeover says what may be lost and stops unless --accept-loss is given. Without a DTL, what
                was only on the old owner's flash is not recovered. A live owner (one that renews meanwhile) keeps
                the volume; use `vd volume move` for it. `vd volume attach` never takes a live lease.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        @Option(
            name: .long,
            help: ArgumentHelp(
                "The backend of the volume (name or URL), when it is not registered here.", valueName: "backend"))
        var backend: String?

        @Flag(
            name: .customLong("accept-loss"),
            help:
                "Take it over even if writes the lost owner replied may be lost (its DTL peer is unreachable or was not in sync)."
        )
        var acceptLoss = false

        func run() async throws {
            let configuration = try global.load()
            let request = TakeoverVolumeRequest(name: name, backend: backend, acceptLoss: acceptLoss ? true : nil)
            let started = Date()
            let status = try await ServiceAccess.with(configuration, command: "vd volume takeover") {
                (service) throws(VDError) in try await service.takeoverVolume(request)
            }
            print(
                "took volume \(status.name) over in \(String(format: "%.1f", Date().timeIntervalSince(started))) s; served here now"
            )
        }
    }

    struct DTL: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dtl",
            abstract: "Set how a volume's writes are mirrored to a DTL peer until the backend holds them.",
            discussion: """
                sync: a write is replied once the peer received it, a flush or FUA once the peer made it durable: with
                the state in sync, no flushed write is lost when the owner's node is lost (`vd volume takeover`
                fetches them from the peer). async: flushes as in sync, writes do not wait for the peer (up to 64 MiB
                may be unanswered). none: no mirror. The peer is another node running `vd serve --dtl-listen`; without
                --peer one is chosen among the cluster's node records. An unreachable peer makes the volume
                degraded (writes continue on local flash; `vd volume info` and the metric vd_volume_dtl_state show
                it) until the peer returns and has caught up.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        @Option(name: .long, help: ArgumentHelp("sync, async or none.", valueName: "mode"))
        var mode: String

        @Option(name: .long, help: ArgumentHelp("The peer's node name.", valueName: "node"))
        var peer: String?

        func run() async throws {
            let configuration = try global.load()
            let request = SetDTLRequest(mode: mode, peer: peer)
            let status = try await ServiceAccess.with(configuration, command: "vd volume dtl") {
                (service) throws(VDError) in try await service.setVolumeDTL(name, request)
            }
            if let dtl = status.dtl, dtl.mode != "none" {
                print(
                    "volume \(status.name): DTL \(dtl.mode) to \(dtl.peer ?? "?") (\(dtl.state.replacingOccurrences(of: "_", with: " ")))"
                )
            } else {
                print("volume \(status.name): no DTL")
            }
        }
    }
}
