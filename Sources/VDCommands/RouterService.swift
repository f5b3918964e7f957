// The management operations over a router: what `vd serve` serves on its API socket, and what the CLI runs
// in-process when no router owns the data directory. Volumes are opened on demand (offline, only those a command
// touches are recovered).

import FlashIO
import Foundation
import Logging
import ManagementAPI
import NBDServer
import ObjectStore
import Synchronization
import VolumeCore
import VolumeRouter

final class RouterService: ManagementService {
    let router: Router
    let backends: ConfiguredBackends
    let configuration: VDConfiguration
    let online: Bool
    /// Set once the NBD server runs (for connection counts and disconnects).
    let nbd = Mutex<NBDServer?>(nil)
    /// Serializes operations that change the set of volumes or their relationships.
    let lifecycle = AsyncLock()

    init(router: Router, backends: ConfiguredBackends, configuration: VDConfiguration, online: Bool) {
        self.router = router
        self.backends = backends
        self.configuration = configuration
        self.online = online
    }

    var dataDirectory: String { configuration.dataDirectory }

    private func name(_ text: String) throws(VDError) -> VolumeName { try VolumeName(validating: text) }

    func registration(_ name: VolumeName) throws(VDError) -> VolumeRegistration {
        guard let registration = try VolumeRegistry.read(dataDirectory: dataDirectory, name: name, fs: router.env.fs)
        else {
            throw VDError(.notFound, "no volume named \(name) in \(dataDirectory) (see `vd volume list`)")
        }
        return registration
    }

    private func connections(_ export: String) -> Int { nbd.withLock { $0?.connectionCount(export: export) ?? 0 } }

    private func disconnect(_ export: String) async {
        if let server = nbd.withLock({ $0 }) { await server.disconnectClients(export: export) }
    }

    func disconnectClients(_ export: String) async { await disconnect(export) }

    func registrationOf(_ name: VolumeName) throws(VDError) -> VolumeRegistration { try registration(name) }

    // MARK: volumes

    func listVolumes() async throws(VDError) -> [VolumeStatus] {
        try VolumeRegistry.list(dataDirectory: dataDirectory, fs: router.env.fs).map { registration in
            let volume = router.volume(named: registration.config.name)
            return status(registration, volume: volume, space: nil)
        }
    }

    func volumeStatus(_ text: String) async throws(VDError) -> VolumeStatus {
        let name = try name(text)
        let registration = try registration(name)
        if configuration.clusterNode != nil && router.volume(named: name) == nil {
            // Routers share the backend: a status request never takes a volume's lease.
            return status(registration, volume: nil, space: nil)
        }
        let volume = try await router.openVolume(named: name)
        let space = try volume.space()
        let upload = volume.uploadStatus
        let local = router.cache.statistics
        _ = local
        let status = SpaceStatus(
            writtenBytes: space.writtenBytes, referencedBytes: space.referencedBytes,
            reclaimableBytes: space.writtenBytes > space.referencedBytes
                ? space.writtenBytes - space.referencedBytes : 0,
            localFlashBytes: directoryBytes(configuration.effectiveFlashDirectory + "/" + name.rawValue + "/sco"),
            unstoredBytes: upload.unstoredBytes)
        return self.status(registration, volume: volume, space: status)
    }

    func status(_ registration: VolumeRegistration, volume: Volume?, space: SpaceStatus?) -> VolumeStatus {
        let config = registration.config
        var status = VolumeStatus(
            name: config.name.rawValue, id: config.id.description, sizeBytes: config.sizeBytes,
            clusterSizeBytes: config.clusterSizeBytes, createdAt: config.createdAt, backend: registration.backend,
            parent: config.parent.map { VolumeStatus.Parent(volume: $0.volume.rawValue, snapshot: $0.snapshot) },
            online: online && volume != nil, snapshots: volume.map(snapshotStatuses) ?? [], space: space,
            lastUploadError: volume?.uploadStatus.lastError?.message,
            connections: online ? connections(config.name.rawValue) : nil)
        if let dtl = volume?.dtlStatus {
            status.dtl = DTLInfo(
                mode: dtl.mode.rawValue, peer: dtl.peer, state: dtl.state.rawValue,
                unansweredBytes: dtl.unansweredBytes,
                lastError: dtl.lastError)
        }
        return status
    }

    func createVolume(_ request: CreateVolumeRequest) async throws(VDError) -> VolumeStatus {
        let name = try name(request.name)
        return try await lifecycle.run { () async throws(VDError) -> VolumeStatus in
            let backendName = request.backend ?? configuration.defaultBackend
            let store = try backends.store(named: backendName)
            try await store.verifyAccess()
            let config = try await VolumeAdministration.create(
                dataDirectory: dataDirectory, fs: router.env.fs, name: name, sizeBytes: request.sizeBytes,
                clusterSizeBytes: request.clusterSizeBytes ?? configuration.clusterSizeBytes, backendName: backendName,
                backend: store)
            let volume = online ? try await router.openVolume(named: config.name) : nil
            return status(try registration(name), volume: volume, space: nil)
        }
    }

    func attachVolume(_ request: AttachVolumeRequest) async throws(VDError) -> VolumeStatus {
        let name = try name(request.name)
        return try await lifecycle.run { () async throws(VDError) -> VolumeStatus in
            let backendName = request.backend ?? configuration.defaultBackend
            let store = try backends.store(named: backendName)
            try await store.verifyAccess()
            _ = try await VolumeAdministration.attach(
                dataDirectory: dataDirectory, flashDirectory: configuration.effectiveFlashDirectory, fs: router.env.fs,
                random: router.env.random, name: name, backendName: backendName, backend: store)
            // Rebuild now: the caller learns at once whether the namespace is usable.
            let volume = try await router.openVolume(named: name)
            return status(try registration(name), volume: volume, space: nil)
        }
    }

    func deleteVolume(_ text: String) async throws(VDError) {
        let name = try name(text)
        try await lifecycle.run { () async throws(VDError) in
            let registration = try registration(name)
            let clones = try VolumeRegistry.list(dataDirectory: dataDirectory, fs: router.env.fs).filter {
                $0.config.parent?.volume == name
            }
            guard clones.isEmpty else {
                throw VDError(
                    .busy,
                    "volume \(name) has clones: \(clones.map(\.config.name.rawValue).joined(separator: ", ")); delete them first"
                )
            }
            if configuration.clusterNode != nil && router.volume(named: name) == nil {
                // Routers share the backend: only the volume's owner deletes it (opening takes its lease, or says
                // which node holds it).
                _ = try await router.openVolume(named: name)
            }
            if let volume = router.volume(named: name) {
                // Clones on other routers are recorded only in the snapshot table (creations that failed are
                // forgotten first).
                for snapshot in volume.snapshotTable.snapshots where !snapshot.clones.isEmpty {
                    try await forgetClonesThatDoNotExist(of: volume, snapshot: snapshot.name)
                }
                let recorded = volume.snapshotTable.snapshots.flatMap { snapshot in
                    snapshot.clones.map { "\($0) (of \(snapshot.name))" }
                }
                guard recorded.isEmpty else {
                    throw VDError(
                        .busy, "volume \(name) has clones: \(recorded.joined(separator: ", ")); delete them first")
                }
                await disconnect(name.rawValue)
                for snapshot in volume.snapshotTable.snapshots { await disconnect("\(name)@\(snapshot.name)") }
            }
            var localParent: Volume?
            if let link = registration.config.parent {
                do throws(VDError) {
                    localParent = try await router.openVolume(named: link.volume)
                } catch  where configuration.clusterNode != nil && (error.code == .busy || error.code == .notFound) {
                    // Another router owns the parent: it forgets the clone first (if it cannot be asked, nothing
                    // is deleted: a clone that exists without its registration could lose its snapshot).
                    guard let registrar = router.remoteCloneRegistrar else { throw error }
                    try await registrar(link.volume, link.snapshot, nil, name, false, registration.backend)
                }
            }
            _ = await router.closeVolume(name)
            if let link = registration.config.parent, let localParent {
                try? localParent.setClone(name.rawValue, ofSnapshot: link.snapshot, present: false)
            }
            let store = try backends.store(named: registration.backend)
            try await VolumeAdministration.delete(
                dataDirectory: dataDirectory, flashDirectory: configuration.effectiveFlashDirectory, fs: router.env.fs,
                registration: registration, backend: store)
        }
    }

    // MARK: snapshots

    func snapshotStatuses(_ volume: Volume) -> [SnapshotStatus] {
        let table = volume.snapshotTable
        let stored = volume.uploadStatus.storedThrough.rawValue
        // Per-epoch figures only: creating or listing snapshots must not scan the map.
        let epochBytes = (try? volume.epochBytes()) ?? []
        var previous: UInt64 = 0
        return table.snapshots.sorted { $0.epoch < $1.epoch }.map { snapshot in
            let written = epochBytes.filter { $0.epoch > previous && $0.epoch <= snapshot.epoch }.reduce(0) {
                $0 + $1.bytes
            }
            previous = snapshot.epoch
            return SnapshotStatus(
                name: snapshot.name, createdAt: snapshot.createdAt, epoch: snapshot.epoch,
                writtenSincePreviousBytes: written,
                onBackend: snapshot.epoch <= stored, clones: snapshot.clones)
        }
    }

    func listSnapshots(_ volume: String) async throws(VDError) -> [SnapshotStatus] {
        snapshotStatuses(try await router.openVolume(named: try name(volume)))
    }

    func createSnapshot(_ volume: String, _ request: CreateSnapshotRequest) async throws(VDError) -> SnapshotStatus {
        let target = try await router.openVolume(named: try name(volume))
        let record = try await target.createSnapshot(named: request.name)
        return snapshotStatuses(target).first { $0.name == record.name }!
    }

    func deleteSnapshot(_ volume: String, _ snapshot: String) async throws(VDError) {
        let name = try name(volume)
        try await lifecycle.run { () async throws(VDError) in
            let target = try await router.openVolume(named: name)
            try await forgetClonesThatDoNotExist(of: target, snapshot: snapshot)
            try target.deleteSnapshot(named: snapshot)
            await disconnect("\(name)@\(snapshot)")
        }
    }

    /// A clone recorded in a snapshot that exists neither here nor on the backend (its creation on another router
    /// failed after the owner recorded it) no longer keeps the snapshot.
    private func forgetClonesThatDoNotExist(of volume: Volume, snapshot: String) async throws(VDError) {
        guard let record = volume.snapshotTable.snapshot(named: snapshot), !record.clones.isEmpty else { return }
        let store = try backends.store(named: try registration(volume.name).backend)
        for clone in record.clones {
            guard let name = VolumeName(rawValue: clone),
                try VolumeRegistry.read(dataDirectory: dataDirectory, name: name, fs: router.env.fs) == nil,
                try await store.head(VolumeLayout(flashDirectory: "", namespace: clone).configObject) == nil
            else { continue }
            router.logger.warning(
                "volume \(volume.name): clone \(clone) recorded in snapshot \(snapshot) does not exist; forgetting it")
            try volume.setClone(clone, ofSnapshot: snapshot, present: false)
        }
    }

    func rollback(
        _ volume: String, _ snapshot: String, _ request: RollbackRequest
    ) async throws(VDError) -> SnapshotStatus {
        let name = try name(volume)
        return try await lifecycle.run { () async throws(VDError) -> SnapshotStatus in
            let target = try await router.openVolume(named: name)
            let clients = connections(name.rawValue)
            if clients > 0 {
                guard request.force else {
                    throw VDError(
                        .busy,
                        "volume \(name) has \(clients) NBD client(s) connected; stop them (their caches would be wrong after a rollback) or use --force to disconnect them"
                    )
                }
                await disconnect(name.rawValue)
            }
            let later = target.snapshotTable.snapshots.filter {
                $0.epoch > (target.snapshotTable.snapshot(named: snapshot)?.epoch ?? .max)
            }
            for blocking in later where !blocking.clones.isEmpty {
                try await forgetClonesThatDoNotExist(of: target, snapshot: blocking.name)
            }
            let record = try await target.rollback(toSnapshot: snapshot)
            for gone in later { await disconnect("\(name)@\(gone.name)") }
            return snapshotStatuses(target).first { $0.name == record.name }!
        }
    }

    // MARK: incremental backup

    /// The older side of a diff: nil → nothing (a full copy); PARENT@SNAPSHOT → a clone's base; else a snapshot.
    private func diffBase(_ target: Volume, _ from: String?) throws(VDError) -> DiffBase {
        guard let from else { return .nothing }
        if from.contains("@") {
            guard let parent = target.config.parent, from == "\(parent.volume)@\(parent.snapshot)" else {
                throw VDError(
                    .invalidArgument,
                    "\(from) is not the snapshot volume \(target.name) was cloned from\(target.config.parent.map { " (\($0.volume)@\($0.snapshot))" } ?? " (it is not a clone)")"
                )
            }
            return .cloneBase
        }
        guard let snapshot = target.snapshotTable.snapshot(named: from) else {
            throw VDError(.notFound, "volume \(target.name) has no snapshot \(from)")
        }
        return .epoch(snapshot.epoch)
    }

    private func snapshot(_ target: Volume, _ name: String) throws(VDError) -> SnapshotRecord {
        guard let snapshot = target.snapshotTable.snapshot(named: name) else {
            throw VDError(.notFound, "volume \(target.name) has no snapshot \(name)")
        }
        return snapshot
    }

    func diff(_ volume: String, _ request: DiffRequest) async throws(VDError) -> DiffResponse {
        let target = try await router.openVolume(named: try name(volume))
        let base = try diffBase(target, request.from)
        let from = try request.from.flatMap { (name) throws(VDError) in
            name.contains("@") ? nil : try snapshot(target, name)
        }
        let to = try request.to.map { (name) throws(VDError) in try snapshot(target, name) }
        let extents = try await target.diff(from: base, to: to?.epoch)
        // A snapshot deleted meanwhile may have lost versions the diff looked up (its history is dropped).
        for kept in [from, to].compactMap({ $0 })
        where !target.snapshotTable.snapshots.contains(where: { $0.id == kept.id }) {
            throw VDError(.notFound, "snapshot \(kept.name) of \(volume) was deleted during the diff")
        }
        return DiffResponse(
            volume: volume, from: request.from, to: request.to, sizeBytes: target.config.sizeBytes,
            extents: extents.map { DiffExtentStatus(offset: $0.offset, length: $0.length, zero: $0.zero) })
    }

    func exportDiff(_ volume: String, _ request: ExportDiffRequest) async throws(VDError) -> DiffTransferStatus {
        guard request.path.hasPrefix("/") else {
            throw VDError(.invalidArgument, "the export path must be absolute, got \(request.path)")
        }
        let target = try await router.openVolume(named: try name(volume))
        let base = try diffBase(target, request.from)
        let from = try request.from.flatMap { (name) throws(VDError) in
            name.contains("@") ? nil : try snapshot(target, name)
        }
        let to = try snapshot(target, request.to)
        let summary = try await target.exportDiff(
            from: base, fromName: request.from, fromSnapshot: from, to: to, path: request.path)
        return DiffTransferStatus(
            volume: volume, from: request.from, to: request.to, extents: summary.extents,
            dataBytes: summary.dataBytes, zeroBytes: summary.zeroBytes, streamBytes: summary.streamBytes)
    }

    func importDiff(_ volume: String, _ request: ImportDiffRequest) async throws(VDError) -> DiffTransferStatus {
        guard request.path.hasPrefix("/") else {
            throw VDError(.invalidArgument, "the stream path must be absolute, got \(request.path)")
        }
        if let snapshot = request.snapshot { try SnapshotTable.validateName(snapshot) }
        let target = try await router.openVolume(named: try name(volume))
        if let snapshot = request.snapshot, target.snapshotTable.snapshot(named: snapshot) != nil {
            throw VDError(.alreadyExists, "volume \(volume) already has a snapshot \(snapshot)")
        }
        let (info, summary) = try await target.importDiff(path: request.path, force: request.force ?? false)
        if let snapshot = request.snapshot { _ = try await target.createSnapshot(named: snapshot) }
        return DiffTransferStatus(
            volume: volume, from: info.from, to: info.to, extents: summary.extents, dataBytes: summary.dataBytes,
            zeroBytes: summary.zeroBytes, streamBytes: summary.streamBytes, snapshot: request.snapshot)
    }

    // MARK: clones

    func createClone(_ request: CreateCloneRequest) async throws(VDError) -> VolumeStatus {
        let parentName = try name(request.parent)
        let childName = try name(request.name)
        return try await lifecycle.run { () async throws(VDError) -> VolumeStatus in
            let child = try await router.createClone(named: childName, of: parentName, snapshot: request.snapshot)
            return status(try registration(childName), volume: child, space: nil)
        }
    }

    func applyScrubResults(_ text: String) async throws(VDError) {
        let volume = try await router.openVolume(named: try name(text))
        await volume.scrubPass()
    }

    // MARK: metrics

    func metrics() async throws(VDError) -> String {
        var lines: [String] = []
        func metric(_ name: String, _ help: String, _ type: String, _ samples: [(String, UInt64)]) {
            lines.append("# HELP \(name) \(help)")
            lines.append("# TYPE \(name) \(type)")
            for (labels, value) in samples { lines.append("\(name)\(labels) \(value)") }
        }
        let volumes = router.volumes
        func label(_ volume: Volume) -> String { "{volume=\"\(volume.name)\"}" }
        metric("vd_volume_size_bytes", "Size of the volume.", "gauge", volumes.map { (label($0), $0.config.sizeBytes) })
        metric(
            "vd_volume_unstored_bytes", "Data written but not yet on the backend.", "gauge",
            volumes.map { (label($0), $0.uploadStatus.unstoredBytes) })
        metric(
            "vd_volume_stored_epoch", "Every epoch up to this one is on the backend.", "gauge",
            volumes.map { (label($0), $0.uploadStatus.storedThrough.rawValue) })
        metric(
            "vd_volume_upload_failing", "1 while uploads to the backend are failing.", "gauge",
            volumes.map { (label($0), $0.uploadStatus.lastError == nil ? 0 : 1) })
        metric(
            "vd_volume_snapshots", "Snapshots of the volume.", "gauge",
            volumes.map { (label($0), UInt64($0.snapshotTable.snapshots.count)) })
        metric(
            "vd_volume_nbd_connections", "NBD clients connected to the volume.", "gauge",
            volumes.map { (label($0), UInt64(connections($0.name.rawValue))) })
        let cache = router.cache.statistics
        metric("vd_flash_cache_bytes", "SCO bytes on local flash.", "gauge", [("", cache.footprintBytes)])
        metric("vd_flash_cache_capacity_bytes", "Flash cache capacity.", "gauge", [("", router.cache.capacityBytes)])
        metric(
            "vd_flash_cache_evictions_total", "SCOs evicted from local flash.", "counter", [("", cache.evictedCount)])
        return lines.joined(separator: "\n") + "\n" + MetricsSetup.exposition()
    }
}

/// A lock for async sections (operations that must not interleave).
final class AsyncLock: Sendable {
    private let state = Mutex<(held: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func run<T>(_ body: () async throws(VDError) -> T) async throws(VDError) -> T {
        await acquire()
        defer { release() }
        return try await body()
    }

    private func acquire() async {
        await withCheckedContinuation { continuation in
            let acquired = state.withLock { state -> Bool in
                if !state.held {
                    state.held = true
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if acquired { continuation.resume() }
        }
    }

    private func release() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if state.waiters.isEmpty {
                state.held = false
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.resume()
    }
}
