// The management API's resources and the service behind them. `vd serve` implements `ManagementService` over its
// router and serves it as HTTP/JSON on a Unix socket; the CLI talks to it with `ManagementClient`, which implements
// the same protocol, or, when no router runs, uses an in-process implementation: the commands do not care which.

public import FoundationEssentials
public import VolumeCore

public struct SnapshotStatus: Codable, Sendable, Hashable {
    public var name: String
    public var createdAt: Date
    public var epoch: UInt64
    /// Bytes of SCOs written between the previous snapshot and this one.
    public var writtenSincePreviousBytes: UInt64
    /// The backend holds everything up to this snapshot.
    public var onBackend: Bool
    public var clones: [String]

    public init(
        name: String, createdAt: Date, epoch: UInt64, writtenSincePreviousBytes: UInt64, onBackend: Bool,
        clones: [String]
    ) {
        self.name = name
        self.createdAt = createdAt
        self.epoch = epoch
        self.writtenSincePreviousBytes = writtenSincePreviousBytes
        self.onBackend = onBackend
        self.clones = clones
    }
}

public struct SpaceStatus: Codable, Sendable, Hashable {
    /// Bytes of data written to the volume's SCOs over its life (what the backend stores before reclamation).
    public var writtenBytes: UInt64
    /// Bytes of clusters the volume or one of its snapshots still reads.
    public var referencedBytes: UInt64
    /// Written but no longer referenced: what the scrubber can give back.
    public var reclaimableBytes: UInt64
    /// SCOs on local flash.
    public var localFlashBytes: UInt64
    /// Written but not yet on the backend.
    public var unstoredBytes: UInt64

    public init(
        writtenBytes: UInt64, referencedBytes: UInt64, reclaimableBytes: UInt64, localFlashBytes: UInt64,
        unstoredBytes: UInt64
    ) {
        self.writtenBytes = writtenBytes
        self.referencedBytes = referencedBytes
        self.reclaimableBytes = reclaimableBytes
        self.localFlashBytes = localFlashBytes
        self.unstoredBytes = unstoredBytes
    }
}

public struct VolumeStatus: Codable, Sendable, Hashable {
    public struct Parent: Codable, Sendable, Hashable {
        public var volume: String
        public var snapshot: String
        public init(volume: String, snapshot: String) {
            self.volume = volume
            self.snapshot = snapshot
        }
    }

    public var name: String
    public var id: String
    public var sizeBytes: UInt64
    public var clusterSizeBytes: UInt32
    public var createdAt: Date
    public var backend: String
    public var parent: Parent?
    /// Served by a running router (else the figures below come from local files).
    public var online: Bool
    public var snapshots: [SnapshotStatus]
    public var space: SpaceStatus?
    public var lastUploadError: String?
    public var connections: Int?
    /// The DTL mirror (nil: the volume is not served here).
    public var dtl: DTLInfo?

    public init(
        name: String, id: String, sizeBytes: UInt64, clusterSizeBytes: UInt32, createdAt: Date, backend: String,
        parent: Parent?, online: Bool, snapshots: [SnapshotStatus], space: SpaceStatus?, lastUploadError: String?,
        connections: Int?
    ) {
        self.name = name
        self.id = id
        self.sizeBytes = sizeBytes
        self.clusterSizeBytes = clusterSizeBytes
        self.createdAt = createdAt
        self.backend = backend
        self.parent = parent
        self.online = online
        self.snapshots = snapshots
        self.space = space
        self.lastUploadError = lastUploadError
        self.connections = connections
    }
}

/// A volume's distributed transaction log as `vd volume info` shows it.
public struct DTLInfo: Codable, Sendable, Hashable {
    /// sync, async or none.
    public var mode: String
    public var peer: String?
    /// in_sync, catching_up, degraded or off.
    public var state: String
    /// Bytes sent to the peer and not yet answered.
    public var unansweredBytes: UInt64
    /// Why the mirror is degraded.
    public var lastError: String?
    public init(mode: String, peer: String?, state: String, unansweredBytes: UInt64, lastError: String?) {
        self.mode = mode
        self.peer = peer
        self.state = state
        self.unansweredBytes = unansweredBytes
        self.lastError = lastError
    }
}

/// `vd volume dtl`: a volume's DTL mode and peer.
public struct SetDTLRequest: Codable, Sendable, Hashable {
    /// sync, async or none.
    public var mode: String
    /// The peer's node name; nil: one is chosen among the cluster's nodes with a DTL service (never the owner).
    public var peer: String?
    public init(mode: String, peer: String? = nil) {
        self.mode = mode
        self.peer = peer
    }
}

public struct CreateVolumeRequest: Codable, Sendable, Hashable {
    public var name: String
    public var sizeBytes: UInt64
    public var clusterSizeBytes: UInt32?
    public var backend: String?
    public init(name: String, sizeBytes: UInt64, clusterSizeBytes: UInt32? = nil, backend: String? = nil) {
        self.name = name
        self.sizeBytes = sizeBytes
        self.clusterSizeBytes = clusterSizeBytes
        self.backend = backend
    }
}

public struct AttachVolumeRequest: Codable, Sendable, Hashable {
    public var name: String
    public var backend: String?
    public init(name: String, backend: String? = nil) {
        self.name = name
        self.backend = backend
    }
}

public struct CreateSnapshotRequest: Codable, Sendable, Hashable {
    public var name: String
    public init(name: String) { self.name = name }
}

public struct RollbackRequest: Codable, Sendable, Hashable {
    /// Disconnect the volume's clients instead of refusing while they are connected.
    public var force: Bool
    public init(force: Bool) { self.force = force }
}

public struct CreateCloneRequest: Codable, Sendable, Hashable {
    public var parent: String
    public var snapshot: String
    public var name: String
    public init(parent: String, snapshot: String, name: String) {
        self.parent = parent
        self.snapshot = snapshot
        self.name = name
    }
}

/// An error as the API sends it.
public struct APIError: Codable, Sendable, Hashable {
    public var code: String
    public var message: String
    public init(_ error: VDError) {
        code = error.code.rawValue
        message = error.message
    }
    public var vdError: VDError { VDError(VDError.Code(rawValue: code), message) }
}

/// What the router can be asked to do. Every method throws VDError with an operator-readable message.
/// `vd snapshot diff`: the changed extents between `from` (a snapshot, `PARENT@SNAPSHOT` for a clone's base, nil
/// for nothing: every extent holding data) and `to` (a snapshot, nil for the live volume).
public struct DiffRequest: Codable, Sendable, Hashable {
    public var from: String?
    public var to: String?
    public init(from: String?, to: String?) {
        self.from = from
        self.to = to
    }
}

public struct DiffExtentStatus: Codable, Sendable, Hashable {
    public var offset: UInt64
    public var length: UInt64
    /// The newer version reads zeroes here.
    public var zero: Bool
    public init(offset: UInt64, length: UInt64, zero: Bool) {
        self.offset = offset
        self.length = length
        self.zero = zero
    }
}

public struct DiffResponse: Codable, Sendable, Hashable {
    public var volume: String
    public var from: String?
    public var to: String?
    public var sizeBytes: UInt64
    public var extents: [DiffExtentStatus]
    public init(volume: String, from: String?, to: String?, sizeBytes: UInt64, extents: [DiffExtentStatus]) {
        self.volume = volume
        self.from = from
        self.to = to
        self.sizeBytes = sizeBytes
        self.extents = extents
    }
}

/// `vd snapshot export-diff`: writes the diff between `from` (nil: a full copy) and snapshot `to` to `path` (absolute,
/// on the router's machine).
public struct ExportDiffRequest: Codable, Sendable, Hashable {
    public var from: String?
    public var to: String
    public var path: String
    public init(from: String?, to: String, path: String) {
        self.from = from
        self.to = to
        self.path = path
    }
}

/// `vd volume import-diff`: applies the stream at `path`, then takes snapshot `snapshot` if given. Unless `force`,
/// the volume must hold the stream's base: a snapshot named after its FROM with no change since, or nothing at all
/// for a full copy.
public struct ImportDiffRequest: Codable, Sendable, Hashable {
    public var path: String
    public var snapshot: String?
    public var force: Bool?
    public init(path: String, snapshot: String?, force: Bool = false) {
        self.path = path
        self.snapshot = snapshot
        self.force = force
    }
}

public struct DiffTransferStatus: Codable, Sendable, Hashable {
    public var volume: String
    public var from: String?
    public var to: String
    public var extents: Int
    public var dataBytes: UInt64
    public var zeroBytes: UInt64
    public var streamBytes: UInt64
    public var snapshot: String?
    public init(
        volume: String, from: String?, to: String, extents: Int, dataBytes: UInt64, zeroBytes: UInt64,
        streamBytes: UInt64, snapshot: String? = nil
    ) {
        self.volume = volume
        self.from = from
        self.to = to
        self.extents = extents
        self.dataBytes = dataBytes
        self.zeroBytes = zeroBytes
        self.streamBytes = streamBytes
        self.snapshot = snapshot
    }
}

public protocol ManagementService: Sendable {
    func listVolumes() async throws(VDError) -> [VolumeStatus]
    func volumeStatus(_ name: String) async throws(VDError) -> VolumeStatus
    func createVolume(_ request: CreateVolumeRequest) async throws(VDError) -> VolumeStatus
    func attachVolume(_ request: AttachVolumeRequest) async throws(VDError) -> VolumeStatus
    func deleteVolume(_ name: String) async throws(VDError)
    func listSnapshots(_ volume: String) async throws(VDError) -> [SnapshotStatus]
    func createSnapshot(_ volume: String, _ request: CreateSnapshotRequest) async throws(VDError) -> SnapshotStatus
    func deleteSnapshot(_ volume: String, _ snapshot: String) async throws(VDError)
    func rollback(
        _ volume: String, _ snapshot: String, _ request: RollbackRequest
    ) async throws(VDError) -> SnapshotStatus
    func createClone(_ request: CreateCloneRequest) async throws(VDError) -> VolumeStatus
    func diff(_ volume: String, _ request: DiffRequest) async throws(VDError) -> DiffResponse
    func exportDiff(_ volume: String, _ request: ExportDiffRequest) async throws(VDError) -> DiffTransferStatus
    func importDiff(_ volume: String, _ request: ImportDiffRequest) async throws(VDError) -> DiffTransferStatus
    /// Looks for scrub results of the volume now and applies them (the router also polls on its own).
    func applyScrubResults(_ volume: String) async throws(VDError)
    /// Prometheus text exposition.
    func metrics() async throws(VDError) -> String
    /// Moves a volume this router owns to another node: drain, release to it, and have it take the volume.
    func moveVolume(_ volume: String, _ request: MoveVolumeRequest) async throws(VDError) -> MoveVolumeResponse
    /// Takes a volume released to this node (the second half of a move), registering it from its backend.
    func takeVolume(_ request: TakeVolumeRequest) async throws(VDError) -> VolumeStatus
    /// Takes a volume whose owner is gone (stopped renewing): waits its lease out, then owns and serves it.
    func takeoverVolume(_ request: TakeoverVolumeRequest) async throws(VDError) -> VolumeStatus
    /// Sets a volume's DTL mode and peer.
    func setVolumeDTL(_ volume: String, _ request: SetDTLRequest) async throws(VDError) -> VolumeStatus
    /// Every volume in a backend with its owner record (owner, generation, lease age).
    func clusterVolumes(backend: String?) async throws(VDError) -> [ClusterVolume]
    /// Records (or forgets) a clone served by another router in a snapshot of a volume this router owns, so the
    /// snapshot is kept while the clone reads through it.
    func registerClone(
        _ volume: String, _ snapshot: String, _ request: CloneRegistrationRequest
    ) async throws(VDError) -> SnapshotStatus
}

public struct CloneRegistrationRequest: Codable, Sendable, Hashable {
    /// The clone's name.
    public var clone: String
    /// true: record it; false: forget it (the clone was deleted).
    public var present: Bool
    /// The snapshot's epoch the clone reads (a recording is refused when the snapshot has another one now).
    public var epoch: UInt64?
    public init(clone: String, present: Bool, epoch: UInt64? = nil) {
        self.clone = clone
        self.present = present
        self.epoch = epoch
    }
}

public struct TakeoverVolumeRequest: Codable, Sendable, Hashable {
    public var name: String
    /// The backend (name in the configuration, or URL); the default backend when nil.
    public var backend: String?
    /// Take it over even if writes the lost owner replied may be lost (its DTL peer is unreachable, or was not in
    /// sync).
    public var acceptLoss: Bool?
    public init(name: String, backend: String? = nil, acceptLoss: Bool? = nil) {
        self.name = name
        self.backend = backend
        self.acceptLoss = acceptLoss
    }
}

/// One volume of a backend as `vd volume list --cluster` shows it.
public struct ClusterVolume: Codable, Sendable, Hashable {
    public var name: String
    /// The owner record's node (nil: no router has owned it yet).
    public var owner: String?
    public var generation: UInt64?
    public var leaseSeconds: Double?
    /// Seconds since the owner last renewed, by the owner's wall clock against this router's (for people:
    /// decisions never use wall clocks).
    public var leaseAgeSeconds: Double?
    public var released: Bool?
    public var releasedTo: String?
    /// The owner's cluster address, from its record.
    public var address: String?
    /// Set when the record could not be read.
    public var error: String?
    public init(name: String) { self.name = name }
}

public struct MoveVolumeRequest: Codable, Sendable, Hashable {
    /// The node to move to (its node record in the default backend gives its cluster address).
    public var to: String
    /// How long to wait for everything to reach the backend before giving up (the volume then stays).
    public var drainTimeoutSeconds: Double?
    public init(to: String, drainTimeoutSeconds: Double? = nil) {
        self.to = to
        self.drainTimeoutSeconds = drainTimeoutSeconds
    }
}

public struct MoveVolumeResponse: Codable, Sendable, Hashable {
    public var volume: String
    public var from: String
    public var to: String
    /// The generation the volume has on its new node.
    public var generation: UInt64
    /// Data that was still only on the old node's flash when the move started.
    public var unstoredBytesAtStart: UInt64
    public var drainSeconds: Double
    public var totalSeconds: Double
    public init(
        volume: String, from: String, to: String, generation: UInt64, unstoredBytesAtStart: UInt64,
        drainSeconds: Double, totalSeconds: Double
    ) {
        self.volume = volume
        self.from = from
        self.to = to
        self.generation = generation
        self.unstoredBytesAtStart = unstoredBytesAtStart
        self.drainSeconds = drainSeconds
        self.totalSeconds = totalSeconds
    }
}

public struct TakeVolumeRequest: Codable, Sendable, Hashable {
    public var name: String
    /// The backend URL of the volume (the same store the old owner used).
    public var backend: String
    public init(name: String, backend: String) {
        self.name = name
        self.backend = backend
    }
}
