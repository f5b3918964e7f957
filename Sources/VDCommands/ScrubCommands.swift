// `vd scrub` and `vd check`: batch commands working from the backend namespace (they may run on any node, also
// while the router serves the volume). Meant for cron: see conf/vd-scrub.cron and conf/vd-scrub.timer.

import ArgumentParser
import FlashIO
import Foundation
import Logging
import ManagementAPI
import ObjectStore
import Scrubber
import VolumeCore
import VolumeRouter

struct ScrubCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scrub",
        abstract: "Compact SCOs that are mostly dead and give their space back (online, crash-safe).",
        discussion: """
            Rewrites the live clusters of SCOs whose live fraction is under --threshold into new SCOs and records a
            scrub result on the backend; the router owning the volume applies it online and then deletes the old
            SCOs. Safe to kill at any point and to run again; one scrubber per volume at a time (a lease on the
            backend). Exit status: 0 when every volume was scrubbed (or needed nothing), 1 otherwise.
            """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .long, help: ArgumentHelp("Volume to scrub (repeatable).", valueName: "name"))
    var volume: [String] = []

    @Flag(name: .long, help: "Scrub every volume of the data directory.")
    var all = false

    @Option(name: .long, help: ArgumentHelp("Rewrite SCOs whose live fraction is below this (0 to 1).", valueName: "fraction"))
    var threshold: Double = 0.5

    @Option(name: .long, help: ArgumentHelp("Process at most this many bytes of SCOs per volume (e.g. 10G).", valueName: "size"))
    var maxBytes: String?

    @Option(name: .long, help: ArgumentHelp("Stop picking SCOs after this many seconds.", valueName: "seconds"))
    var maxSeconds: Double?

    @Option(name: .long, help: ArgumentHelp("Read at most this many bytes per second from the backend (e.g. 50M).", valueName: "size"))
    var rate: String?

    @Option(
        name: .long,
        help: ArgumentHelp("Backend (name or URL) holding the volumes, when they are not registered here.", valueName: "name|url"))
    var backend: String?

    @Flag(name: .long, help: "Only report what would be done.")
    var dryRun = false

    @Flag(name: .long, help: "Print the summary as JSON.")
    var json = false

    func validate() throws {
        guard all != !volume.isEmpty else { throw ValidationError("give --volume NAME (repeatable) or --all") }
        guard (0...1).contains(threshold) else { throw ValidationError("--threshold must be between 0 and 1") }
        do {
            if let maxBytes { _ = try ByteSize.parse(maxBytes) }
            if let rate { _ = try ByteSize.parse(rate) }
        } catch {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        let configuration = try global.load()
        LoggingSetup.bootstrap(level: configuration.logLevel == "info" ? "warning" : configuration.logLevel)
        let backends = ConfiguredBackends(configuration: configuration)
        let registrations = try VolumeRegistry.list(dataDirectory: configuration.dataDirectory, fs: PosixFileSystem())
        var targets: [(VolumeName, String)] = []
        if all {
            targets = registrations.map { ($0.config.name, backend ?? $0.backend) }
        } else {
            for name in volume {
                let volumeName = try VolumeName(validating: name)
                if let backend {
                    targets.append((volumeName, backend))
                } else if let registration = registrations.first(where: { $0.config.name == volumeName }) {
                    targets.append((volumeName, registration.backend))
                } else {
                    throw VDError(
                        .notFound,
                        "no volume named \(name) in \(configuration.dataDirectory); give --backend to scrub a namespace registered elsewhere")
                }
            }
        }
        var options = ScrubOptions()
        options.liveFractionThreshold = threshold
        options.maxBytes = try maxBytes.map { (text) throws(VDError) in try ByteSize.parse(text) } ?? .max
        options.maxSeconds = maxSeconds ?? .infinity
        options.rateBytesPerSecond = try rate.map { (text) throws(VDError) in try ByteSize.parse(text) } ?? 0
        options.scoSizeBytes = configuration.volumeOptions.scoSizeBytes
        options.dryRun = dryRun
        options.workDirectory = configuration.dataDirectory + "/scrub-tmp"
        try Syscall.makeDirectories(options.workDirectory)
        let interactive = isatty(2) != 0 && !json
        var summaries: [ScrubSummary] = []
        var failures: [String] = []
        let router = await ManagementClient.isListening(socketPath: configuration.apiSocketPath)
            ? ManagementClient(socketPath: configuration.apiSocketPath) : nil
        for (name, backendName) in targets {
            var volumeOptions = options
            volumeOptions.compress = backends.compressesUploads(backendName)
            let result = await Self.scrubOne(
                name, backendName: backendName, backends: backends, options: volumeOptions, interactive: interactive)
            switch result {
            case .success(let summary):
                if summary.resultID != nil, let router { try? await router.applyScrubResults(name.rawValue) }
                summaries.append(summary)
                if !json { print(Self.describe(summary)) }
            case .failure(let error):
                failures.append("\(name): \(error.message)")
                printError("scrub of \(name) failed: \(error.message)")
            }
        }
        if json { print(try jsonString(summaries)) }
        if !failures.isEmpty { throw ExitCode(1) }
    }

    static func scrubOne(
        _ name: VolumeName, backendName: String, backends: ConfiguredBackends, options: ScrubOptions, interactive: Bool
    ) async -> Result<ScrubSummary, VDError> {
        do throws(VDError) {
            let store = try backends.store(named: backendName)
            let scrubber = Scrubber(
                volume: name, backend: store, options: options, env: .live(pool: .singleton), logger: Logger(label: "vd scrub"),
                progress: { message in
                    if interactive { FileHandle.standardError.write(Data(("\r\u{1B}[K" + message).utf8)) }
                })
            let summary = try await scrubber.run()
            if interactive { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
            return .success(summary)
        } catch {
            return .failure(error)
        }
    }

    static func describe(_ s: ScrubSummary) -> String {
        var text =
            "\(s.volume): scanned \(s.scannedSCOs) SCOs (\(ByteSize.format(s.scannedBytes))), \(ByteSize.format(s.liveBytes)) live; "
        if s.rewrittenSCOs > 0 {
            text +=
                "rewrote \(s.rewrittenSCOs) SCOs (\(ByteSize.format(s.sourceBytes))) copying \(ByteSize.format(s.copiedBytes)); reclaimable \(ByteSize.format(s.reclaimableBytes)) once the router applies result \(s.resultID.map(String.init) ?? "-")"
        } else {
            text += "\(s.candidateSCOs) candidate(s), \(s.stoppedBecause ?? "nothing rewritten")"
        }
        if s.pendingResults > 0 { text += "; \(s.pendingResults) earlier result(s) not yet applied" }
        if s.removedLeftovers > 0 { text += "; removed \(s.removedLeftovers) SCO(s) left by an interrupted scrub" }
        return text + String(format: " (%.1f s)", s.seconds)
    }
}

struct CheckCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Verify a volume's namespace on the backend (references, checksums, orphans).",
        discussion: """
            Every TLog must verify, every live cluster must resolve to an SCO object that exists, is not marked for
            deletion and matches the checksum its history recorded. Orphans (SCOs an interrupted scrub left, or
            already-relocated SCOs not yet deleted) are listed; --repair removes them and nothing else.
            Exit status 0 when clean, 1 when a problem was found.
            """)

    @OptionGroup var global: GlobalOptions

    @Argument(help: "Volume name.")
    var volume: String

    @Flag(name: .long, help: "Remove orphans.")
    var repair = false

    @Flag(name: .long, help: "Check existence only, do not read SCOs.")
    var quick = false

    @Flag(name: .long, help: "Also verify every live cluster's own checksum.")
    var clusters = false

    @Option(name: .long, help: ArgumentHelp("Backend (name or URL), when the volume is not registered here.", valueName: "name|url"))
    var backend: String?

    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false

    func run() async throws {
        let configuration = try global.load()
        LoggingSetup.bootstrap(level: configuration.logLevel == "info" ? "warning" : configuration.logLevel)
        let name = try VolumeName(validating: volume)
        let backendName: String
        if let backend {
            backendName = backend
        } else if let registration = try VolumeRegistry.read(dataDirectory: configuration.dataDirectory, name: name, fs: PosixFileSystem()) {
            backendName = registration.backend
        } else {
            throw VDError(.notFound, "no volume named \(name) in \(configuration.dataDirectory); give --backend")
        }
        let store = try ConfiguredBackends(configuration: configuration).store(named: backendName)
        var check = NamespaceCheck()
        check.quick = quick
        check.clusters = clusters
        check.repair = repair
        check.workDirectory = configuration.dataDirectory + "/scrub-tmp"
        try Syscall.makeDirectories(check.workDirectory)
        let report = try await check.run(volume: name, backend: store, env: .live(pool: .singleton)) { _ in }
        if json {
            print(try jsonString(report))
        } else {
            print(
                "\(report.volume): \(report.tlogs) TLogs, \(report.liveVersions) live cluster versions in \(report.referencedSCOs) SCOs, \(ByteSize.format(report.verifiedBytes)) verified"
            )
            for problem in report.problems { print("  PROBLEM: \(problem)") }
            for orphan in report.orphans {
                print("  orphan: \(orphan)\(report.removedOrphans.contains(orphan) ? " (removed)" : "")")
            }
            for object in report.inFlight { print("  not yet in a TLog (an upload in flight?): \(object)") }
            print(report.clean ? "clean" : "NOT clean")
        }
        if !report.clean { throw ExitCode(1) }
    }
}
