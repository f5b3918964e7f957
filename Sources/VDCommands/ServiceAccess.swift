// How a CLI command reaches the management operations: through the running router's API socket (DATA/api.sock),
// or, when no router owns the data directory, in-process (taking the data directory lock, opening only the volumes
// the command needs). Never both at once: the lock guarantees one owner.

import FlashIO
import Foundation
import Logging
import ManagementAPI
import VolumeCore
import VolumeRouter

extension VDConfiguration {
    /// The management API socket of the router owning this data directory.
    package var apiSocketPath: String { dataDirectory + "/api.sock" }
}

enum ServiceAccess {
    static func with<T>(
        _ configuration: VDConfiguration, command: String, quiet: Bool = false,
        _ body: (any ManagementService) async throws(VDError) -> T
    ) async throws(VDError) -> T {
        if let remote = configuration.remoteRouter {
            let (host, port) = try VDConfiguration.parseHostPort(remote)
            guard let token = ProcessInfo.processInfo.environment["VD_CLUSTER_TOKEN"], !token.isEmpty else {
                throw VDError(.configuration, "--router needs the cluster token in VD_CLUSTER_TOKEN")
            }
            let tls = configuration.clusterClientUsesTLS ? try configuration.clusterTLS.makeClientContext() : nil
            return try await body(ManagementClient(host: host, port: port, token: token, tls: tls))
        }
        if await ManagementClient.isListening(socketPath: configuration.apiSocketPath) {
            return try await body(ManagementClient(socketPath: configuration.apiSocketPath))
        }
        LoggingSetup.bootstrap(level: configuration.logLevel == "info" ? "warning" : configuration.logLevel)
        let logger = Logger(label: "vd")
        let backends = ConfiguredBackends(configuration: configuration)
        let router: Router
        do {
            try Syscall.makeDirectories(configuration.dataDirectory)
            router = try Router(
                configuration: configuration.routerConfiguration, backends: backends, logger: logger, holder: command)
        } catch  where error.code == .busy {
            throw VDError(
                .busy,
                "\(error.message), and no router answers on \(configuration.apiSocketPath); if vd serve is starting, retry in a moment"
            )
        }
        if !quiet { printError("no router runs on \(configuration.dataDirectory): working on it directly") }
        let service = RouterService(router: router, backends: backends, configuration: configuration, online: false)
        do throws(VDError) {
            let result = try await body(service)
            _ = await router.stop(drainTimeoutSeconds: nil)
            return result
        } catch {
            _ = await router.stop(drainTimeoutSeconds: nil)
            throw error
        }
    }
}
