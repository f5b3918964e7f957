// Snapshots of a volume: named epoch boundaries. The table is a metadata record kept in the volume's map and
// uploaded to its namespace (`NAME/snapshots/<version>`), so a restart from the backend alone restores the snapshots
// (those whose epoch the backend's TLogs reach) and the clones that hang off them.

public import FoundationEssentials

/// One snapshot: everything written up to the end of `epoch` and nothing after.
public struct SnapshotRecord: Codable, Sendable, Hashable {
    public var id: UInt64
    public var name: String
    public var epoch: UInt64
    public var createdAt: Date
    /// Clones reading through this snapshot (it cannot be deleted while any exists).
    public var clones: [String]

    public init(id: UInt64, name: String, epoch: UInt64, createdAt: Date = Date(), clones: [String] = []) {
        self.id = id
        self.name = name
        self.epoch = epoch
        self.createdAt = createdAt
        self.clones = clones
    }
}

/// A rollback that happened: at epoch `atEpoch` the volume returned to its content at the end of `toEpoch`.
public struct RollbackRecord: Codable, Sendable, Hashable {
    public var atEpoch: UInt64
    public var toEpoch: UInt64
    public init(atEpoch: UInt64, toEpoch: UInt64) {
        self.atEpoch = atEpoch
        self.toEpoch = toEpoch
    }
}

public struct SnapshotTable: Codable, Sendable, Hashable {
    /// Grows with every change (names the backend copy).
    public var version: UInt64 = 0
    public var nextID: UInt64 = 1
    public var snapshots: [SnapshotRecord] = []
    public var rollbacks: [RollbackRecord] = []

    public init() {}

    public func snapshot(named name: String) -> SnapshotRecord? { snapshots.first { $0.name == name } }

    /// Epochs whose map state must stay readable: every snapshot, and every rollback target (replaying a rollback
    /// from the TLogs needs the state it returned to).
    public var retainedEpochs: [UInt64] {
        Array(Set(snapshots.map(\.epoch) + rollbacks.map(\.toEpoch))).sorted()
    }

    /// Snapshot names follow volume name rules ('@' and '/' are reserved for export names and namespaces).
    public static func validateName(_ name: String) throws(VDError) {
        guard VolumeName(rawValue: name) != nil else {
            throw .invalidArgument(
                "snapshot name '\(name)' must be 1 to \(Limits.volumeNameLengthMax) letters, digits, '.', '_' or '-', starting with a letter or digit")
        }
    }
}
