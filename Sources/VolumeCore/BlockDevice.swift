// The contract between a protocol front end (the NBD server) and whatever stores the bytes (a volume, a snapshot,
// an in-memory twin). Front ends check nothing about storage; devices check every request against their own size.

public import NIOCore

/// What a device tells its clients at connect time.
public struct BlockDeviceInfo: Sendable, Hashable {
    /// Size of the device in bytes (a multiple of 512).
    public var sizeBytes: UInt64
    /// Smallest request granularity the device handles without read-modify-write cost being the client's problem.
    public var minimumBlockSizeBytes: UInt32
    /// The device's natural block (the cluster size): requests aligned to it are fastest.
    public var preferredBlockSizeBytes: UInt32
    /// Largest payload of a single read or write request.
    public var maximumPayloadBytes: UInt32
    public var isReadOnly: Bool
    /// TRIM frees space (unmapped ranges read as zeroes).
    public var supportsTrim: Bool
    /// WRITE_ZEROES is cheap (unmaps whole clusters).
    public var supportsWriteZeroes: Bool
    /// FLUSH makes every completed write durable, whichever connection it came from (multi-conn safe).
    public var flushCoversAllConnections: Bool

    public init(
        sizeBytes: UInt64, minimumBlockSizeBytes: UInt32 = 512, preferredBlockSizeBytes: UInt32,
        maximumPayloadBytes: UInt32 = Limits.requestBytesMax, isReadOnly: Bool = false, supportsTrim: Bool = true,
        supportsWriteZeroes: Bool = true, flushCoversAllConnections: Bool = true
    ) {
        self.sizeBytes = sizeBytes
        self.minimumBlockSizeBytes = minimumBlockSizeBytes
        self.preferredBlockSizeBytes = preferredBlockSizeBytes
        self.maximumPayloadBytes = maximumPayloadBytes
        self.isReadOnly = isReadOnly
        self.supportsTrim = supportsTrim
        self.supportsWriteZeroes = supportsWriteZeroes
        self.flushCoversAllConnections = flushCoversAllConnections
    }
}

/// A run of bytes with the same allocation state, as reported by `BlockDevice.allocation`.
public struct BlockExtent: Sendable, Hashable {
    public var lengthBytes: UInt64
    /// Not backed by stored data (reads as zeroes; writing will allocate).
    public var isHole: Bool
    /// Known to read as zeroes.
    public var isZero: Bool
    public init(lengthBytes: UInt64, isHole: Bool, isZero: Bool) {
        self.lengthBytes = lengthBytes
        self.isHole = isHole
        self.isZero = isZero
    }
}

/// The bytes of a read together with the parts of it that hold no stored data (unmapped or never written, so they
/// read as zeroes): a structured NBD reply sends those as holes instead of zero bytes.
public struct SparseData: Sendable, Hashable {
    /// Every byte of the range, zeroes included.
    public var data: ByteBuffer
    /// Byte ranges relative to the start of `data` that read as zeroes because nothing is stored there; ascending,
    /// disjoint, not adjacent. Empty when the device does not know or nothing is a hole.
    public var holes: [Range<Int>]
    public init(data: ByteBuffer, holes: [Range<Int>] = []) {
        self.data = data
        self.holes = holes
    }

    /// Adds a hole, merging it with the previous one when they touch. Holes must be added in ascending order.
    public mutating func addHole(_ range: Range<Int>) {
        guard !range.isEmpty else { return }
        if let last = holes.last, last.upperBound == range.lowerBound {
            holes[holes.count - 1] = last.lowerBound..<range.upperBound
        } else {
            holes.append(range)
        }
    }
}

/// A virtual disk. All methods may be called concurrently from many connections. Offsets and lengths are bytes and
/// need not be aligned; a request reaching past `info.sizeBytes` fails with `.outOfRange` and changes nothing.
///
/// Durability contract: when `write`, `trim` or `writeZeroes` returns, the change survives a crash of the process;
/// when `flush` returns (or a request with `fua: true` returns), every change that had returned before it survives
/// power loss too.
public protocol BlockDevice: AnyObject, Sendable {
    var info: BlockDeviceInfo { get }
    /// Reads `length` bytes. Unwritten ranges read as zeroes. Never returns data whose checksum did not verify.
    func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer
    /// `read`, also saying which parts are holes (found from the same map lookup as the data, so the two agree).
    func readSparse(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError)
    func flush() async throws(VDError)
    /// Discards the range: whole clusters inside it read as zeroes afterwards and stop taking space.
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError)
    /// Makes the range read as zeroes. With `mayUnmap`, whole clusters are unmapped rather than written.
    func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError)
    /// Allocation state of `[offset, offset+length)`, from metadata only (no data reads). The extents cover the range
    /// from `offset` without gaps and may stop early (at least one extent is returned).
    func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent]
    /// Brings the range into the device's fastest cache (NBD_CMD_CACHE); a hint. Default: nothing.
    func prefetch(offset: UInt64, length: UInt32) async throws(VDError)
    /// Names of the dirty bitmaps the device offers (NBD meta context `qemu:dirty-bitmap:NAME`): for a volume, its
    /// snapshots older than the version served. Default: none.
    var dirtyBitmaps: [String] { get }
    /// Whether the content of `[offset, offset+length)` changed since `bitmap`: extents covering the range from
    /// `offset` without gaps (they may stop early; at least one is returned). From metadata only.
    func dirtyExtents(bitmap: String, offset: UInt64, length: UInt32) async throws(VDError) -> [DirtyExtent]
}

/// A run of bytes that changed (`dirty`) or did not since a dirty bitmap's point in time.
public struct DirtyExtent: Sendable, Hashable {
    public var lengthBytes: UInt64
    public var dirty: Bool
    public init(lengthBytes: UInt64, dirty: Bool) {
        self.lengthBytes = lengthBytes
        self.dirty = dirty
    }
}

extension BlockDevice {
    /// Devices without history offer no dirty bitmaps.
    public var dirtyBitmaps: [String] { [] }
    public func dirtyExtents(bitmap: String, offset: UInt64, length: UInt32) async throws(VDError) -> [DirtyExtent] {
        throw VDError(.unsupported, "this device has no dirty bitmap \(bitmap)")
    }

    /// Devices without a cache ignore prefetch hints.
    public func prefetch(offset: UInt64, length: UInt32) async throws(VDError) {}

    /// Devices that do not track holes return the data alone.
    public func readSparse(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData {
        SparseData(data: try await read(offset: offset, length: length))
    }

    /// Checks a request's range against the device size: `.outOfRange` if it reaches past the end.
    @inlinable
    public func checkRange(offset: UInt64, length: UInt64) throws(VDError) {
        let size = info.sizeBytes
        guard offset <= size, length <= size - offset else {
            throw .outOfRange("request [\(offset), +\(length)) reaches past the end of the device (\(size) bytes)")
        }
    }
}
