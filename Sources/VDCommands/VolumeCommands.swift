// `vd volume create|list|info|delete`. They work on the data directory directly and take its lock, so they are
// refused (naming the holder) while `vd serve` owns it.

import ArgumentParser
import FlashIO
import Foundation
import ObjectStore
import VolumeCore
import VolumeRouter

struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume",
        abstract: "Create, list, inspect and delete volumes.",
        subcommands: [Create.self, List.self, Info.self, Delete.self, Attach.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a thin-provisioned volume (it uses no space until written).")

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name: letters, digits, '.', '_', '-'.")
        var name: String

        @Option(name: .long, help: ArgumentHelp("Size, with an optional K, M, G or T suffix (e.g. 20G).", valueName: "size"))
        var size: String

        @Option(name: .long, help: ArgumentHelp("Cluster size, a power of two from 4K to 64K (default 4K).", valueName: "size"))
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
            let volumeName = try VolumeName(validating: name)
            let sizeBytes = try ByteSize.parse(size)
            let clusterBytes = try clusterSize.map { (text) throws(VDError) -> UInt32 in
                let value = try ByteSize.parse(text)
                guard value <= UInt64(UInt32.max) else { throw VDError.invalidArgument("cluster size \(text) is too large") }
                return UInt32(value)
            } ?? configuration.clusterSizeBytes
            let lock = try takeLock(configuration, holder: "vd volume create")
            defer { lock.release() }
            let backendName = backend ?? configuration.defaultBackend
            let backends = ConfiguredBackends(configuration: configuration)
            let store = try backends.store(named: backendName)
            try await store.verifyAccess()
            let config = try await VolumeAdministration.create(
                dataDirectory: configuration.dataDirectory, name: volumeName, sizeBytes: sizeBytes,
                clusterSizeBytes: clusterBytes, backendName: backendName, backend: store)
            print(
                "created volume \(config.name): \(ByteSize.format(config.sizeBytes)), cluster \(ByteSize.format(UInt64(config.clusterSizeBytes))), backend '\(backendName)'"
            )
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the volumes of the data directory.")

        @OptionGroup var global: GlobalOptions

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        func run() async throws {
            let configuration = try global.load()
            let registrations = try VolumeRegistry.list(dataDirectory: configuration.dataDirectory)
            if json {
                let items = registrations.map {
                    VolumeSummary(
                        name: $0.config.name.rawValue, sizeBytes: $0.config.sizeBytes,
                        clusterSizeBytes: $0.config.clusterSizeBytes, backend: $0.backend, id: $0.config.id.description)
                }
                print(try jsonString(items))
                return
            }
            if registrations.isEmpty {
                print("no volumes in \(configuration.dataDirectory)")
                return
            }
            var rows = [["NAME", "SIZE", "CLUSTER", "BACKEND"]]
            for r in registrations {
                rows.append([
                    r.config.name.rawValue, ByteSize.format(r.config.sizeBytes),
                    ByteSize.format(UInt64(r.config.clusterSizeBytes)), r.backend,
                ])
            }
            print(table(rows))
        }
    }

    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a volume's configuration and space use.")

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        func run() async throws {
            let configuration = try global.load()
            let volumeName = try VolumeName(validating: name)
            guard let registration = try VolumeRegistry.read(dataDirectory: configuration.dataDirectory, name: volumeName)
            else { throw unknownVolume(volumeName, configuration) }
            let backends = ConfiguredBackends(configuration: configuration)
            let store = try backends.store(named: registration.backend)
            let objects = try await store.list(prefix: registration.namespace + "/")
            let scos = objects.filter { $0.name.hasPrefix(registration.namespace + "/sco/") }
            let tlogs = objects.filter { $0.name.hasPrefix(registration.namespace + "/tlog/") }
            let flash = configuration.effectiveFlashDirectory + "/" + volumeName.rawValue
            let localSCOBytes = directoryBytes(flash + "/sco")
            let summary = VolumeDetails(
                name: volumeName.rawValue, id: registration.config.id.description, sizeBytes: registration.config.sizeBytes,
                clusterSizeBytes: registration.config.clusterSizeBytes, createdAt: registration.config.createdAt,
                backend: registration.backend, backendDescription: store.description, namespace: registration.namespace,
                backendSCOs: scos.count, backendSCOBytes: scos.reduce(0) { $0 + $1.sizeBytes }, backendTLogs: tlogs.count,
                localFlashDirectory: flash, localSCOBytes: localSCOBytes)
            if json {
                print(try jsonString(summary))
                return
            }
            print(
                """
                volume \(summary.name)
                  id:             \(summary.id)
                  size:           \(ByteSize.format(summary.sizeBytes)) (\(summary.sizeBytes) bytes)
                  cluster size:   \(ByteSize.format(UInt64(summary.clusterSizeBytes)))
                  created:        \(ISO8601DateFormatter().string(from: summary.createdAt))
                  backend:        '\(summary.backend)' (\(summary.backendDescription)), namespace \(summary.namespace)/
                  on the backend: \(summary.backendSCOs) SCOs, \(ByteSize.format(summary.backendSCOBytes)); \(summary.backendTLogs) TLogs
                  local flash:    \(summary.localFlashDirectory), \(ByteSize.format(summary.localSCOBytes)) of SCOs
                """)
        }
    }

    struct Attach: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Register a volume that exists on a backend (move it to this node, or recover a lost disk).",
            discussion: """
                Reads the volume's configuration from its namespace on the backend and registers it here; the next
                `vd serve` rebuilds its map from the backend's TLogs (with progress) and serves it, up to the last
                TLog uploaded. Stop the router that owned the volume first (SIGTERM uploads everything): two routers
                writing one namespace would damage it.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name (its namespace on the backend).")
        var name: String

        @Option(
            name: .long,
            help: ArgumentHelp(
                "Backend: a configured name or a URL (s3://BUCKET?endpoint=HOST:PORT, file:///DIR).", valueName: "name|url"))
        var backend: String?

        func run() async throws {
            let configuration = try global.load()
            let volumeName = try VolumeName(validating: name)
            let lock = try takeLock(configuration, holder: "vd volume attach")
            defer { lock.release() }
            let backendName = backend ?? configuration.defaultBackend
            let store = try ConfiguredBackends(configuration: configuration).store(named: backendName)
            try await store.verifyAccess()
            let attached = try await VolumeAdministration.attach(
                dataDirectory: configuration.dataDirectory, flashDirectory: configuration.effectiveFlashDirectory,
                name: volumeName, backendName: backendName, backend: store)
            print(
                "attached volume \(attached.config.name) (\(ByteSize.format(attached.config.sizeBytes))) from \(store.description): \(attached.tlogs) TLogs, \(ByteSize.format(attached.bytes)) of SCOs; `vd serve` rebuilds its map and serves it"
            )
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a volume: its data on the backend and on local flash. This cannot be undone.")

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Volume name.")
        var name: String

        func run() async throws {
            let configuration = try global.load()
            let volumeName = try VolumeName(validating: name)
            let lock = try takeLock(configuration, holder: "vd volume delete")
            defer { lock.release() }
            guard let registration = try VolumeRegistry.read(dataDirectory: configuration.dataDirectory, name: volumeName)
            else { throw unknownVolume(volumeName, configuration) }
            let store = try ConfiguredBackends(configuration: configuration).store(named: registration.backend)
            try await VolumeAdministration.delete(
                dataDirectory: configuration.dataDirectory, flashDirectory: configuration.effectiveFlashDirectory,
                registration: registration, backend: store)
            print("deleted volume \(volumeName)")
        }
    }
}

struct VolumeSummary: Codable {
    var name: String
    var sizeBytes: UInt64
    var clusterSizeBytes: UInt32
    var backend: String
    var id: String
}

struct VolumeDetails: Codable {
    var name: String
    var id: String
    var sizeBytes: UInt64
    var clusterSizeBytes: UInt32
    var createdAt: Date
    var backend: String
    var backendDescription: String
    var namespace: String
    var backendSCOs: Int
    var backendSCOBytes: UInt64
    var backendTLogs: Int
    var localFlashDirectory: String
    var localSCOBytes: UInt64
}

func unknownVolume(_ name: VolumeName, _ configuration: VDConfiguration) -> VDError {
    VDError(.notFound, "no volume named \(name) in \(configuration.dataDirectory) (see `vd volume list`)")
}

/// Takes the data directory lock for an offline command, explaining what to do if `vd serve` holds it.
func takeLock(_ configuration: VDConfiguration, holder: String) throws(VDError) -> DirectoryLock {
    try Syscall.makeDirectories(configuration.dataDirectory)
    do {
        return try DirectoryLock(directory: configuration.dataDirectory, holder: holder)
    } catch where error.code == .busy {
        throw VDError(.busy, "\(error.message); stop it first (this command works on the data directory directly)")
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
