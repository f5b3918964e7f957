// The `vd` command line: one root command, subcommands as nested types, shared options in an OptionGroup.

package import ArgumentParser
import Foundation
import Logging
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
            ServeCommand.self, VolumeCommand.self, SnapshotCommand.self, CloneCommand.self, ScrubCommand.self, CheckCommand.self,
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

    @Option(name: .long, help: ArgumentHelp("Log level: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    package var logLevel: String?

    package init() {}

    /// The configuration in effect for this invocation.
    package func load() throws(VDError) -> VDConfiguration {
        var configuration = try VDConfiguration.load(path: config ?? ProcessInfo.processInfo.environment["VD_CONFIG"])
        if let dataDir { configuration.dataDirectory = dataDir }
        if let logLevel { configuration.logLevel = logLevel }
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
