// A volume: a thin-provisioned virtual disk stored as a log. This file holds its state and the BlockDevice entry
// points (read, write, trim, write-zeroes, flush, allocation); the journal, durability, upload and recovery machinery
// live in the Volume+*.swift files.
//
// Contracts (see docs/design.md):
// - a write is replied to only after its data and its batch header are in the kernel (pwritev returned) and the map
//   points at them: it survives kill -9;
// - flush/FUA replies only after an fdatasync of every journal file that holds replied writes: power-loss safe;
// - every cluster read (local flash or backend) is checked against the CRC32C in the map; a mismatch is an error
//   naming the volume, cluster and object, never data.

import BlockMap
import Collections
import FlashIO
import Logging
package import NIOCore
import NIOPosix
import ObjectStore
import SCOCache
import Synchronization
import TransactionLog
package import VolumeCore

package final class Volume: BlockDevice {
    package let config: VolumeConfig
    package let layout: VolumeLayout
    let options: VolumeOptions
    let backend: any ObjectStore
    let cache: FlashCache
    let map: BlockMap
    let pool: NIOThreadPool
    let logger: Logger
    let clusterBytes: Int
    let rangeLock = ClusterRangeLock()

    /// The open journal; touched only by the current journal leader (see Volume+Journal.swift).
    let journal: JournalState
    let writer: Mutex<WriterState>
    let syncState = Mutex(SyncState())
    let uploads: Mutex<UploadState>
    /// Bytes of every SCO not yet stored on the backend (open journal included): the back-pressure measure.
    let unstoredBytes: Atomic<UInt64>
    let background = Mutex<[Task<Void, Never>]>([])
    let backendFormats = Mutex(BackendFormats())

    init(
        config: VolumeConfig, layout: VolumeLayout, options: VolumeOptions, backend: any ObjectStore,
        cache: FlashCache, map: BlockMap, pool: NIOThreadPool, logger: Logger, journal: JournalState,
        storedThrough: SCONumber, unstoredBytes: UInt64
    ) {
        self.config = config
        self.layout = layout
        self.options = options
        self.backend = backend
        self.cache = cache
        self.map = map
        self.pool = pool
        var logger = logger
        logger[metadataKey: "volume"] = "\(config.name)"
        self.logger = logger
        self.clusterBytes = Int(config.clusterSizeBytes)
        self.journal = journal
        self.writer = Mutex(WriterState(currentFile: journal.file))
        self.uploads = Mutex(UploadState(storedThrough: storedThrough))
        self.unstoredBytes = Atomic(unstoredBytes)
    }

    package var name: VolumeName { config.name }

    package var info: BlockDeviceInfo {
        BlockDeviceInfo(
            sizeBytes: config.sizeBytes, minimumBlockSizeBytes: 512, preferredBlockSizeBytes: config.clusterSizeBytes,
            maximumPayloadBytes: Limits.requestBytesMax, isReadOnly: false, supportsTrim: true, supportsWriteZeroes: true,
            flushCoversAllConnections: true)
    }

    func cacheKey(_ sco: SCONumber) -> FlashCache.Key { FlashCache.Key(volume: config.id, sco: sco) }

    private func checkWritable() throws(VDError) {
        if let failure = writer.withLock({ $0.failure }) { throw failure }
    }

    // MARK: read

    package func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
        try checkRange(offset: offset, length: UInt64(length))
        guard length > 0 else { return ByteBuffer() }
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let last = (offset + UInt64(length) - 1) / cs
        let count = Int(last - first + 1)
        let values = try map.current(from: first, count: count)
        if count == 1 && offset % cs == 0 && length == UInt32(clusterBytes) {
            guard let location = values[0]?.location else { return ByteBuffer(repeating: 0, count: clusterBytes) }
            return try await readClusters(
                sco: location.sco, offset: location.offset, crcs: [location.crc], firstAddress: first)
        }
        var result = ByteBuffer(repeating: 0, count: Int(length))
        var i = 0
        while i < count {
            guard let location = values[i]?.location else {
                i += 1
                continue
            }
            var j = i + 1
            while j < count, let next = values[j]?.location, next.sco == location.sco,
                UInt64(next.offset) == UInt64(location.offset) + UInt64(j - i) * cs
            {
                j += 1
            }
            let crcs = values[i..<j].map { $0!.location!.crc }
            let bytes = try await readClusters(
                sco: location.sco, offset: location.offset, crcs: crcs, firstAddress: first + UInt64(i))
            let runStart = (first + UInt64(i)) * cs
            let runEnd = (first + UInt64(j)) * cs
            let copyStart = max(runStart, offset)
            let copyEnd = min(runEnd, offset + UInt64(length))
            result.setBuffer(
                bytes.getSlice(at: bytes.readerIndex + Int(copyStart - runStart), length: Int(copyEnd - copyStart))!,
                at: result.readerIndex + Int(copyStart - offset))
            i = j
        }
        return result
    }

    /// Reads consecutive clusters of one SCO and verifies each against its CRC: from local flash when the SCO is
    /// there, else from the backend. A local copy that fails verification is replaced by the backend's when the
    /// SCO is stored there.
    func readClusters(sco: SCONumber, offset: UInt32, crcs: [UInt32], firstAddress: ClusterAddress)
        async throws(VDError) -> ByteBuffer
    {
        let length = crcs.count * clusterBytes
        if let local = try await cache.read(cacheKey(sco), offset: UInt64(offset), length: length) {
            guard let bad = firstMismatch(local, crcs) else { return local }
            let message =
                "volume \(config.name) cluster \(firstAddress + UInt64(bad)): checksum mismatch in the local copy of SCO \(sco.hex) at offset \(UInt64(offset) + UInt64(bad * clusterBytes))"
            guard isStored(sco) else { throw .corrupt(message) }
            logger.error("\(message); reading it from the backend instead")
        }
        let object = layout.scoObject(sco)
        let remote = try await fetchFromBackend(sco, range: UInt64(offset)..<(UInt64(offset) + UInt64(length)))
        if let bad = firstMismatch(remote, crcs) {
            throw .corrupt(
                "volume \(config.name) cluster \(firstAddress + UInt64(bad)): checksum mismatch in backend object \(object) at offset \(UInt64(offset) + UInt64(bad * clusterBytes))"
            )
        }
        return remote
    }

    /// Index of the first cluster whose CRC does not match, or nil.
    func firstMismatch(_ bytes: ByteBuffer, _ crcs: [UInt32]) -> Int? {
        guard bytes.readableBytes == crcs.count * clusterBytes else { return 0 }
        let cs = clusterBytes
        return bytes.withUnsafeReadableBytes { raw -> Int? in
            for (index, crc) in crcs.enumerated() {
                let actual = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[(index * cs)..<((index + 1) * cs)]))
                if actual != crc { return index }
            }
            return nil
        }
    }

    // MARK: write

    package func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {
        try checkWritable()
        try checkRange(offset: offset, length: UInt64(data.readableBytes))
        let length = UInt64(data.readableBytes)
        guard length > 0 else { return }
        guard length <= UInt64(Limits.requestBytesMax) else {
            throw .invalidArgument("write of \(length) bytes exceeds the maximum request of \(Limits.requestBytesMax)")
        }
        await throttle()
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let last = (offset + length - 1) / cs
        await rangeLock.acquire(first...last)
        defer { rangeLock.release(first...last) }
        let buffer: ByteBuffer
        if offset % cs == 0 && length % cs == 0 {
            buffer = data
        } else {
            // Read-modify-write of the partial clusters at either end (under the range lock).
            var merged = ByteBuffer(repeating: 0, count: Int((last - first + 1) * cs))
            if offset % cs != 0 {
                merged.setBuffer(try await read(offset: first * cs, length: UInt32(cs)), at: 0)
            }
            if (offset + length) % cs != 0 && (last != first || offset % cs == 0) {
                merged.setBuffer(try await read(offset: last * cs, length: UInt32(cs)), at: Int((last - first) * cs))
            }
            merged.setBuffer(data, at: Int(offset - first * cs))
            buffer = merged
        }
        try await submit(.write(clusterWrite(first: first, buffer: buffer)))
        if fua { try await flush() }
    }

    /// Batch entries for full clusters in `buffer` starting at cluster `first`.
    func clusterWrite(first: ClusterAddress, buffer: ByteBuffer) -> ClusterWrite {
        let cs = clusterBytes
        let count = buffer.readableBytes / cs
        var entries: [BatchEntry] = []
        entries.reserveCapacity(count)
        var payloadIndex: [Int] = []
        payloadIndex.reserveCapacity(count)
        let detect = options.detectZeroes
        buffer.withUnsafeReadableBytes { raw in
            for k in 0..<count {
                let cluster = UnsafeRawBufferPointer(rebasing: raw[(k * cs)..<((k + 1) * cs)])
                let address = first + UInt64(k)
                if detect && Self.isAllZero(cluster) {
                    if case .unmap(let start, let n)? = entries.last, start + UInt64(n) == address {
                        entries[entries.count - 1] = .unmap(address: start, count: n + 1)
                    } else {
                        entries.append(.unmap(address: address, count: 1))
                    }
                } else {
                    entries.append(.data(address: address, crc: CRC32C.checksum(cluster)))
                    payloadIndex.append(k)
                }
            }
        }
        return ClusterWrite(entries: entries, payloadIndex: payloadIndex, buffer: buffer)
    }

    static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        var acc: UInt64 = 0
        var i = 0
        // Early exit on the first non-zero 64-byte block keeps random data cheap.
        while i < words {
            let end = min(i + 8, words)
            while i < end {
                acc |= bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
                i += 1
            }
            if acc != 0 { return false }
        }
        for j in (words * 8)..<bytes.count where bytes[j] != 0 { return false }
        return true
    }

    // MARK: trim and write-zeroes

    package func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError) {
        try await unmap(offset: offset, length: UInt64(length), zeroPartialClusters: false, fua: fua)
    }

    package func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {
        // Unmapped clusters read as zeroes and take no space, so zeroes are always stored as unmapped whole
        // clusters; partial clusters at the ends are written with zeroes.
        try await unmap(offset: offset, length: UInt64(length), zeroPartialClusters: true, fua: fua)
    }

    func unmap(offset: UInt64, length: UInt64, zeroPartialClusters: Bool, fua: Bool) async throws(VDError) {
        try checkWritable()
        try checkRange(offset: offset, length: length)
        guard length > 0 else { return }
        let cs = UInt64(clusterBytes)
        let end = offset + length
        let firstFull = (offset + cs - 1) / cs
        let endFull = end / cs
        if zeroPartialClusters {
            if firstFull >= endFull {
                try await write(offset: offset, data: ByteBuffer(repeating: 0, count: Int(length)), fua: false)
            } else {
                if offset < firstFull * cs {
                    try await write(
                        offset: offset, data: ByteBuffer(repeating: 0, count: Int(firstFull * cs - offset)), fua: false)
                }
                if end > endFull * cs {
                    try await write(
                        offset: endFull * cs, data: ByteBuffer(repeating: 0, count: Int(end - endFull * cs)), fua: false)
                }
            }
        }
        if endFull > firstFull {
            await rangeLock.acquire(firstFull...(endFull - 1))
            defer { rangeLock.release(firstFull...(endFull - 1)) }
            var entries: [BatchEntry] = []
            var address = firstFull
            while address < endFull {
                let n = min(endFull - address, UInt64(UInt32.max))
                entries.append(.unmap(address: address, count: UInt32(n)))
                address += n
            }
            try await submit(.write(ClusterWrite(entries: entries, payloadIndex: [], buffer: ByteBuffer())))
        }
        if fua { try await flush() }
    }

    // MARK: allocation

    package func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] {
        try checkRange(offset: offset, length: UInt64(length))
        guard length > 0 else { return [BlockExtent(lengthBytes: 0, isHole: true, isZero: true)] }
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let end = offset + UInt64(length)
        let last = (end - 1) / cs
        // Which clusters hold data, from the map only.
        var mapped: [(ClusterAddress, Bool)] = []
        if last - first < 1024 {
            let values = try map.current(from: first, count: Int(last - first + 1))
            mapped = values.enumerated().map { (first + UInt64($0.offset), $0.element?.location != nil) }
        } else {
            var previous = first
            for (address, value) in try map.writtenAddresses(from: first, to: last + 1) where value.location != nil {
                if address > previous { mapped.append((previous, false)) }
                mapped.append((address, true))
                previous = address + 1
            }
            if previous <= last { mapped.append((previous, false)) }
        }
        // Turn per-cluster (or run-start) states into byte extents clipped to the request.
        var extents: [BlockExtent] = []
        for (index, (address, isData)) in mapped.enumerated() {
            let runEndCluster = index + 1 < mapped.count ? mapped[index + 1].0 : last + 1
            let start = max(address * cs, offset)
            let stop = min(runEndCluster * cs, end)
            guard stop > start else { continue }
            if let previous = extents.last, previous.isHole == !isData {
                extents[extents.count - 1].lengthBytes += stop - start
            } else {
                extents.append(BlockExtent(lengthBytes: stop - start, isHole: !isData, isZero: !isData))
            }
        }
        return extents
    }
}
