// The distributed transaction log in `vd serve` (docs/design.md, "Distributed transaction log"): the peer service
// other routers mirror their volumes to (`vd serve --dtl-listen HOST:PORT`, `[dtl] listen`), how this router's
// volumes find their peers (node records), and `vd volume dtl VOL --mode sync|async|none [--peer NODE]`.

import DTL
import FlashIO
import Foundation
import Logging
import ManagementAPI
import NIOCore
import NIOPosix
import ObjectStore
import VolumeCore
import VolumeRouter

extension RouterService {
    /// `PUT /v1/volumes/NAME/dtl`.
    func setVolumeDTL(_ text: String, _ request: SetDTLRequest) async throws(VDError) -> VolumeStatus {
        let name = try VolumeName(validating: text)
        guard let mode = DTLMode(rawValue: request.mode) else {
            throw VDError(.invalidArgument, "DTL mode '\(request.mode)': use sync, async or none")
        }
        guard online, let node = configuration.clusterNode else {
            throw VDError(
                .configuration,
                "the DTL needs a running router with a node name (`vd serve --node NAME`) and the cluster token")
        }
        let registration = try registration(name)
        guard let volume = router.volume(named: name) else {
            throw VDError(.notFound, "volume \(name) is not served by this router (node \(node)); ask its owner")
        }
        var peer = request.peer
        if mode != .none {
            let store = try backends.store(named: configuration.defaultBackend)
            if let chosen = peer {
                guard chosen != node else {
                    throw VDError(.invalidArgument, "the DTL peer of volume \(name) must be another node than \(node)")
                }
                guard try await NodeRecords.read(chosen, store: store).dtl != nil else {
                    throw VDError(
                        .invalidArgument,
                        "node \(chosen) serves no DTL (start it with `vd serve --dtl-listen HOST:PORT`)")
                }
            } else {
                peer = try await Self.dtlPeerCandidates(store: store, excluding: node).first
                guard peer != nil else {
                    throw VDError(
                        .notFound,
                        "no other node serves a DTL (`vd serve --dtl-listen HOST:PORT` on another router), so volume \(name) cannot be mirrored"
                    )
                }
            }
        } else {
            peer = nil
        }
        let router = self.router
        try await lifecycle.run { () async throws(VDError) in
            try await router.setDTL(of: volume, mode: mode, peer: peer)
        }
        return status(registration, volume: volume, space: nil)
    }

    /// Nodes with a DTL service other than `excluding`, in name order.
    static func dtlPeerCandidates(store: any ObjectStore, excluding: String) async throws(VDError) -> [String] {
        try await NodeRecords.all(store: store).filter { $0.node != excluding && $0.dtl != nil }.map(\.node).sorted()
    }

    /// The event loop of this process's DTL connections, as owner and as peer: apart from the NBD and API loops, so
    /// a mirrored append or its answer never waits behind NBD traffic (a write in `sync` mode waits for the round
    /// trip; on the shared loops it took half again as long under load, docs/performance.md "DTL").
    static let dtlGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    /// How this router's volumes reach their DTL peers: node records in the default backend.
    static func dtlNetwork(
        configuration: VDConfiguration, backends: ConfiguredBackends, token: String, group: any EventLoopGroup
    ) throws(VDError) -> DTLNetwork {
        // With a cluster CA, always TLS (like the cluster API: never the token in clear because a record says so).
        let tls = configuration.clusterClientUsesTLS ? try configuration.clusterTLS.makeClientContext() : nil
        var network = DTLNetwork.tcp(token: token, group: group, tls: tls) {
            (node) throws(VDError) -> (host: String, port: Int) in
            let store = try backends.store(named: configuration.defaultBackend)
            let record = try await NodeRecords.read(node, store: store)
            guard let address = record.dtl else {
                throw VDError(.notFound, "node \(node) serves no DTL (its node record names no DTL address)")
            }
            if record.tls == true && tls == nil {
                throw VDError(
                    .configuration, "node \(node) serves its DTL over TLS: set [cluster] tls_ca here to verify it")
            }
            return try VDConfiguration.parseHostPort(address)
        }
        network.timeoutSeconds = configuration.dtlTimeoutSeconds
        network.choosePeer = { (excluding) throws(VDError) -> String? in
            try await dtlPeerCandidates(
                store: try backends.store(named: configuration.defaultBackend), excluding: excluding
            ).first
        }
        return network
    }
}

/// The DTL peer service of `vd serve --dtl-listen`: its store (DATA/dtl) and TCP server.
struct DTLPeerService {
    let server: DTLServer
    let store: DTLStore
    let pool: NIOThreadPool

    static func start(
        configuration: VDConfiguration, listen: String, token: String, logger: Logger
    ) async throws(VDError) -> (DTLPeerService, address: String) {
        let (host, port) = try VDConfiguration.parseHostPort(listen)
        guard !["0.0.0.0", "::", "*", ""].contains(host) else {
            throw VDError(
                .configuration,
                "--dtl-listen needs the address other routers reach this one at, not a wildcard (\(listen))")
        }
        let store = try DTLStore(
            directory: configuration.effectiveDTLDirectory, bytesPerVolumeMax: configuration.dtlBytesPerVolumeMax,
            fs: PosixFileSystem())
        // The cluster API's certificate (and, with a CA, client certificates required), when it has one.
        let tls =
            configuration.clusterTLS.certificatePath == nil ? nil : try configuration.clusterTLS.makeServerContext()
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let server = DTLServer(
            host: host, port: port, token: token, store: store, pool: pool,
            group: RouterService.dtlGroup, logger: logger, tls: tls)
        do throws(VDError) {
            try await server.start()
        } catch {
            store.close()
            try? await pool.shutdownGracefully()
            throw error
        }
        return (DTLPeerService(server: server, store: store, pool: pool), "\(host):\(server.localPort ?? port)")
    }

    func stop() async {
        await server.stop()
        store.close()
        try? await pool.shutdownGracefully()
    }
}
