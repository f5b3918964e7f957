// The volume router's storage side: one data directory, the volumes registered in it, their backends, and the
// lock that makes this process their only owner.
//
//   DATA/vd.lock               flock held by the owner (vd serve, or a CLI command working offline)
//   DATA/volumes/NAME.volume   registration: the volume's configuration and which backend holds it
//   DATA/flash/NAME/           the volume's local flash (journal, sealed SCOs, TLogs, map)
//   DATA/backend/              the embedded default backend (a local-directory object store)
//
// Volume creation writes the configuration to the backend first (NAME/volume), then the registration, so a volume
// that is registered always exists on its backend. Deletion removes the registration first, then the backend
// namespace and the flash directory, so a half-finished deletion never leaves a volume that looks usable.

import BlockMap
import DTL
package import FlashIO
package import Foundation
package import Logging
import NIOCore
import NIOPosix
package import ObjectStore
package import SCOCache
import Scrubber
import Synchronization
import TransactionLog
package import VolumeCore

/// A volume's entry in the data directory.
package struct VolumeRegistration: Codable, Sendable, Hashable {
    package var config: VolumeConfig
    /// Name of the backend (in the router configuration) that holds the volume's namespace.
    package var backend: String
    package var namespace: String

    package init(config: VolumeConfig, backend: String, namespace: String) {
        self.config = config
        self.backend = backend
        self.namespace = namespace
    }
}

/// How a router that shares its backend with others owns volumes.
package struct OwnershipSettings: Sendable {
    /// This router's node name.
    package var node: String
    package var leaseSeconds: Double = 20
    package init(node: String, leaseSeconds: Double = 20) {
        self.node = node
        self.leaseSeconds = leaseSeconds
    }
}

/// Resolves backend names from the configuration to object stores.
package protocol BackendResolver: Sendable {
    func store(named name: String) throws(VDError) -> any ObjectStore
    var defaultBackendName: String { get }
    /// Whether SCOs uploaded to this backend are compressed.
    func compressesUploads(_ name: String) -> Bool
}

package struct RouterConfiguration: Sendable {
    package var dataDirectory: String
    /// Where volumes keep their local flash (default DATA/flash).
    package var flashDirectory: String
    package var volumeOptions = VolumeOptions()
    /// Most bytes of SCOs kept on local flash across all volumes (un-uploaded data is never evicted).
    package var cacheCapacityBytes: UInt64 = 16 << 30
    /// Read sealed SCOs with O_DIRECT through Linux AIO.
    package var directIO = true
    /// Threads for blocking file work (syncs of sealed SCOs, upload reads).
    package var ioThreads = 4
    /// Several routers share the backend (`[cluster] node`): each volume is served under an owner lease on the
    /// backend (OwnerLease). Nil: one router per backend, no lease (the default).
    package var ownership: OwnershipSettings?

    package init(dataDirectory: String) {
        self.dataDirectory = dataDirectory
        flashDirectory = dataDirectory + "/flash"
    }

    package func validate() throws(VDError) {
        try volumeOptions.validate()
        guard cacheCapacityBytes >= 2 * volumeOptions.uploadPendingBytesMax else {
            throw VDError(
                .configuration,
                "cache size (\(ByteSize.format(cacheCapacityBytes))) must be at least twice upload max_pending (\(ByteSize.format(volumeOptions.uploadPendingBytesMax))): un-uploaded data cannot be evicted"
            )
        }
        guard (1...64).contains(ioThreads) else { throw VDError(.configuration, "io_threads must be 1 to 64") }
    }
}

/// The registrations of a data directory (usable without owning it, for read-only listing).
package enum VolumeRegistry {
    package static func directory(_ data: String) -> String { data + "/volumes" }
    package static func path(_ data: String, _ name: VolumeName) -> String {
        directory(data) + "/" + name.rawValue + ".volume"
    }

    package static func list(dataDirectory: String, fs: any FileSystem) throws(VDError) -> [VolumeRegistration] {
        var result: [VolumeRegistration] = []
        for file in try fs.listDirectory(directory(dataDirectory)).sorted() where file.hasSuffix(".volume") {
            guard let name = VolumeName(rawValue: String(file.dropLast(".volume".count))) else { continue }
            if let registration = try read(dataDirectory: dataDirectory, name: name, fs: fs) {
                result.append(registration)
            }
        }
        return result
    }

    package static func read(
        dataDirectory: String, name: VolumeName, fs: any FileSystem
    ) throws(VDError)
        -> VolumeRegistration?
    {
        let path = path(dataDirectory, name)
        guard let bytes = try fs.readWholeFile(path) else { return nil }
        return try MetadataRecord.decode(
            VolumeRegistration.self, from: ByteBuffer(bytes: bytes), kind: .volumeRegistration, what: path)
    }

    package static func write(
        _ registration: VolumeRegistration, dataDirectory: String, fs: any FileSystem
    )
        throws(VDError)
    {
        let directory = directory(dataDirectory)
        try fs.makeDirectories(directory)
        let name = registration.config.name.rawValue + ".volume"
        try MetadataRecord.encode(registration, kind: .volumeRegistration).withUnsafeReadableBytes {
            (raw) throws(VDError) in try fs.replaceDurably(directory: directory, name: name, with: raw)
        }
    }

    package static func remove(dataDirectory: String, name: VolumeName, fs: any FileSystem) throws(VDError) {
        try fs.unlinkIfPresent(path(dataDirectory, name))
        try fs.syncDirectory(directory(dataDirectory))
    }
}

/// Volume lifecycle operations that need the data directory lock (offline, or inside the router).
package enum VolumeAdministration {
    /// Creates a volume: configuration on the backend, then the registration.
    package static func create(
        dataDirectory: String, fs: any FileSystem, name: VolumeName, sizeBytes: UInt64, clusterSizeBytes: UInt32,
        backendName: String, backend: any ObjectStore, parent: VolumeConfig.Parent? = nil, id: VolumeID = .random(),
        createdAt: Date = Date()
    ) async throws(VDError) -> VolumeConfig {
        try VolumeConfig.validate(sizeBytes: sizeBytes, clusterSizeBytes: clusterSizeBytes)
        if try VolumeRegistry.read(dataDirectory: dataDirectory, name: name, fs: fs) != nil {
            throw VDError(.alreadyExists, "volume \(name) already exists")
        }
        let config = VolumeConfig(
            name: name, id: id, sizeBytes: sizeBytes, clusterSizeBytes: clusterSizeBytes, createdAt: createdAt,
            parent: parent)
        let layout = VolumeLayout(flashDirectory: "", namespace: name.rawValue)
        let existingConfig = try await backend.head(layout.configObject)
        let existingObjects = try await backend.list(prefix: layout.namespace + "/")
        if existingConfig != nil || !existingObjects.isEmpty {
            throw VDError(
                .alreadyExists,
                "the backend (\(backend.description)) already holds a namespace named \(name); attach it with `vd volume attach \(name)` or pick another name"
            )
        }
        try await backend.put(layout.configObject, data: try MetadataRecord.encode(config, kind: .volumeConfig))
        try VolumeRegistry.write(
            VolumeRegistration(config: config, backend: backendName, namespace: name.rawValue),
            dataDirectory: dataDirectory,
            fs: fs)
        return config
    }

    /// Registers a volume that exists on a backend (restart on another node, or after losing the local disk).
    /// `vd serve` then rebuilds its map from the TLogs in the namespace.
    package static func attach(
        dataDirectory: String, flashDirectory: String, fs: any FileSystem, random: any RandomSource, name: VolumeName,
        backendName: String, backend: any ObjectStore
    ) async throws(VDError) -> (config: VolumeConfig, tlogs: Int, bytes: UInt64) {
        if try VolumeRegistry.read(dataDirectory: dataDirectory, name: name, fs: fs) != nil {
            throw VDError(.alreadyExists, "volume \(name) is already registered in \(dataDirectory)")
        }
        let layout = VolumeLayout(flashDirectory: "", namespace: name.rawValue)
        let config: VolumeConfig
        do {
            config = try await NamespaceObjects.getVerified(layout.configObject, backend: backend) {
                (bytes) throws(VDError) in
                try MetadataRecord.decode(
                    VolumeConfig.self, from: bytes, kind: .volumeConfig, what: layout.configObject)
            }
        } catch  where error.code == .notFound {
            throw VDError(
                .notFound,
                "the backend (\(backend.description)) has no volume named \(name) (no \(layout.configObject))")
        }
        guard config.name == name else {
            throw VDError(.corrupt, "\(layout.configObject) describes volume \(config.name), not \(name)")
        }
        let tlogs = try await backend.list(prefix: layout.tlogPrefix)
        let scos = try await backend.list(prefix: layout.scoPrefix)
        // A local flash directory left from an earlier life of this volume here would be trusted by recovery:
        // move it aside so the backend is the only source.
        let flash = flashDirectory + "/" + name.rawValue
        if fs.fileExists(flash) {
            try fs.rename(flash, flash + ".before-attach-" + random.hexToken())
            try fs.syncDirectory(flashDirectory)
        }
        try VolumeRegistry.write(
            VolumeRegistration(config: config, backend: backendName, namespace: name.rawValue),
            dataDirectory: dataDirectory,
            fs: fs)
        return (config, tlogs.count, scos.reduce(0) { $0 + $1.sizeBytes })
    }

    /// Deletes a volume everywhere: registration, backend namespace, local flash.
    package static func delete(
        dataDirectory: String, flashDirectory: String, fs: any FileSystem, registration: VolumeRegistration,
        backend: any ObjectStore
    ) async throws(VDError) {
        let name = registration.config.name
        try VolumeRegistry.remove(dataDirectory: dataDirectory, name: name, fs: fs)
        // Data first, the configuration last: an interrupted delete leaves a namespace `attach` can still see.
        let objects = try await backend.list(prefix: registration.namespace + "/")
        let configObject = registration.namespace + "/volume"
        for object in objects where object.name != configObject { try await backend.delete(object.name) }
        try await backend.delete(configObject)
        try fs.removeTree(flashDirectory + "/" + name.rawValue)
    }
}

/// Owns the volumes of a data directory while `vd serve` runs.
package final class Router: Sendable {
    package let configuration: RouterConfiguration
    package let backends: any BackendResolver
    package let cache: FlashCache
    package let env: Environment
    /// The I/O thread pool of a live environment (nil when the environment was given).
    let pool: NIOThreadPool?
    let aio: AIOQueue?
    package let logger: Logger
    private let lock: any DirectoryLockHandle
    private let state = Mutex<[VolumeName: Volume]>([:])
    /// Volumes being closed (a move's drain, a delete): not opened again meanwhile.
    private let closing = Mutex<Set<VolumeName>>([])
    /// Volumes being opened, or taken over (from the takeover's first read to its open): one at a time, so two
    /// leases of this router never compete for one volume and one flash directory is never opened twice.
    private let opening = Mutex<Set<VolumeName>>([])
    /// How volumes reach DTL peers (set by `vd serve` in cluster mode before volumes open; nil: no DTL).
    private let dtlNetworkBox = Mutex<DTLNetwork?>(nil)

    /// Takes the data directory lock (or fails naming its holder) and prepares the shared cache and I/O threads.
    /// `holder` names this process in the lock ("vd serve", or the CLI command working offline). `environment`:
    /// the file system, clock and task runner to use (a simulation's); by default the real ones with an I/O pool.
    package init(
        configuration: RouterConfiguration, backends: any BackendResolver, logger: Logger, holder: String = "vd serve",
        environment: Environment? = nil
    ) throws(VDError) {
        try configuration.validate()
        let pool: NIOThreadPool?
        let env: Environment
        if let environment {
            env = environment
            pool = nil
        } else {
            let threads = NIOThreadPool(numberOfThreads: configuration.ioThreads)
            threads.start()
            env = .live(pool: threads)
            pool = threads
        }
        do throws(VDError) {
            try env.fs.makeDirectories(configuration.dataDirectory)
            try env.fs.makeDirectories(configuration.flashDirectory)
            lock = try env.fs.lockDirectory(configuration.dataDirectory, holder: holder)
        } catch {
            try? pool?.syncShutdownGracefully()
            throw error
        }
        self.env = env
        self.pool = pool
        self.configuration = configuration
        self.backends = backends
        self.logger = logger
        var aio: AIOQueue?
        if configuration.directIO && env.fs.pathsAreReal {
            do throws(VDError) {
                aio = try AIOQueue()
            } catch {
                logger.warning("Linux AIO is unavailable (\(error)); reading the flash cache through the page cache")
            }
        }
        self.aio = aio
        cache = FlashCache(capacityBytes: configuration.cacheCapacityBytes, aio: aio, logger: logger, fs: env.fs)
    }

    /// Volumes opened from now on mirror as their DTL record says, through `network`.
    package func enableDTL(_ network: DTLNetwork) { dtlNetworkBox.withLock { $0 = network } }
    package var dtlNetwork: DTLNetwork? { dtlNetworkBox.withLock { $0 } }

    package func layout(for registration: VolumeRegistration) -> VolumeLayout {
        VolumeLayout(
            flashDirectory: configuration.flashDirectory + "/" + registration.config.name.rawValue,
            namespace: registration.namespace)
    }

    /// Opens every registered volume (recovering each). A volume that cannot open is reported and skipped; the
    /// others are served.
    package func openAll(progress: @escaping @Sendable (String) -> Void) async -> [(VolumeName, VDError)] {
        var failures: [(VolumeName, VDError)] = []
        // Views of parents owned elsewhere are rebuilt when their clones open.
        try? env.fs.removeTree(parentViewDirectory)
        let registrations: [VolumeRegistration]
        do throws(VDError) {
            registrations = try VolumeRegistry.list(dataDirectory: configuration.dataDirectory, fs: env.fs)
        } catch {
            return [(VolumeName(rawValue: "registry")!, error)]
        }
        // Parents before their clones.
        let ordered = registrations.sorted { depth($0, in: registrations) < depth($1, in: registrations) }
        for registration in ordered {
            do throws(VDError) {
                _ = try await open(registration, progress: progress)
            } catch {
                logger.error("cannot open volume \(registration.config.name): \(error)")
                failures.append((registration.config.name, error))
            }
        }
        return failures
    }

    private func depth(_ registration: VolumeRegistration, in all: [VolumeRegistration]) -> Int {
        var depth = 0
        var current = registration
        while let parent = current.config.parent, depth < 64,
            let next = all.first(where: { $0.config.name == parent.volume })
        {
            depth += 1
            current = next
        }
        return depth
    }

    /// Opens a registered volume (its parent first, for a clone) if it is not open yet.
    @discardableResult
    package func open(
        _ registration: VolumeRegistration, retakingOwnRelease: Bool = false, taken: OwnerLease? = nil,
        acceptLoss: Bool = false, progress: @escaping @Sendable (String) -> Void
    ) async throws(VDError)
        -> Volume
    {
        let name = registration.config.name
        if let taken {
            // `takeOver` marked the volume as opening; this call ends that, whatever happens.
            defer { opening.withLock { _ = $0.remove(name) } }
            do throws(VDError) {
                if volume(named: name) != nil {
                    throw VDError(.alreadyExists, "volume \(name) is already served here")
                }
                return try await openMarked(registration, taken: taken, acceptLoss: acceptLoss, progress: progress)
            } catch {
                taken.stopRenewing()
                throw error
            }
        }
        if let existing = volume(named: name) { return existing }
        let marked = opening.withLock { $0.insert(name).inserted }
        guard marked else {
            throw VDError(.busy, "volume \(name) is being opened (or taken over) here; retry in a moment")
        }
        defer { opening.withLock { _ = $0.remove(name) } }
        if let existing = volume(named: name) { return existing }
        return try await openMarked(registration, retakingOwnRelease: retakingOwnRelease, progress: progress)
    }

    /// `open` once the volume is marked as opening (no other open of it runs).
    private func openMarked(
        _ registration: VolumeRegistration, retakingOwnRelease: Bool = false, taken: OwnerLease? = nil,
        acceptLoss: Bool = false, progress: @escaping @Sendable (String) -> Void
    ) async throws(VDError) -> Volume {
        let backend = try backends.store(named: registration.backend)
        var options = configuration.volumeOptions
        options.compressUploads = backends.compressesUploads(registration.backend)
        if closing.withLock({ $0.contains(registration.config.name) }) {
            throw VDError(.busy, "volume \(registration.config.name) is closing (being moved or deleted)")
        }
        let lease: OwnerLease?
        if let taken {
            lease = taken
        } else {
            lease = try await acquireOwnership(
                of: registration, backend: backend, retakingOwnRelease: retakingOwnRelease)
        }
        if let lease, lease.servedElsewhereBefore {
            try setLocalFlashAside(registration, reason: "generation \(lease.generation) follows another router's")
        }
        if let lease, taken == nil { startRenewing(lease, registration) }
        // The parent after the lease: a clone another router owns builds no view of its parent here.
        var parent: (any CloneParentSource)?
        let volume: Volume
        do throws(VDError) {
            parent = try await parentSource(of: registration, progress: progress)
            if let view = parent as? BackendParentView, let link = registration.config.parent {
                try await registerRemotely(
                    registration.config.name, in: view, link: link, backend: registration.backend)
            }
            volume = try await Volume.open(
                config: registration.config, layout: layout(for: registration), options: options,
                backend: backend, cache: cache, env: env, logger: logger, parent: parent,
                generation: lease.map {
                    OwnerGeneration(generation: $0.generation, node: configuration.ownership!.node)
                },
                lease: lease,
                // A takeover, or a lease that was not released by a drained close (this node lost its flash): what
                // the backend lacks may be on the volume's DTL peer (used only when nothing of it is local).
                peerJournals: lease.flatMap { lease in
                    taken != nil || !lease.tookRelease
                        ? peerJournalSource(registration, backend: backend, lease: lease, acceptLoss: acceptLoss)
                        : nil
                },
                progress: progress)
        } catch {
            lease?.stopRenewing()
            (parent as? BackendParentView)?.detach()
            throw error
        }
        do throws(VDError) {
            // Before the volume is served: no write is replied under an earlier life's DTL record.
            try await startMirror(volume)
        } catch {
            _ = await volume.close()
            lease?.stopRenewing()
            (parent as? BackendParentView)?.detach()
            throw error
        }
        state.withLock { $0[registration.config.name] = volume }
        return volume
    }

    // MARK: the distributed transaction log

    /// Starts the volume's DTL mirror as its record on the backend says, before the volume takes any I/O: the
    /// record then names this generation, degraded until the peer is in sync (a failure to write it fails the open).
    private func startMirror(_ volume: Volume) async throws(VDError) {
        guard let network = dtlNetwork,
            let record = try await DTLRecord.load(layout: volume.layout, backend: volume.backend), record.mode != .none
        else { return }
        var peer = record.peer
        if peer == nil || peer == configuration.ownership?.node {
            // The owner cannot be its own peer (after a takeover by the peer, typically): choose another.
            do throws(VDError) {
                peer = try await network.choosePeer(configuration.ownership?.node ?? "")
            } catch {
                logger.warning("volume \(volume.name): cannot list DTL peers: \(error.message)")
                peer = nil
            }
            if let peer {
                logger.info("volume \(volume.name): DTL peer \(record.peer ?? "none") replaced by \(peer)")
            } else {
                logger.warning(
                    "volume \(volume.name): no DTL peer other than this node is known; not mirrored, degraded (`vd volume dtl \(volume.name) --mode \(record.mode.rawValue) --peer NODE` once one runs)"
                )
            }
        }
        try await volume.startDTL(mode: record.mode, peer: peer, network: network)
    }

    /// Sets a volume's DTL mode and peer (recorded on the backend first: a taker reads it).
    package func setDTL(of volume: Volume, mode: DTLMode, peer: String?) async throws(VDError) {
        guard let network = dtlNetwork else {
            throw VDError(
                .configuration,
                "the DTL needs a router with a node name and the cluster token (`vd serve --node NAME` with VD_CLUSTER_TOKEN)"
            )
        }
        if mode != .none, peer == nil || peer == configuration.ownership?.node {
            throw VDError(.invalidArgument, "volume \(volume.name): the DTL peer must be another node than its owner")
        }
        try volume.checkOwnership()
        try await volume.startDTL(mode: mode, peer: mode == .none ? nil : peer, network: network)
    }

    /// When a volume opens with nothing of it on local flash (a takeover, or this node lost its flash): fetches the
    /// journals its backend lacks from its DTL peer (fencing the lost owner there). Refuses, unless `acceptLoss`, when
    /// the peer cannot be asked or its copy may be short: the record must say in sync, written by the generation
    /// that owned the volume last.
    private func peerJournalSource(
        _ registration: VolumeRegistration, backend: any ObjectStore, lease: OwnerLease, acceptLoss: Bool
    ) -> PeerJournalSource {
        let layout = self.layout(for: registration)
        let (network, logger) = (dtlNetwork, logger)
        let name = registration.config.name
        let (generation, previous) = (lease.generation, lease.previousGeneration)
        return { (after) throws(VDError) -> FetchedJournals in
            guard let record = try await DTLRecord.load(layout: layout, backend: backend), record.mode != .none
            else { return FetchedJournals(journals: [], complete: false, peer: nil) }
            let window =
                "writes replied after epoch \(after) was stored, and not yet on the backend, may exist only on the lost node"
            let advice =
                "`vd volume takeover \(name) --accept-loss` serves it with what the backend and the peer hold"
            let trusted = record.state == .inSync && record.generation == previous && record.peer != nil
            if !trusted {
                let message =
                    record.generation == previous
                    ? "volume \(name): its DTL peer \(record.peer ?? "(none)") was \(record.state.rawValue) since \(record.changedAt): \(window)"
                    : "volume \(name): its DTL record was written by generation \(record.generation), not by its last owner's (\(previous.map(String.init) ?? "none")): \(window)"
                guard acceptLoss else { throw VDError(.dataLoss, message + "; " + advice) }
                logger.warning("\(message); going on (--accept-loss)")
            }
            guard let peer = record.peer else { return FetchedJournals(journals: [], complete: false, peer: nil) }
            do throws(VDError) {
                guard let network else {
                    throw VDError(.configuration, "this router has no DTL network (node name and cluster token)")
                }
                let connection = try await network.connect(peer, registration.config.id, generation)
                let journals: [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)]
                do throws(VDError) {
                    journals = try await connection.fetch(afterEpoch: after)
                } catch {
                    await connection.close()
                    throw error
                }
                await connection.close()
                return FetchedJournals(journals: journals, complete: trusted && !acceptLoss, peer: peer)
            } catch {
                let message =
                    "volume \(name): cannot fetch its journals from DTL peer \(peer) (\(error.message)): \(window)"
                guard acceptLoss else { throw VDError(.dataLoss, message + "; " + advice) }
                logger.warning("\(message); going on without them (--accept-loss)")
                return FetchedJournals(journals: [], complete: false, peer: peer)
            }
        }
    }

    // MARK: parents owned elsewhere

    /// What a clone reads through: its parent open here (opened if it is registered here and this router may own
    /// it), or, when routers share the backend and another one owns the parent, a backend view of the parent's
    /// snapshot (docs/design.md, "Clones across owners").
    private func parentSource(
        of registration: VolumeRegistration, progress: @escaping @Sendable (String) -> Void
    ) async throws(VDError) -> (any CloneParentSource)? {
        guard let link = registration.config.parent else { return nil }
        if let open = volume(named: link.volume) { return open }
        let parentRegistration = try VolumeRegistry.read(
            dataDirectory: configuration.dataDirectory, name: link.volume, fs: env.fs)
        if let parentRegistration {
            do throws(VDError) {
                return try await open(parentRegistration, progress: progress)
            } catch  where configuration.ownership != nil && error.code == .busy {
                logger.info(
                    "volume \(registration.config.name): its parent \(link.volume) is not served here (\(error.message)); reading \(link.volume)@\(link.snapshot) from the backend"
                )
            }
        } else if configuration.ownership == nil {
            throw VDError(
                .notFound,
                "volume \(registration.config.name) is a clone of \(link.volume), which is not registered here; attach \(link.volume) first"
            )
        }
        let view = try await parentView(link, backendName: parentRegistration?.backend ?? registration.backend)
        logger.info(
            "volume \(registration.config.name): reads \(link.volume)@\(link.snapshot) from the backend (another router owns \(link.volume))"
        )
        return view
    }

    /// Where backend views of parents keep their temporary maps and fetched data (emptied when the router starts).
    package var parentViewDirectory: String { configuration.dataDirectory + "/parent-views" }

    /// A backend view of `link`. Its own parent (a clone of a clone) is a view too, even when that volume is open
    /// here: a view never holds a volume that may move away or close under it.
    package func parentView(
        _ link: VolumeConfig.Parent, backendName: String
    ) async throws(VDError) -> BackendParentView {
        let backend = try backends.store(named: backendName)
        return try await BackendParentView.load(
            name: link.volume, snapshot: link.snapshot, epoch: link.epoch, backend: backend, cache: cache,
            workDirectory: parentViewDirectory, options: configuration.volumeOptions, env: env, logger: logger
        ) { [self] (grandparent) async throws(VDError) -> any CloneParentSource in
            try await parentView(grandparent, backendName: backendName)
        }
    }

    /// Registers or forgets a clone in the snapshot table of a parent that another router owns, through that
    /// router's cluster API (set by the cluster service; nil: not in a cluster).
    package typealias RemoteCloneRegistrar =
        @Sendable (
            _ parent: VolumeName, _ snapshot: String, _ epoch: UInt64?, _ clone: VolumeName, _ present: Bool,
            _ backend: String
        ) async throws(VDError) -> Void
    private let registrar = Mutex<RemoteCloneRegistrar?>(nil)
    package var remoteCloneRegistrar: RemoteCloneRegistrar? {
        get { registrar.withLock { $0 } }
        set { registrar.withLock { $0 = newValue } }
    }

    /// A clone opening through a backend view whose table lacks it (the owner's table came back from an older
    /// copy, or the clone was made before it moved here): asks the owner to record it again. Without a registrar,
    /// or when the owner cannot be reached, the clone opens anyway: a deleted snapshot makes its reads fail, never
    /// return other data (the view checks the snapshot each time it replays).
    private func registerRemotely(
        _ clone: VolumeName, in view: BackendParentView, link: VolumeConfig.Parent, backend: String
    ) async throws(VDError) {
        guard view.snapshotTable.snapshot(named: link.snapshot)?.clones.contains(clone.rawValue) == false else {
            return
        }
        guard let registrar = remoteCloneRegistrar else {
            logger.warning("volume \(clone): \(link.volume)@\(link.snapshot) does not record it as a clone")
            return
        }
        do throws(VDError) {
            try await registrar(link.volume, link.snapshot, link.epoch, clone, true, backend)
            logger.warning(
                "volume \(clone): \(link.volume)@\(link.snapshot) did not record it as a clone; its owner recorded it again"
            )
        } catch {
            logger.error(
                "volume \(clone): \(link.volume)@\(link.snapshot) does not record it as a clone and its owner could not be asked to (\(error.message))"
            )
        }
    }

    /// The owner lease of a volume when routers share the backend (nil otherwise): taken without waiting, or
    /// refused (`.busy`) naming the router that holds it.
    private func acquireOwnership(
        of registration: VolumeRegistration, backend: any ObjectStore, retakingOwnRelease: Bool
    ) async throws(VDError) -> OwnerLease? {
        guard let ownership = configuration.ownership else { return nil }
        let (identity, record, _) = try await ownerRecord(
            of: registration, backend: backend, ownership: ownership,
            asideBecause: "another router owned the volume since")
        let lease = try await OwnerLease.acquire(
            record, as: identity, leaseSeconds: ownership.leaseSeconds, clock: env.clock, random: env.random,
            retakingOwnRelease: retakingOwnRelease)
        logger.info(
            "volume \(registration.config.name): owned by node \(ownership.node), generation \(lease.generation)")
        return lease
    }

    /// The volume's owner record and this router's identity, on a backend that enforces create-only writes. When
    /// the newest record is another router's, the local flash is set aside first (before anything is written: a
    /// crash right after must not leave an earlier life's flash trusted).
    private func ownerRecord(
        of registration: VolumeRegistration, backend: any ObjectStore, ownership: OwnershipSettings,
        asideBecause reason: String
    ) async throws(VDError) -> (OwnerIdentity, SequencedRecord, OwnerRecord?) {
        guard try await backend.confirmsCreateOnly() else {
            throw VDError(
                .configuration,
                "volume \(registration.config.name): ownership ([cluster] node) needs a backend that enforces create-only writes (\(backend.description) does not: S3 needs signature V4 with create_only)"
            )
        }
        let identity = OwnerIdentity(node: ownership.node, instance: try instanceID())
        let record = OwnerLease.record(namespace: registration.namespace, store: backend)
        let current = try await OwnerLease.current(record)?.record
        if let current, current.instance != identity.instance || current.node != identity.node {
            try setLocalFlashAside(registration, reason: "\(reason) (node \(current.node))")
        }
        return (identity, record, current)
    }

    /// `vd volume takeover`: takes the volume from an owner that stopped renewing its lease, after waiting the lease
    /// out (OwnerLease.takeover; `.busy` when the owner renewed meanwhile, or another router took it first). The
    /// local flash is set aside before the record is written (the backend is the only source). Open it with
    /// `open(_:taken:)`; a caller that cannot should release the lease.
    package func takeOver(_ registration: VolumeRegistration) async throws(VDError) -> OwnerLease {
        let name = registration.config.name
        guard volume(named: name) == nil else { throw VDError(.alreadyExists, "volume \(name) is already served here") }
        guard opening.withLock({ $0.insert(name).inserted }) else {
            throw VDError(.busy, "volume \(name) is being opened or taken over here already")
        }
        do throws(VDError) {
            return try await takeOverMarked(registration)
        } catch {
            opening.withLock { _ = $0.remove(name) }
            throw error
        }
    }

    private func takeOverMarked(_ registration: VolumeRegistration) async throws(VDError) -> OwnerLease {
        guard let ownership = configuration.ownership else {
            throw VDError(
                .configuration, "taking a volume over needs a node name: start the router with `vd serve --node NAME`")
        }
        let (identity, record, current) = try await ownerRecord(
            of: registration, backend: try backends.store(named: registration.backend), ownership: ownership,
            asideBecause: "taking it over")
        if let current, current.instance != identity.instance || current.node != identity.node {
            logger.info(
                "volume \(registration.config.name): waiting out the lease of node \(current.node) (up to \(Int(OwnerLease.waitSeconds(forLease: current.leaseSeconds).rounded(.up))) s)"
            )
        }
        let lease = try await OwnerLease.takeover(
            record, as: identity, leaseSeconds: ownership.leaseSeconds, clock: env.clock, random: env.random)
        startRenewing(lease, registration)
        logger.info(
            "volume \(registration.config.name): taken over by node \(ownership.node), generation \(lease.generation)")
        return lease
    }

    /// Renews `lease` from now on (until the volume closes, or fails to open: `stopRenewing`).
    private func startRenewing(_ lease: OwnerLease, _ registration: VolumeRegistration) {
        let logger = self.logger
        let what = "volume \(registration.config.name)"
        _ = env.tasks.spawn { await lease.renewLoop(what: what, logger: logger) }
    }

    /// Another router served the volume since this flash directory was written: what is here is an earlier life;
    /// the backend is the only source (as `vd volume attach` does).
    private func setLocalFlashAside(_ registration: VolumeRegistration, reason: String) throws(VDError) {
        let flash = layout(for: registration).flashDirectory
        guard env.fs.fileExists(flash) else { return }
        try env.fs.rename(flash, flash + ".earlier-ownership-" + env.random.hexToken())
        try env.fs.syncDirectory(configuration.flashDirectory)
        logger.info(
            "volume \(registration.config.name): local flash set aside (\(reason)); restoring from the backend")
    }

    /// A random id of this data directory (DATA/instance.id, made once): the same node name on another data
    /// directory is another owner.
    private func instanceID() throws(VDError) -> String {
        let path = configuration.dataDirectory + "/instance.id"
        if let bytes = try env.fs.readWholeFile(path) {
            let text = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            if !text.isEmpty { return text }
        }
        let id = env.random.hexToken() + env.random.hexToken()
        let bytes = Array((id + "\n").utf8)
        let fs = env.fs
        let directory = configuration.dataDirectory
        try VDError.catching {
            try bytes.withUnsafeBytes { raw in
                try fs.replaceDurably(directory: directory, name: "instance.id", with: raw)
            }
        }
        return id
    }

    package func volume(named name: VolumeName) -> Volume? { state.withLock { $0[name] } }

    /// Creates a volume on `backendName` and opens it.
    package func createVolume(
        named name: VolumeName, sizeBytes: UInt64, clusterSizeBytes: UInt32, backendName: String
    ) async throws(VDError) -> Volume {
        let store = try backends.store(named: backendName)
        _ = try await VolumeAdministration.create(
            dataDirectory: configuration.dataDirectory, fs: env.fs, name: name, sizeBytes: sizeBytes,
            clusterSizeBytes: clusterSizeBytes, backendName: backendName, backend: store,
            id: .random(using: env.random), createdAt: env.clock.wallNow())
        return try await openVolume(named: name)
    }

    /// Creates a thin clone `name` of `parentName`@`snapshotName` and opens it. The clone is recorded on the parent's
    /// snapshot first: a crash between the two leaves a snapshot that refuses to be deleted for a clone that does not
    /// exist (visible and fixable), never a clone without its snapshot.
    package func createClone(
        named name: VolumeName, of parentName: VolumeName, snapshot snapshotName: String
    )
        async throws(VDError) -> Volume
    {
        let parent: Volume
        do throws(VDError) {
            parent = try await openVolume(named: parentName)
        } catch  where configuration.ownership != nil && (error.code == .busy || error.code == .notFound) {
            // Routers share the backend and another one owns the parent (or it is not registered here).
            return try await createClone(named: name, ofRemote: parentName, snapshot: snapshotName, because: error)
        }
        guard let snapshot = parent.snapshotTable.snapshot(named: snapshotName) else {
            throw VDError(.notFound, "volume \(parentName) has no snapshot named \(snapshotName)")
        }
        guard
            let parentRegistration = try VolumeRegistry.read(
                dataDirectory: configuration.dataDirectory, name: parentName, fs: env.fs)
        else { throw VDError(.notFound, "no volume named \(parentName) in \(configuration.dataDirectory)") }
        let store = try backends.store(named: parentRegistration.backend)
        try parent.setClone(name.rawValue, ofSnapshot: snapshot.name, present: true)
        do throws(VDError) {
            _ = try await VolumeAdministration.create(
                dataDirectory: configuration.dataDirectory, fs: env.fs, name: name, sizeBytes: parent.config.sizeBytes,
                clusterSizeBytes: parent.config.clusterSizeBytes, backendName: parentRegistration.backend,
                backend: store,
                parent: VolumeConfig.Parent(volume: parentName, snapshot: snapshot.name, epoch: snapshot.epoch),
                id: .random(using: env.random), createdAt: env.clock.wallNow())
        } catch {
            try? parent.setClone(name.rawValue, ofSnapshot: snapshot.name, present: false)
            throw error
        }
        return try await openVolume(named: name)
    }

    /// A clone of a parent another router owns: the owner records the clone in its snapshot table (through its
    /// cluster API), then the clone is created here and reads its parent through a backend view.
    private func createClone(
        named name: VolumeName, ofRemote parentName: VolumeName, snapshot snapshotName: String,
        because notHere: VDError
    ) async throws(VDError) -> Volume {
        guard let registrar = remoteCloneRegistrar else {
            throw VDError(
                .configuration,
                "volume \(parentName) is not served here (\(notHere.message)); cloning a volume another router owns needs this router in the cluster (`vd serve --node NAME --cluster-listen HOST:PORT`)"
            )
        }
        let backendName =
            try VolumeRegistry.read(dataDirectory: configuration.dataDirectory, name: parentName, fs: env.fs)?.backend
            ?? backends.defaultBackendName
        let store = try backends.store(named: backendName)
        // The owner records the clone and replies once the snapshot's TLogs and its table are on the backend (a
        // snapshot taken a moment ago may not be there yet); whatever fails after this forgets it again.
        func forget() async { try? await registrar(parentName, snapshotName, nil, name, false, backendName) }
        do throws(VDError) {
            try await registrar(parentName, snapshotName, nil, name, true, backendName)
            let layout = VolumeLayout(flashDirectory: "", namespace: parentName.rawValue)
            let table = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: store)
            guard let snapshot = table?.snapshot(named: snapshotName), snapshot.clones.contains(name.rawValue) else {
                throw VDError(
                    .notFound,
                    "the snapshot table of \(parentName) on \(store.description) has no snapshot \(snapshotName) recording clone \(name)"
                )
            }
            let parentConfig = try await NamespaceObjects.loadConfig(of: parentName, backend: store)
            let link = VolumeConfig.Parent(volume: parentName, snapshot: snapshot.name, epoch: snapshot.epoch)
            let created = try await VolumeAdministration.create(
                dataDirectory: configuration.dataDirectory, fs: env.fs, name: name, sizeBytes: parentConfig.sizeBytes,
                clusterSizeBytes: parentConfig.clusterSizeBytes, backendName: backendName, backend: store, parent: link,
                id: .random(using: env.random), createdAt: env.clock.wallNow())
            // Once more now that the clone exists: the owner forgets recorded clones that exist nowhere (a creation
            // that failed), and may have taken this one for such a clone before its configuration was written.
            do throws(VDError) {
                try await registrar(parentName, snapshotName, snapshot.epoch, name, true, backendName)
            } catch {
                try? await VolumeAdministration.delete(
                    dataDirectory: configuration.dataDirectory, flashDirectory: configuration.flashDirectory,
                    fs: env.fs,
                    registration: VolumeRegistration(config: created, backend: backendName, namespace: name.rawValue),
                    backend: store)
                throw error
            }
        } catch {
            await forget()
            throw error
        }
        return try await openVolume(named: name)
    }

    /// The open volume, opening it (and its parents) on demand.
    package func openVolume(
        named name: VolumeName, retakingOwnRelease: Bool = false
    ) async throws(VDError) -> Volume {
        if let volume = volume(named: name) { return volume }
        guard
            let registration = try VolumeRegistry.read(
                dataDirectory: configuration.dataDirectory, name: name, fs: env.fs)
        else {
            throw VDError(.notFound, "no volume named \(name) in \(configuration.dataDirectory) (see `vd volume list`)")
        }
        let logger = self.logger
        return try await open(registration, retakingOwnRelease: retakingOwnRelease) { logger.info("\($0)") }
    }
    package var volumes: [Volume] { state.withLock { $0.values.sorted { $0.name < $1.name } } }

    /// Closes one volume (for delete, or with a drain and a release for a move).
    package func closeVolume(
        _ name: VolumeName, drainTimeoutSeconds: Double? = nil, releaseTo node: String? = nil
    ) async -> CloseResult? {
        closing.withLock { _ = $0.insert(name) }
        defer { closing.withLock { _ = $0.remove(name) } }
        guard let volume = state.withLock({ $0.removeValue(forKey: name) }) else { return nil }
        let result = await volume.close(drainTimeoutSeconds: drainTimeoutSeconds, releaseTo: node)
        cache.forget(volume: volume.config.id)
        return result
    }

    /// Closes every volume. With a drain timeout, each volume's data is sealed and uploaded first (in parallel).
    package func stop(drainTimeoutSeconds: Double?) async -> [(VolumeName, CloseResult)] {
        let volumes = state.withLock { volumes -> [Volume] in
            defer { volumes = [:] }
            return Array(volumes.values)
        }
        let results = await withTaskGroup(of: (VolumeName, CloseResult).self) { group in
            for volume in volumes {
                group.addTask { (volume.name, await volume.close(drainTimeoutSeconds: drainTimeoutSeconds)) }
            }
            var results: [(VolumeName, CloseResult)] = []
            for await result in group { results.append(result) }
            return results.sorted { $0.0 < $1.0 }
        }
        aio?.close()
        try? await pool?.shutdownGracefully()
        lock.release()
        return results
    }
}
