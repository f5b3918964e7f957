// Reading SCOs from the backend, and writing them to it compressed.
//
// The first read of an SCO on the backend probes its format once: the first 4096 bytes say whether it is a plain SCO
// (then a HEAD gives its length) or a compressed one (then its chunk index is fetched and verified). Reads then fetch
// a window around the requested clusters (read-ahead, clamped to the SCO) with one range GET, decompress if needed,
// keep the window in the flash cache and return the requested part. Nothing here trusts the bytes: the caller
// verifies every cluster against the map's CRC.

import FlashIO
import Logging
import NIOCore
import ObjectStore
import SCOCache
import SnappyCodec
import Synchronization
import VolumeCore

enum BackendSCOFormat: Sendable {
    case plain(lengthBytes: UInt64)
    case compressed(header: CompressedSCOHeader, offsets: [UInt64])

    var lengthBytes: UInt64 {
        switch self {
        case .plain(let length): length
        case .compressed(let header, _): header.originalLength
        }
    }
}

/// Probed formats of backend SCOs (bounded; an evicted entry is probed again).
struct BackendFormats {
    static let entriesMax = 4096
    var formats: [SCONumber: BackendSCOFormat] = [:]

    mutating func insert(_ sco: SCONumber, _ format: BackendSCOFormat) {
        // The lowest number goes first (older SCOs are read less; deterministic, unlike a random pick).
        if formats.count >= Self.entriesMax, let victim = formats.keys.min() { formats[victim] = nil }
        formats[sco] = format
    }
}

/// Reads the SCOs of one volume's namespace from the backend, caching fetched windows in the router's flash cache
/// under `cacheVolume` (the volume's id for the volume itself; a private id for a view of another router's volume,
/// so the two never share cache entries). Used by `Volume` and by `BackendParentView`.
final class BackendSCOReader: Sendable {
    let volumeID: VolumeID
    let volumeName: VolumeName
    let layout: VolumeLayout
    let backend: any ObjectStore
    let cache: FlashCache
    let cacheVolume: VolumeID
    let readAheadBytes: UInt64
    private let formats = Mutex(BackendFormats())

    init(
        volumeID: VolumeID, volumeName: VolumeName, layout: VolumeLayout, backend: any ObjectStore, cache: FlashCache,
        cacheVolume: VolumeID, readAheadBytes: UInt64
    ) {
        self.volumeID = volumeID
        self.volumeName = volumeName
        self.layout = layout
        self.backend = backend
        self.cache = cache
        self.cacheVolume = cacheVolume
        self.readAheadBytes = readAheadBytes
    }

    func cacheKey(_ sco: SCONumber) -> FlashCache.Key { FlashCache.Key(volume: cacheVolume, sco: sco) }

    /// Bytes `range` (4096-aligned, in the SCO's own layout) of SCO `sco` from the backend.
    func fetch(_ sco: SCONumber, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        let format = try await format(sco)
        let object = layout.scoObject(sco)
        guard range.upperBound <= format.lengthBytes else {
            throw .corrupt(
                "volume \(volumeName): the map points past the end of backend object \(object) (\(range.upperBound) > \(format.lengthBytes))"
            )
        }
        let window = readAheadWindow(range, lengthBytes: format.lengthBytes)
        var bytes: ByteBuffer
        switch format {
        case .plain:
            bytes = try await backend.get(object, range: window)
        case .compressed(_, let offsets):
            let compressed = try await backend.get(
                object, range: CompressedSCO.objectRange(of: window, offsets: offsets))
            bytes = try CompressedSCO.decompress(compressed, range: window, offsets: offsets, what: object)
        }
        guard UInt64(bytes.readableBytes) == UInt64(window.count) else {
            throw .corrupt(
                "\(object): the backend returned \(bytes.readableBytes) bytes for a range of \(window.count)")
        }
        cache.storeFetched(cacheKey(sco), path: layout.fetchedPath(sco), offset: window.lowerBound, bytes: bytes)
        bytes.moveReaderIndex(forwardBy: Int(range.lowerBound - window.lowerBound))
        return bytes.getSlice(at: bytes.readerIndex, length: range.count)!
    }

    private func readAheadWindow(_ range: Range<UInt64>, lengthBytes: UInt64) -> Range<UInt64> {
        let unit = max(UInt64(SCOFormat.blockBytes), readAheadBytes)
        let start = range.lowerBound / unit * unit
        let end = min((range.upperBound + unit - 1) / unit * unit, lengthBytes)
        return start..<max(end, range.upperBound)
    }

    /// The format of a backend SCO, probed once (a probe whose bytes do not verify is repeated: they may have been
    /// damaged on the way).
    func format(_ sco: SCONumber) async throws(VDError) -> BackendSCOFormat {
        if let known = formats.withLock({ $0.formats[sco] }) { return known }
        var attempt = 0
        while true {
            attempt += 1
            do throws(VDError) {
                return try await probe(sco)
            } catch  where error.code == .corrupt && attempt < Volume.backendReadAttemptsMax {
                continue
            }
        }
    }

    /// Forgets what is known of `sco` (it was deleted).
    func forget(_ sco: SCONumber) {
        _ = formats.withLock { $0.formats.removeValue(forKey: sco) }
    }

    private func probe(_ sco: SCONumber) async throws(VDError) -> BackendSCOFormat {
        let object = layout.scoObject(sco)
        let first = try await backend.get(object, range: 0..<UInt64(SCOFormat.blockBytes))
        let format: BackendSCOFormat
        if CompressedSCOHeader.isCompressed(first) {
            let header = try CompressedSCOHeader.decode(first, what: object)
            guard header.volumeID == volumeID, header.sco == sco else {
                throw .corrupt("\(object) belongs to volume \(header.volumeID) SCO \(header.sco.hex)")
            }
            let index = try await backend.get(
                object, range: header.indexOffset..<(header.indexOffset + UInt64(header.indexBytes)))
            format = .compressed(
                header: header, offsets: try CompressedSCO.decodeIndex(index, header: header, what: object))
        } else {
            let header = try SCOHeader.decode(first, what: object)
            guard header.volumeID == volumeID, header.sco == sco else {
                throw .corrupt("\(object) belongs to volume \(header.volumeID) SCO \(header.sco.hex)")
            }
            guard let info = try await backend.head(object) else { throw .notFound("backend object \(object) is gone") }
            format = .plain(lengthBytes: info.sizeBytes)
        }
        formats.withLock { $0.insert(sco, format) }
        return format
    }
}

extension Volume {
    /// Bytes `range` (4096-aligned, in the SCO's own layout) of SCO `sco` from the backend.
    func fetchFromBackend(_ sco: SCONumber, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        try await backendReader.fetch(sco, range: range)
    }

    /// Uploads a sealed SCO: a hard link or copy for stores that can, compressed in memory when configured.
    func putSCO(_ sco: SCONumber, lengthBytes: UInt64) async throws(VDError) {
        let path = layout.scoPath(sco)
        let object = layout.scoObject(sco)
        guard options.compressUploads else {
            if env.fs.pathsAreReal {
                // A real file: the store may link it (a local directory on the same file system) or stream it.
                try await backend.put(object, contentsOf: path, length: lengthBytes)
            } else {
                try await backend.put(object, data: try await readSealed(path: path, lengthBytes: lengthBytes))
            }
            return
        }
        let id = config.id
        let fs = env.fs
        // Read and compressed a piece at a time: only the compressed object is held (uploads run in parallel).
        let compressed = try await blocking { () throws(VDError) -> ByteBuffer in
            let file = try fs.open(path, options: .readOnly)
            defer { file.close() }
            return try CompressedSCO.compress(lengthBytes: Int(lengthBytes), volumeID: id, number: sco) {
                (offset, into) throws(VDError) in
                guard try file.read(into: into, at: UInt64(offset)) == into.count else {
                    throw VDError(.corrupt, "\(path) is shorter than its sealed length")
                }
            }
        }
        try await backend.put(object, data: compressed)
    }

    /// The first `lengthBytes` of a sealed local SCO.
    func readSealed(path: String, lengthBytes: UInt64) async throws(VDError) -> ByteBuffer {
        let fs = env.fs
        return try await blocking { () throws(VDError) -> ByteBuffer in
            let file = try fs.open(path, options: .readOnly)
            defer { file.close() }
            var data = ByteBufferAllocator().buffer(capacity: Int(lengthBytes))
            let n = try data.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(lengthBytes)) {
                (raw) throws(VDError) -> Int in
                try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(lengthBytes)]), at: 0)
            }
            guard n == Int(lengthBytes) else { throw VDError(.corrupt, "\(path) is shorter than its sealed length") }
            return data
        }
    }
}

extension Volume: ScrubApplierDelegate {
    /// One pass of the scrub results applier now (the management API's "apply scrub results").
    package func scrubPass() async { await scrubs.pass() }

    func backendSCOLength(_ sco: SCONumber) async throws(VDError) -> UInt64 {
        try await backendReader.format(sco).lengthBytes
    }

    func forgetSCO(_ sco: SCONumber) {
        cache.remove(cacheKey(sco))
        try? env.fs.unlinkIfPresent(layout.scoPath(sco))
        try? env.fs.unlinkIfPresent(layout.fetchedPath(sco))
        backendReader.forget(sco)
    }

    /// Live by the one definition (docs/design.md): what the volume reads now or an existing snapshot reads. (A
    /// rollback target that is no snapshot any more keeps versions in the map for replays, but nothing reads them.)
    func mapReferences(_ scos: Set<SCONumber>) throws(VDError) -> String? {
        var found: String?
        try map.forEachLiveVersion(snapshotEpochs: snapshotTable.snapshots.map(\.epoch)) {
            address, value, isCurrent throws(VDError) in
            if found == nil, let location = value.location, scos.contains(location.sco) {
                found =
                    "cluster \(address) (\(isCurrent ? "current" : "history") version of epoch \(value.epoch)) in SCO \(location.sco.hex) at \(location.offset)"
            }
        }
        return found
    }
}
