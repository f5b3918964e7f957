// The `vd` command line: one root command, subcommands as nested types, shared options in an OptionGroup.

package import ArgumentParser
import Foundation
import Logging
import Metrics
import Prometheus
package import VolumeCore

/// `vd`: the VolumeDriver command line.
package struct VDCommand: AsyncParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "vd",
        abstract: "VolumeDriver: thin block volumes on object storage, exported over NBD.",
        discussion: """
            Start the volume router with `vd serve`; attach QEMU with
              -drive file=nbd+unix:///VOLUME?socket=SOCKET,format=raw
            Settings come from --config FILE (TOML, see conf/vd.toml) and the options below; without a file, the
            defaults apply (data directory: $VD_DATA_DIR, /var/lib/vd for root, else ~/.local/share/vd).
            """,
        version: VDVersion.current,
        subcommands: [
            ServeCommand.self, VolumeCommand.self, SnapshotCommand.self, CloneCommand.self, ScrubCommand.self,
            CheckCommand.self,
            BackendCommand.self,
        ]
    )

    package init() {}

    /// Parses the process arguments and runs the chosen command (what `@main` would do; the executable target
    /// stays a one-line file).
    package static func runFromCommandLine() async {
        do {
            var command = try parseAsRoot(nil)
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}

package enum VDVersion {
    package static let current = "0.1.0"
}

/// Options every command takes.
package struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Configuration file (TOML).", valueName: "file"))
    package var config: String?

    @Option(name: .long, help: ArgumentHelp("Data directory (overrides the configuration).", valueName: "dir"))
    package var dataDir: String?

    @Option(
        name: .long,
        help: ArgumentHelp("Log level: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    package var logLevel: String?

    @Option(
        name: .customLong("router"),
        help: ArgumentHelp(
            "Send the command to this router's cluster API (vd serve --cluster-listen) instead of the local one; the token comes from VD_CLUSTER_TOKEN.",
            valueName: "host:port"))
    package var remoteRouter: String?

    package init() {}

    /// The configuration in effect for this invocation.
    package func load() throws(VDError) -> VDConfiguration {
        var configuration = try VDConfiguration.load(path: config ?? ProcessInfo.processInfo.environment["VD_CONFIG"])
        if let dataDir { configuration.dataDirectory = dataDir }
        if let logLevel { configuration.logLevel = logLevel }
        if let remoteRouter { configuration.remoteRouter = remoteRouter }
        configuration.dataDirectory = Self.absolute(configuration.dataDirectory)
        if let flash = configuration.flashDirectory { configuration.flashDirectory = Self.absolute(flash) }
        try configuration.validate()
        return configuration
    }

    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        return FileManager.default.currentDirectoryPath + "/" + path
    }
}

/// Sets up logging to standard error once per process.
enum LoggingSetup {
    private static let done = LockedFlag()

    static func bootstrap(level: String) {
        guard done.setOnce() else { return }
        let parsed = Logger.Level(rawValue: level) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = parsed
            return handler
        }
    }
}

final class LockedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func setOnce() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if value { return false }
        value = true
        return true
    }
}

/// Sets up the metrics backend once per process: swift-metrics to a Prometheus registry, whose text `vd serve`
/// serves at /metrics (management socket, and `[metrics] listen`). Latency buckets span what a block device sees:
/// 25 µs (a write into the page cache) to 10 s (an upload, a stalled backend).
enum MetricsSetup {
    private static let done = LockedFlag()
    static let registry = PrometheusCollectorRegistry()

    static func bootstrap() {
        guard done.setOnce() else { return }
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(25), .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
            .milliseconds(2500), .seconds(5), .seconds(10),
        ]
        MetricsSystem.bootstrap(factory)
    }

    /// The Prometheus text of every metric recorded so far (empty before `bootstrap`).
    static func exposition() -> String { registry.emitToString() }
}
