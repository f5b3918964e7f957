// The identity and shape of a volume: immutable after creation except for the size (grown by resize). Stored as a
// metadata record in the volume's backend namespace (`NAME/volume`) and mirrored in the local flash directory.

public import FoundationEssentials

public struct VolumeConfig: Codable, Sendable, Hashable {
    /// The snapshot a clone reads through to.
    public struct Parent: Codable, Sendable, Hashable {
        public var volume: VolumeName
        public var snapshot: String
        /// The parent's epoch at the snapshot: clusters the clone never wrote read the parent as of this epoch.
        public var epoch: UInt64
        public init(volume: VolumeName, snapshot: String, epoch: UInt64) {
            self.volume = volume
            self.snapshot = snapshot
            self.epoch = epoch
        }
    }

    public var name: VolumeName
    public var id: VolumeID
    public var sizeBytes: UInt64
    public var clusterSizeBytes: UInt32
    public var createdAt: Date
    public var parent: Parent?

    public init(
        name: VolumeName, id: VolumeID = .random(), sizeBytes: UInt64,
        clusterSizeBytes: UInt32 = Limits.clusterSizeBytesDefault, createdAt: Date = Date(), parent: Parent? = nil
    ) {
        self.name = name
        self.id = id
        self.sizeBytes = sizeBytes
        self.clusterSizeBytes = clusterSizeBytes
        self.createdAt = createdAt
        self.parent = parent
    }

    public var clusterCount: UInt64 { (sizeBytes + UInt64(clusterSizeBytes) - 1) / UInt64(clusterSizeBytes) }

    /// Checks size and cluster size; the messages say what would be accepted.
    public static func validate(sizeBytes: UInt64, clusterSizeBytes: UInt32) throws(VDError) {
        guard clusterSizeBytes >= Limits.clusterSizeBytesMin, clusterSizeBytes <= Limits.clusterSizeBytesMax,
            clusterSizeBytes.nonzeroBitCount == 1
        else {
            throw .invalidArgument(
                "cluster size \(clusterSizeBytes) must be a power of two from \(Limits.clusterSizeBytesMin) to \(Limits.clusterSizeBytesMax)"
            )
        }
        guard sizeBytes > 0 else { throw .invalidArgument("the volume size must be greater than zero") }
        guard sizeBytes <= Limits.volumeSizeBytesMax else {
            throw .invalidArgument(
                "the volume size \(ByteSize.format(sizeBytes)) exceeds the maximum of \(ByteSize.format(Limits.volumeSizeBytesMax))")
        }
        guard sizeBytes % UInt64(clusterSizeBytes) == 0 else {
            let down = sizeBytes / UInt64(clusterSizeBytes) * UInt64(clusterSizeBytes)
            let up = down + UInt64(clusterSizeBytes)
            let suggestion = down == 0 ? "\(up)" : "\(down) or \(up)"
            throw .invalidArgument(
                "the volume size \(sizeBytes) is not a multiple of the cluster size \(clusterSizeBytes); use \(suggestion)")
        }
    }
}
