// Moving a volume between routers that share a backend (`vd volume move VOL --to NODE`), and the node records that
// let routers find each other.
//
// Node records: NODE's cluster API address in the default backend as `cluster/nodes/NODE` (written when `vd serve
// --node --cluster-listen` starts). A move, on the owner: disconnect the volume's NBD clients, close it with a drain
// (everything to the backend, within the timeout, else the volume is opened again here and the move fails), release
// the owner record to the target node, then ask the target (its cluster API, with the shared token) to take it: the
// target registers it from the backend afresh (local flash of an earlier life moved aside) and acquires the record
// released to it, in the next generation, without waiting for any lease. The old owner refuses the volume from then
// on (its record names the target).

import Foundation
import ManagementAPI
import NIOCore
import NIOSSL
import ObjectStore
import VolumeCore
import VolumeRouter

/// A router's entry in the bucket.
struct NodeRecord: Codable, Sendable {
    var node: String
    /// HOST:PORT of its cluster API.
    var address: String
    var writtenAt: Date
    /// Its cluster API speaks TLS (absent in records of earlier versions: plain).
    var tls: Bool?
    /// HOST:PORT of its DTL peer service (absent: it is no DTL peer).
    var dtl: String?
}

enum NodeRecords {
    static let prefix = "cluster/nodes/"
    static func name(_ node: String) -> String { prefix + node }

    /// Every node record of the store (records that do not decode are skipped).
    static func all(store: any ObjectStore) async throws(VDError) -> [NodeRecord] {
        var records: [NodeRecord] = []
        for object in try await store.list(prefix: prefix) {
            let node = String(object.name.dropFirst(prefix.count))
            if let record = try? await read(node, store: store) { records.append(record) }
        }
        return records
    }

    static func write(_ record: NodeRecord, store: any ObjectStore) async throws(VDError) {
        try await store.replace(name(record.node), data: try MetadataRecord.encode(record, kind: .nodeRecord))
    }

    static func read(_ node: String, store: any ObjectStore) async throws(VDError) -> NodeRecord {
        let object = name(node)
        do {
            return try MetadataRecord.decode(
                NodeRecord.self, from: try await store.get(object), kind: .nodeRecord, what: object)
        } catch  where error.code == .notFound {
            throw VDError(
                .notFound,
                "no router named \(node) in \(store.description) (no \(object): start it with `vd serve --node \(node) --cluster-listen HOST:PORT`)"
            )
        }
    }
}

extension RouterService {
    /// Where node `node`'s cluster API is, and the TLS to reach it with (from its node record).
    static func clusterEndpoint(
        of node: String, configuration: VDConfiguration, backends: ConfiguredBackends
    ) async throws(VDError) -> (host: String, port: Int, tls: NIOSSLContext?) {
        let target = try await NodeRecords.read(node, store: try backends.store(named: configuration.defaultBackend))
        let (host, port) = try VDConfiguration.parseHostPort(target.address)
        var tls: NIOSSLContext?
        // With a cluster CA configured, always TLS (never the token in clear because a record in the bucket says so).
        if target.tls == true || configuration.clusterClientUsesTLS {
            guard configuration.clusterClientUsesTLS else {
                throw VDError(
                    .configuration,
                    "node \(node) serves its cluster API over TLS: set [cluster] tls_ca here to verify it")
            }
            tls = try configuration.clusterTLS.makeClientContext()
        }
        return (host, port, tls)
    }

    /// How this router asks the owner of a clone's parent to record or forget the clone (nil without a node name):
    /// the parent's owner record names the node, its node record the address.
    static func cloneRegistrar(
        configuration: VDConfiguration, backends: ConfiguredBackends
    ) -> Router.RemoteCloneRegistrar? {
        guard let node = configuration.clusterNode else { return nil }
        return { (parent, snapshot, epoch, clone, present, backendName) async throws(VDError) in
            let store = try backends.store(named: backendName)
            let record = OwnerLease.record(namespace: parent.rawValue, store: store)
            let current = try await OwnerLease.current(record)
            guard let owner = current?.record, !owner.released else {
                throw VDError(
                    .busy,
                    "volume \(parent) has no owner now (never served, or released in a move): serve it on a router, then retry"
                )
            }
            guard owner.node != node else {
                throw VDError(.busy, "volume \(parent) is owned by this node (\(node)) but is not open here")
            }
            guard let token = ProcessInfo.processInfo.environment["VD_CLUSTER_TOKEN"], !token.isEmpty else {
                throw VDError(
                    .configuration,
                    "asking node \(owner.node) about a clone needs the cluster token in VD_CLUSTER_TOKEN")
            }
            let (host, port, tls) = try await clusterEndpoint(
                of: owner.node, configuration: configuration, backends: backends)
            do throws(VDError) {
                _ = try await ManagementClient(host: host, port: port, token: token, tls: tls).registerClone(
                    parent.rawValue, snapshot,
                    CloneRegistrationRequest(clone: clone.rawValue, present: present, epoch: epoch))
            } catch {
                throw VDError(
                    error.code,
                    "node \(owner.node), the owner of \(parent), did not \(present ? "record" : "forget") clone \(clone) of \(parent)@\(snapshot): \(error.message)"
                )
            }
        }
    }

    /// The owner side of `cloneRegistrar`. Not under the lifecycle lock: the other router may hold its own while it
    /// asks (two routers cloning each other's volumes must not wait on each other); the snapshot table's own update
    /// orders a registration against a deletion or rollback of the snapshot.
    func registerClone(
        _ volume: String, _ snapshot: String, _ request: CloneRegistrationRequest
    ) async throws(VDError) -> SnapshotStatus {
        let name = try VolumeName(validating: volume)
        let clone = try VolumeName(validating: request.clone)
        guard let target = router.volume(named: name) else {
            throw VDError(.notFound, "volume \(name) is not served by this router")
        }
        if request.present, let epoch = request.epoch, target.snapshotTable.snapshot(named: snapshot)?.epoch != epoch {
            throw VDError(
                .notFound, "volume \(name) has no snapshot \(snapshot) at epoch \(epoch) (deleted and taken again?)")
        }
        do throws(VDError) {
            try target.setClone(clone.rawValue, ofSnapshot: snapshot, present: request.present)
        } catch  where !request.present && error.code == .notFound {
            // The snapshot is gone: nothing records the clone any more.
            return SnapshotStatus(
                name: snapshot, createdAt: Date(), epoch: 0, writtenSincePreviousBytes: 0, onBackend: true, clones: [])
        }
        router.logger.info(
            "volume \(name): clone \(clone) of another router \(request.present ? "recorded in" : "forgotten from") snapshot \(snapshot)"
        )
        // On the backend before the reply: a copy of the table without it (a restore after a flash loss here)
        // would let the snapshot be deleted under the clone, and the clone reads the snapshot from the backend.
        let through = request.present ? target.snapshotTable.snapshot(named: snapshot)?.epoch ?? 0 : 0
        guard await target.waitUntilStored(through: through, timeoutSeconds: 60) else {
            throw VDError(
                .timeout,
                "volume \(name): snapshot \(snapshot) and the table recording clone \(clone) did not reach the backend within 60 s"
            )
        }
        guard let status = snapshotStatuses(target).first(where: { $0.name == snapshot }) else {
            throw VDError(.notFound, "snapshot \(snapshot) of \(name) was deleted meanwhile")
        }
        return status
    }

    func moveVolume(_ text: String, _ request: MoveVolumeRequest) async throws(VDError) -> MoveVolumeResponse {
        // Under the lifecycle lock: the checks, the drain and the release. The call to the target is made without it
        // (two routers moving volumes to each other must not wait on each other's lock).
        let started = Date()
        let prepared = try await lifecycle.run { () async throws(VDError) -> PreparedMove in
            try await prepareMove(text, request)
        }
        let name = prepared.name
        let record = OwnerLease.record(
            namespace: prepared.registration.namespace, store: try backends.store(named: prepared.registration.backend))
        do {
            _ = try await ManagementClient(
                host: prepared.host, port: prepared.port, token: prepared.token, tls: prepared.tls
            ).takeVolume(
                TakeVolumeRequest(name: name.rawValue, backend: try backends.url(of: prepared.registration.backend)))
        } catch {
            // The outcome decides, not the error (a lost reply may hide a take that happened).
            let owner = try? await OwnerLease.current(record)
            if let owner, owner.record.node == request.to, !owner.record.released {
                try await lifecycle.run { () async throws(VDError) in forget(name, movedTo: request.to) }
                throw VDError(
                    error.code,
                    "volume \(name) was taken by node \(request.to) (generation \(owner.record.generation)) but its reply was lost: \(error.message); this node no longer serves it"
                )
            }
            if let owner, owner.record.released, owner.record.node == prepared.node {
                // Nobody took it: this router takes its own release back (nothing was written since).
                let reopened =
                    (try? await lifecycle.run { () async throws(VDError) -> Bool in
                        (try? await router.openVolume(named: name, retakingOwnRelease: true)) != nil
                    }) ?? false
                throw VDError(
                    error.code,
                    "node \(request.to) did not take volume \(name): \(error.message); "
                        + (reopened
                            ? "it is served here again"
                            : "it is released and served nowhere: start `vd serve` again here, or attach it on another node")
                )
            }
            throw VDError(
                error.code,
                "node \(request.to) did not take volume \(name): \(error.message); its owner record now names \(owner.map { "node \($0.record.node)" } ?? "an unknown owner (the backend did not answer)")"
            )
        }
        try await lifecycle.run { () async throws(VDError) in forget(name, movedTo: request.to) }
        let generation = try await OwnerLease.current(record)?.record.generation ?? 0
        return MoveVolumeResponse(
            volume: name.rawValue, from: prepared.node, to: request.to, generation: generation,
            unstoredBytesAtStart: prepared.unstored, drainSeconds: prepared.drainSeconds,
            totalSeconds: Date().timeIntervalSince(started))
    }

    private struct PreparedMove: Sendable {
        var name: VolumeName
        var node: String
        var token: String
        var host: String
        var port: Int
        var tls: NIOSSLContext?
        var registration: VolumeRegistration
        var unstored: UInt64
        var drainSeconds: Double
    }

    /// The volume lives on another node now: this node forgets it (its flash is an earlier life).
    private func forget(_ name: VolumeName, movedTo node: String) {
        try? VolumeRegistry.remove(dataDirectory: configuration.dataDirectory, name: name, fs: router.env.fs)
        let flash = configuration.effectiveFlashDirectory + "/" + name.rawValue
        if router.env.fs.fileExists(flash) {
            try? router.env.fs.rename(flash, flash + ".moved-to-\(node)-" + router.env.random.hexToken())
        }
    }

    private func prepareMove(_ text: String, _ request: MoveVolumeRequest) async throws(VDError) -> PreparedMove {
        let name = try VolumeName(validating: text)
        guard let node = configuration.clusterNode else {
            throw VDError(.configuration, "this router has no node name: start it with `vd serve --node NAME`")
        }
        guard request.to != node else { throw VDError(.invalidArgument, "volume \(name) is already on node \(node)") }
        guard let token = ProcessInfo.processInfo.environment["VD_CLUSTER_TOKEN"], !token.isEmpty else {
            throw VDError(.configuration, "moving a volume needs the cluster token in VD_CLUSTER_TOKEN")
        }
        guard let volume = router.volume(named: name), volume.ownerLease != nil else {
            throw VDError(.notFound, "volume \(name) is not served by this router (node \(node))")
        }
        let registration = try registrationOf(name)
        let (host, port, tls) = try await Self.clusterEndpoint(
            of: request.to, configuration: configuration, backends: backends)
        let timeout = request.drainTimeoutSeconds ?? configuration.drainTimeoutSeconds
        try await prepareClonesForMove(of: volume, registration: registration, timeoutSeconds: timeout)
        let unstored = volume.uploadStatus.unstoredBytes
        // Clients go first: nothing may be acknowledged here once the record names the target.
        await disconnectClients(name.rawValue)
        for snapshot in volume.snapshotTable.snapshots { await disconnectClients("\(name)@\(snapshot.name)") }
        let drainStart = Date()
        let closed = await router.closeVolume(name, drainTimeoutSeconds: timeout, releaseTo: request.to)
        let drainSeconds = Date().timeIntervalSince(drainStart)
        guard let closed, closed.released else {
            // Not everything reached the backend, or the release did not go through: the volume stays here.
            let reopened = (try? await router.openVolume(named: name)) != nil
            let why =
                closed?.drained == true
                ? "its owner record could not be released (see the log)"
                : "\(ByteSize.format(closed?.unstoredBytes ?? 0)) were not on the backend after \(Int(timeout)) s"
            throw VDError(
                .timeout,
                "volume \(name) was not moved: \(why); "
                    + (reopened ? "it is served here again" : "it could not be opened again here (see the log)"))
        }
        return PreparedMove(
            name: name, node: node, token: token, host: host, port: port, tls: tls, registration: registration,
            unstored: unstored, drainSeconds: drainSeconds)
    }

    /// Clones and parents stay where they are when one of them moves (docs/design.md, "Clones across owners"):
    /// - a clone moving away reads its parent through a backend view on the target, so the parent's snapshot must
    ///   be on the backend first;
    /// - a parent moving away leaves its clones here reading through backend views: they switch to one now, while
    ///   the parent is still open (a read in flight on the parent is made again on the view).
    private func prepareClonesForMove(
        of volume: Volume, registration: VolumeRegistration, timeoutSeconds: Double
    ) async throws(VDError) {
        let name = volume.name
        if let link = volume.config.parent, let parent = volume.parent?.source as? Volume {
            guard await parent.waitUntilStored(through: link.epoch, timeoutSeconds: timeoutSeconds) else {
                throw VDError(
                    .timeout,
                    "volume \(name) was not moved: its parent's snapshot \(link.volume)@\(link.snapshot) did not reach the backend within \(Int(timeoutSeconds)) s"
                )
            }
        }
        let clones = router.volumes.filter { ($0.parent?.source as? Volume) === volume }
        guard !clones.isEmpty else { return }
        let latest = clones.compactMap { $0.config.parent?.epoch }.max() ?? 0
        guard await volume.waitUntilStored(through: latest, timeoutSeconds: timeoutSeconds) else {
            throw VDError(
                .timeout,
                "volume \(name) was not moved: the snapshots its clones here read did not reach the backend within \(Int(timeoutSeconds)) s"
            )
        }
        for clone in clones {
            guard let link = clone.config.parent, let parentLink = clone.parent else { continue }
            let view = try await router.parentView(link, backendName: registration.backend)
            parentLink.replace(with: view)
            router.logger.info(
                "volume \(clone.name): reads \(link.volume)@\(link.snapshot) from the backend from now on (\(name) moves away)"
            )
        }
    }

    func takeVolume(_ request: TakeVolumeRequest) async throws(VDError) -> VolumeStatus {
        let name = try VolumeName(validating: request.name)
        guard configuration.clusterNode != nil else {
            throw VDError(.configuration, "this router has no node name: start it with `vd serve --node NAME`")
        }
        if router.volume(named: name) != nil {
            throw VDError(.alreadyExists, "volume \(name) is already served here")
        }
        // Afresh from the backend: local state of an earlier life here is set aside by the attach.
        if try VolumeRegistry.read(dataDirectory: configuration.dataDirectory, name: name, fs: router.env.fs) != nil {
            try VolumeRegistry.remove(dataDirectory: configuration.dataDirectory, name: name, fs: router.env.fs)
        }
        return try await attachVolume(AttachVolumeRequest(name: name.rawValue, backend: request.backend))
    }

    /// `vd volume takeover`: the volume's owner is gone (it stopped renewing). Registers the volume from its backend
    /// if it is not registered here, waits the owner's lease out (without holding the lifecycle lock: that takes
    /// the lease period), then opens it in the next generation. A live owner (one that renews meanwhile) keeps it:
    /// `.busy`. Of two routers taking over at once, one wins.
    func takeoverVolume(_ request: TakeoverVolumeRequest) async throws(VDError) -> VolumeStatus {
        let name = try VolumeName(validating: request.name)
        guard online, configuration.clusterNode != nil else {
            throw VDError(
                .configuration,
                "taking a volume over needs a running router with a node name (`vd serve --node NAME`), which then serves it"
            )
        }
        if router.volume(named: name) != nil { throw VDError(.alreadyExists, "volume \(name) is already served here") }
        let fs = router.env.fs
        let (registered, attached) = try await lifecycle.run { () async throws(VDError) -> (VolumeRegistration, Bool) in
            if let existing = try VolumeRegistry.read(dataDirectory: dataDirectory, name: name, fs: fs) {
                return (existing, false)
            }
            let backendName = request.backend ?? configuration.defaultBackend
            let store = try backends.store(named: backendName)
            try await store.verifyAccess()
            // Local flash of an earlier life here is set aside: the backend is the only source.
            _ = try await VolumeAdministration.attach(
                dataDirectory: dataDirectory, flashDirectory: configuration.effectiveFlashDirectory, fs: fs,
                random: router.env.random, name: name, backendName: backendName, backend: store)
            return (try registration(name), true)
        }
        let lease: OwnerLease
        do throws(VDError) {
            lease = try await router.takeOver(registered)
        } catch {
            if attached { try? VolumeRegistry.remove(dataDirectory: dataDirectory, name: name, fs: fs) }
            throw error
        }
        let logger = router.logger
        return try await lifecycle.run { () async throws(VDError) -> VolumeStatus in
            do throws(VDError) {
                let volume = try await router.open(
                    registered, taken: lease, acceptLoss: request.acceptLoss ?? false
                ) { logger.info("\($0)") }
                return status(registered, volume: volume, space: nil)
            } catch {
                // Not served here after all: give it up so another router can take it without waiting.
                logger.error("volume \(name): taken over but cannot be opened (\(error)); releasing it")
                if attached { try? VolumeRegistry.remove(dataDirectory: dataDirectory, name: name, fs: fs) }
                do throws(VDError) {
                    try await lease.release(to: nil)
                } catch let failure {
                    logger.error(
                        "volume \(name): the release failed too (\(failure.message)); its lease runs out in \(Int(lease.leaseSeconds)) s"
                    )
                }
                throw error
            }
        }
    }

    /// Every volume of a backend (a namespace with a configuration object) with its owner record.
    func clusterVolumes(backend: String?) async throws(VDError) -> [ClusterVolume] {
        let store = try backends.store(named: backend ?? configuration.defaultBackend)
        var volumes: [ClusterVolume] = []
        let now = Date()
        for child in try await store.listChildren(of: "") {
            guard (try? VolumeName(validating: child)) != nil,
                try await store.head(VolumeLayout(flashDirectory: "", namespace: child).configObject) != nil
            else { continue }
            var entry = ClusterVolume(name: child)
            do {
                if let owner = try await OwnerLease.current(OwnerLease.record(namespace: child, store: store)) {
                    entry.owner = owner.record.node
                    entry.generation = owner.record.generation
                    entry.leaseSeconds = owner.record.leaseSeconds
                    entry.leaseAgeSeconds = max(0, now.timeIntervalSince(owner.record.writtenAt))
                    entry.released = owner.record.released
                    entry.releasedTo = owner.record.releasedTo
                    entry.address = owner.record.address
                }
            } catch {
                entry.error = error.message
            }
            volumes.append(entry)
        }
        return volumes
    }
}
