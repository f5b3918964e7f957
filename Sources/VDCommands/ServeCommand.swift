// `vd serve`: the volume router. Opens (recovering) every volume of the data directory, exports each over NBD, and
// on SIGTERM or SIGINT stops taking I/O, makes everything durable, seals and uploads what is still only local
// (bounded by shutdown.drain_timeout_seconds), and exits 0 only when the backend holds all of it.

import ArgumentParser
import FlashIO
import Foundation
import Logging
import ManagementAPI
import NBDServer
import NIOCore
import NIOPosix
import ObjectStore
import UnixSignals
import VolumeCore
import VolumeRouter

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the volume router: export every volume of the data directory over NBD.",
        discussion: """
            Each volume is an NBD export named after it. Attach QEMU with
              qemu-system-x86_64 -drive file=nbd+unix:///VOLUME?socket=SOCKET,format=raw ...
            SIGTERM/SIGINT: stop taking I/O, upload everything still local, exit 0 once the backend holds it all
            (exit 1 naming what is left if shutdown.drain_timeout_seconds passes first).
            """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .long, help: ArgumentHelp("Unix socket to serve NBD on (default DATA/nbd.sock).", valueName: "path"))
    var nbdSocket: String?

    @Option(
        name: .long,
        help: ArgumentHelp("Also serve NBD over TCP on HOST:PORT (loopback recommended).", valueName: "host:port"))
    var nbdTcp: String?

    @Option(name: .long, help: ArgumentHelp("Seconds to wait for uploads at shutdown.", valueName: "seconds"))
    var drainTimeout: Double?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Serve GET /metrics (Prometheus text) over TCP on HOST:PORT ([metrics] listen).", valueName: "host:port"))
    var metricsListen: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "This router's node name when several routers share a backend ([cluster] node): each volume is served under an owner lease on the backend.",
            valueName: "name"))
    var node: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Serve the management API to other routers on TCP HOST:PORT ([cluster] listen); needs --node and the shared token in VD_CLUSTER_TOKEN.",
            valueName: "host:port"))
    var clusterListen: String?

    @Option(
        name: .customLong("dtl-listen"),
        help: ArgumentHelp(
            "Serve as DTL peer for volumes of other routers on TCP HOST:PORT ([dtl] listen); needs --node, --cluster-listen and VD_CLUSTER_TOKEN.",
            valueName: "host:port"))
    var dtlListen: String?

    func run() async throws {
        var configuration = try global.load()
        if let nbdSocket { configuration.nbdSocketPath = GlobalOptions.absolute(nbdSocket) }
        if let nbdTcp {
            let (host, port) = try VDConfiguration.parseHostPort(nbdTcp)
            configuration.nbdTCPHost = host
            configuration.nbdTCPPort = port
        }
        if let drainTimeout { configuration.drainTimeoutSeconds = drainTimeout }
        if let node { configuration.clusterNode = node }
        if let clusterListen { configuration.clusterListen = clusterListen }
        if let dtlListen { configuration.dtlListen = dtlListen }
        if let metricsListen {
            let (host, port) = try VDConfiguration.parseHostPort(metricsListen)
            configuration.metricsHost = host
            configuration.metricsPort = port
        }
        LoggingSetup.bootstrap(level: configuration.logLevel)
        MetricsSetup.bootstrap()
        let logger = Logger(label: "vd")
        let backends = ConfiguredBackends(configuration: configuration)

        // Check every backend a volume uses before taking I/O: a wrong key or a missing bucket is said up front.
        let registrations = try VolumeRegistry.list(dataDirectory: configuration.dataDirectory, fs: PosixFileSystem())
        for name in Set(registrations.map(\.backend) + [configuration.defaultBackend]).sorted() {
            let store = try backends.store(named: name)
            do {
                try await store.verifyAccess()
            } catch {
                throw VDError(error.code, "backend '\(name)' (\(store.description)) is not usable: \(error.message)")
            }
        }
        // Multipart uploads of the volumes served here that a crash left in progress: nothing uploads them now.
        for registration in registrations {
            guard let s3 = try backends.store(named: registration.backend).unwrapped as? S3Store else { continue }
            do throws(VDError) {
                let aborted = try await s3.abortMultipartUploads(prefix: registration.namespace + "/")
                if aborted > 0 {
                    logger.info(
                        "aborted \(aborted) multipart upload(s) of volume \(registration.config.name) left by an earlier run"
                    )
                }
            } catch {
                logger.warning(
                    "could not list multipart uploads of volume \(registration.config.name): \(error.message)")
            }
        }

        let socketDirectory = (configuration.effectiveSocketPath as NSString).deletingLastPathComponent
        if !socketDirectory.isEmpty {
            try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true)
        }
        let clusterToken = ProcessInfo.processInfo.environment["VD_CLUSTER_TOKEN"]
        // The DTL peer service first: other routers' mirrors may be waiting for it.
        var dtlPeer: DTLPeerService?
        var dtlAddress: String?
        if let listen = configuration.dtlListen {
            guard configuration.clusterNode != nil, configuration.clusterListen != nil else {
                throw VDError(
                    .configuration,
                    "--dtl-listen needs a node name and --cluster-listen (its address is in the node record)")
            }
            guard let token = clusterToken, token.count >= 16 else {
                throw VDError(
                    .configuration, "--dtl-listen needs a shared token of at least 16 characters in VD_CLUSTER_TOKEN")
            }
            let (service, address) = try await DTLPeerService.start(
                configuration: configuration, listen: listen, token: token, logger: logger)
            dtlPeer = service
            dtlAddress = address
            logger.info(
                "DTL peer service at \(address)\(configuration.clusterTLS.certificatePath != nil ? " (TLS)" : "") (journals in \(configuration.effectiveDTLDirectory))"
            )
        }
        let router: Router
        do {
            router = try Router(configuration: configuration.routerConfiguration, backends: backends, logger: logger)
        } catch {
            await dtlPeer?.stop()
            throw error
        }
        // Clones whose parent another router owns ask that router to record them (docs/design.md).
        router.remoteCloneRegistrar = RouterService.cloneRegistrar(configuration: configuration, backends: backends)
        if configuration.clusterNode != nil, let token = clusterToken, token.count >= 16 {
            do {
                router.enableDTL(
                    try RouterService.dtlNetwork(
                        configuration: configuration, backends: backends, token: token,
                        group: RouterService.dtlGroup))
            } catch {
                await dtlPeer?.stop()
                _ = await router.stop(drainTimeoutSeconds: nil)
                throw error
            }
        }
        let failures = await router.openAll { message in logger.info("\(message)") }
        for (name, error) in failures { printError("volume \(name) is not served: \(error.message)") }

        var nbdConfiguration = NBDServerConfiguration(
            unixSocketPath: configuration.effectiveSocketPath, tcpHost: configuration.nbdTCPHost,
            tcpPort: configuration.nbdTCPPort, maxConnections: configuration.nbdMaxConnections,
            maxInFlightRequestsPerConnection: configuration.nbdMaxInFlightPerConnection)
        nbdConfiguration.maximumPayloadBytes = Limits.requestBytesMax
        nbdConfiguration.tls = configuration.nbdTLS
        let server = NBDServer(
            configuration: nbdConfiguration,
            exports: RouterExports(router: router, readOnly: configuration.readOnlyExports),
            eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger)
        do {
            try nbdConfiguration.validate()
            try await server.start()
        } catch {
            _ = await router.stop(drainTimeoutSeconds: nil)
            throw error
        }
        let service = RouterService(router: router, backends: backends, configuration: configuration, online: true)
        service.nbd.withLock { $0 = server }
        let api = ManagementServer(
            socketPath: configuration.apiSocketPath, service: service, group: MultiThreadedEventLoopGroup.singleton,
            logger: logger)
        var clusterServer: ManagementServer?
        if let listen = configuration.clusterListen {
            guard let node = configuration.clusterNode else {
                throw VDError(.configuration, "--cluster-listen needs a node name (--node or [cluster] node)")
            }
            guard let token = ProcessInfo.processInfo.environment["VD_CLUSTER_TOKEN"], token.count >= 16 else {
                throw VDError(
                    .configuration,
                    "--cluster-listen needs a shared token of at least 16 characters in VD_CLUSTER_TOKEN")
            }
            let (host, port) = try VDConfiguration.parseHostPort(listen)
            guard !["0.0.0.0", "::", "*", ""].contains(host) else {
                throw VDError(
                    .configuration,
                    "--cluster-listen needs the address other routers reach this one at, not a wildcard (\(listen))")
            }
            if configuration.clusterTLS.caPath != nil && configuration.clusterTLS.certificatePath == nil {
                throw VDError(
                    .configuration,
                    "[cluster] tls_ca is set but tls_certificate and tls_key are not: the cluster API would be plain HTTP; give this router a certificate"
                )
            }
            let tls =
                configuration.clusterTLS.certificatePath == nil
                ? nil : try configuration.clusterTLS.makeServerContext()
            let server = ManagementServer(
                clusterHost: host, port: port, token: token, tls: tls, service: service,
                group: MultiThreadedEventLoopGroup.singleton, logger: logger)
            try await server.start()
            clusterServer = server
            let address = "\(host):\(server.localPort ?? port)"
            try await NodeRecords.write(
                NodeRecord(node: node, address: address, writtenAt: Date(), tls: tls != nil, dtl: dtlAddress),
                store: try backends.store(named: configuration.defaultBackend))
            logger.info("cluster API of node \(node) at \(address)\(tls != nil ? " (TLS)" : "")")
        }
        let metricsServer = configuration.metricsPort.map {
            ManagementServer(
                metricsHost: configuration.metricsHost, port: $0, service: service,
                group: MultiThreadedEventLoopGroup.singleton, logger: logger)
        }
        do {
            try await api.start()
            try await metricsServer?.start()
        } catch {
            await api.stop()
            await server.stop()
            _ = await router.stop(drainTimeoutSeconds: nil)
            throw error
        }
        printBanner(
            configuration: configuration, router: router, server: server, backends: backends,
            metricsPort: metricsServer?.localPort)

        // Wait for SIGTERM or SIGINT.
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        var received: UnixSignal?
        for await signal in signals {
            received = signal
            break
        }
        logger.notice(
            "received \(received.map { "\($0)" } ?? "signal"); stopping: no new I/O, uploading what is still local")
        await api.stop()
        await metricsServer?.stop()
        await clusterServer?.stop()
        await server.stop()
        let results = await router.stop(drainTimeoutSeconds: configuration.drainTimeoutSeconds)
        await dtlPeer?.stop()
        var left: [String] = []
        for (name, result) in results where !result.drained {
            left.append("\(name): \(ByteSize.format(result.unstoredBytes)) in \(result.pendingSCOs) SCO(s)")
        }
        if !left.isEmpty {
            printError(
                "stopped, but the backend does not hold everything yet (drain timeout \(Int(configuration.drainTimeoutSeconds)) s); still only on local flash: "
                    + left.joined(separator: "; ")
                    + ". Starting vd serve again on this data directory resumes the uploads.")
            throw ExitCode(1)
        }
        print("vd serve stopped; the backend holds every write of \(results.count) volume(s).")
    }

    private func printBanner(
        configuration: VDConfiguration, router: Router, server: NBDServer, backends: ConfiguredBackends,
        metricsPort: Int?
    ) {
        let socket = configuration.effectiveSocketPath
        var lines = ["vd serve: data directory \(configuration.dataDirectory)"]
        if let store = try? backends.store(named: configuration.defaultBackend) {
            lines.append("  default backend '\(configuration.defaultBackend)': \(store.description)")
        }
        lines.append("  NBD: \(server.boundAddresses.map(\.description).joined(separator: ", "))")
        lines.append("  management API: \(configuration.apiSocketPath) (vd volume/snapshot/clone commands use it)")
        if let metricsPort {
            lines.append("  metrics: http://\(configuration.metricsHost):\(metricsPort)/metrics (Prometheus)")
        }
        let volumes = router.volumes
        if volumes.isEmpty {
            lines.append(
                "  no volumes yet: create one with `vd volume create NAME --size 20G --data-dir \(configuration.dataDirectory)`"
            )
        }
        for volume in volumes {
            lines.append("  volume \(volume.name) (\(ByteSize.format(volume.config.sizeBytes))):")
            lines.append("    qemu-img info 'nbd+unix:///\(volume.name)?socket=\(socket)'")
            lines.append(
                "    qemu-system-x86_64 -drive file=nbd+unix:///\(volume.name)?socket=\(socket),format=raw ...")
        }
        lines.append("ready (SIGTERM or Ctrl-C to stop)")
        print(lines.joined(separator: "\n"))
        fflush(nil)
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data(("vd: " + message + "\n").utf8))
}
