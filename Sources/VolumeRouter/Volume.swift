// A volume: a thin-provisioned virtual disk stored as a log. This file holds the volume's parts and the BlockDevice
// entry points (read, write, trim, write-zeroes, flush, allocation).
//
// The parts, each owning its state behind a small interface:
//   Journal        the open SCO, the leader that appends every change, rolls (Journal.swift, Journal+ZeroAhead.swift)
//   GroupCommit    flushes: one fdatasync round at a time serves every waiting flush (GroupCommit.swift)
//   Uploader       sealed epochs to the backend, in order, and the back-pressure measure (Uploader.swift)
//   SnapshotCatalog the snapshot table, local and on the backend (SnapshotCatalog.swift)
//   ScrubApplier   scrub results applied through the journal, sources deleted once durable (ScrubApplier.swift)
// and the volume itself: the map kept in step with the journal, seals, reads, recovery (Volume+*.swift).
//
// The order of a write, visible here and in the files named:
//   write  -> Journal.submit: pwritev of the batch (leader) -> journalCommitted: the map points at it -> reply
//   flush  -> GroupCommit: fdatasync of the open journal and of rolled journals not yet synced -> reply
//   roll   -> Journal.roll: next SCO created durably, seal marker on the old -> journalRolled: map checkpoint,
//             seal (Volume+Durability: fdatasync, verifying scan, TLog written durably) -> Uploader.queue
//   upload -> SCO (parallel) -> snapshot table if it changed -> TLog N after TLog N-1 -> epochStored: evictable
//   open   -> Recovery (Volume+Open.swift): walk, trust or rebuild the map, replay, seal, next epoch, queue uploads
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
    let env: Environment
    let logger: Logger
    let clusterBytes: Int
    let rangeLock = ClusterRangeLock()

    let journal: Journal
    let flusher: GroupCommit
    let uploader: Uploader
    let catalog: SnapshotCatalog
    let scrubs: ScrubApplier
    /// Background tasks (seals, the loops): awaited at close.
    let background = Mutex<[Task<Void, Never>]>([])
    let backendReader: BackendSCOReader
    /// The owner lease this router serves the volume under, when routers share the backend (see Volume+Ownership).
    let ownership = Mutex<OwnerLease?>(nil)
    /// Sealed journal bytes since the map was last persisted, and when that was (see `seal`).
    let mapPersist: Mutex<(bytes: UInt64, at: MonotonicInstant)>
    /// For a clone: the parent (open here, or a backend view) and the epoch of the snapshot it reads through.
    package let parent: ParentLink?
    /// Which owner generation wrote which epochs (names of backend TLogs); fixed once the volume is open.
    package let generations: GenerationChain
    /// The writer of the volume's DTL record (Volume+DTL.swift), made on first use.
    let dtlRecorderBox = Mutex<DTLRecorder?>(nil)
    /// The DTL status while a mode is set but no peer is known (no mirror runs).
    let dtlWithoutMirror = Mutex<DTLStatus?>(nil)

    init(
        config: VolumeConfig, layout: VolumeLayout, options: VolumeOptions, backend: any ObjectStore,
        cache: FlashCache, map: BlockMap, env: Environment, logger: Logger, journal state: JournalState,
        storedThrough: SCONumber, unstoredBytes: UInt64, localOnlySCOs: Set<SCONumber>, snapshots: SnapshotTable,
        snapshotsUploadedVersion: UInt64, parent: ParentLink?, generations: GenerationChain
    ) {
        self.parent = parent
        self.generations = generations
        self.config = config
        self.layout = layout
        self.options = options
        self.backend = backend
        self.cache = cache
        self.map = map
        self.env = env
        var logger = logger
        logger[metadataKey: "volume"] = "\(config.name)"
        self.logger = logger
        self.clusterBytes = Int(config.clusterSizeBytes)
        backendReader = BackendSCOReader(
            volumeID: config.id, volumeName: config.name, layout: layout, backend: backend, cache: cache,
            cacheVolume: config.id, readAheadBytes: options.readAheadBytes)
        mapPersist = Mutex((0, env.clock.now()))
        journal = Journal(
            config: config, layout: layout, options: options, env: env, logger: logger, state: state,
            unstoredBytes: unstoredBytes)
        flusher = GroupCommit(journal: journal)
        let wake = Mutex<(@Sendable () -> Void)?>(nil)
        catalog = SnapshotCatalog(
            table: snapshots, uploadedVersion: snapshotsUploadedVersion, layout: layout, fs: env.fs,
            volumeName: config.name, logger: logger, changed: { wake.withLock { $0 }?() })
        uploader = Uploader(
            storedThrough: storedThrough, localOnly: localOnlySCOs.union([state.sco]), backend: backend, layout: layout,
            generations: generations, options: options, env: env, logger: logger, catalog: catalog, journal: journal)
        scrubs = ScrubApplier(
            config: config, layout: layout, backend: backend, map: map, journal: journal, uploader: uploader,
            options: options, env: env, logger: logger)
        let uploader = self.uploader
        wake.withLock { $0 = { uploader.wake() } }
        journal.attach(self)
        uploader.attach(self)
        scrubs.attach(self)
    }

    package var name: VolumeName { config.name }

    package var info: BlockDeviceInfo {
        BlockDeviceInfo(
            sizeBytes: config.sizeBytes, minimumBlockSizeBytes: 1, preferredBlockSizeBytes: config.clusterSizeBytes,
            maximumPayloadBytes: Limits.requestBytesMax, isReadOnly: false, supportsTrim: true,
            supportsWriteZeroes: true,
            flushCoversAllConnections: true)
    }

    func cacheKey(_ sco: SCONumber) -> FlashCache.Key { FlashCache.Key(volume: config.id, sco: sco) }

    private func checkWritable() throws(VDError) {
        if let failure = journal.failure { throw failure }
    }

    /// Runs `body` as a tracked background task (awaited on close).
    func startBackground(_ body: @escaping @Sendable (Volume) async -> Void) {
        let task = env.tasks.spawn { [self] in await body(self) }
        background.withLock { tasks in
            tasks.removeAll { $0.isCancelled }
            tasks.append(task)
        }
    }

    /// Addresses in `[start, end)` this volume's view may hold data for, at any epoch: every cluster it ever wrote
    /// (a superset), and for a clone its parent's. What a clone's unmap must hide of its parent.
    package func addressesPossiblyWithData(
        from start: ClusterAddress, to end: ClusterAddress
    ) throws(VDError) -> [ClusterAddress] {
        var addresses = try map.writtenAddresses(from: start, to: end).map(\.0)
        if let parent { addresses += try parent.addressesPossiblyWithData(from: start, to: end) }
        return addresses
    }

    /// Map changes built the way every replay builds them, with the volume's retained epochs.
    func mapChanges() -> MapChanges {
        var changes = MapChanges(map: map, retainedEpochs: catalog.table.retainedEpochs, isClone: config.parent != nil)
        if let parent {
            changes.parentAddresses = { (start, end) throws(VDError) in
                try parent.addressesPossiblyWithData(from: start, to: end)
            }
        }
        changes.scrubResults = scrubs.results
        changes.chunkClusters = options.mapChangeChunkClusters
        let tasks = env.tasks
        changes.failpoint = { tasks.failpoint($0) }
        return changes
    }

    // MARK: read

    package func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
        try await readSparse(offset: offset, length: length).data
    }

    package func readSparse(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData {
        let start = env.clock.now()
        do {
            try checkOwnership()
            let data = try await readSparseUncounted(offset: offset, length: length)
            try checkOwnership()
            metrics.read.record(since: start, now: env.clock.now(), bytes: Int(length))
            return data
        } catch {
            metrics.read.record(since: start, now: env.clock.now(), failed: true)
            throw error
        }
    }

    /// A read of the live volume, not counted in the metrics (the volume's own reads).
    func readSparseUncounted(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData {
        try checkRange(offset: offset, length: UInt64(length))
        guard length > 0 else { return SparseData(data: ByteBuffer()) }
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let count = Int((offset + UInt64(length) - 1) / cs - first + 1)
        do {
            return try await assemble(
                values: try map.current(from: first, count: count), first: first, offset: offset, length: length)
        } catch  where error.code == .notFound {
            // An SCO a scrub relocated away from was deleted after this read looked the map up: look again.
            return try await assemble(
                values: try map.current(from: first, count: count), first: first, offset: offset, length: length)
        }
    }

    /// Reads the volume as it was at the end of `epoch` (a snapshot, or a clone's view of its parent).
    package func read(offset: UInt64, length: UInt32, atEpoch epoch: UInt64) async throws(VDError) -> ByteBuffer {
        try await readSparse(offset: offset, length: length, atEpoch: epoch).data
    }

    package func readSparse(offset: UInt64, length: UInt32, atEpoch epoch: UInt64) async throws(VDError) -> SparseData {
        try checkOwnership()
        let data = try await readSparseUncounted(offset: offset, length: length, atEpoch: epoch)
        try checkOwnership()
        return data
    }

    func readSparseUncounted(offset: UInt64, length: UInt32, atEpoch epoch: UInt64) async throws(VDError) -> SparseData
    {
        try checkRange(offset: offset, length: UInt64(length))
        guard length > 0 else { return SparseData(data: ByteBuffer()) }
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let count = Int((offset + UInt64(length) - 1) / cs - first + 1)
        func lookUp() throws(VDError) -> [MapValue?] { try values(first: first, count: count, atEpoch: epoch, in: map) }
        do {
            return try await assemble(values: try lookUp(), first: first, offset: offset, length: length)
        } catch  where error.code == .notFound {
            // An SCO a scrub relocated away from was deleted after this read looked the map up: look again.
            return try await assemble(values: try lookUp(), first: first, offset: offset, length: length)
        }
    }

    /// Attempts at reading clusters from the backend before a checksum mismatch is reported (the bytes may have
    /// been damaged on the way).
    static let backendReadAttemptsMax = 3

    /// Reads consecutive clusters of one SCO and verifies each against its CRC: from local flash when the SCO is
    /// there, else from the backend. A local copy that fails verification is replaced by the backend's unless the
    /// SCO exists only locally.
    func readClusters(
        sco: SCONumber, offset: UInt32, crcs: [UInt32], firstAddress: ClusterAddress
    )
        async throws(VDError) -> ByteBuffer
    {
        let length = crcs.count * clusterBytes
        if let local = try await cache.read(cacheKey(sco), offset: UInt64(offset), length: length) {
            guard let bad = firstMismatch(local, crcs) else { return local }
            let message =
                "volume \(config.name) cluster \(firstAddress + UInt64(bad)): checksum mismatch in the local copy of SCO \(sco.hex) at offset \(UInt64(offset) + UInt64(bad * clusterBytes))"
            guard !isLocalOnly(sco) else { throw .corrupt(message) }
            logger.error("\(message); reading it from the backend instead")
        }
        return try await fetchVerified(
            sco: sco, offset: offset, crcs: crcs, firstAddress: firstAddress, from: backendReader, logger: logger)
    }

    // MARK: write

    package func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {
        let start = env.clock.now()
        do {
            try checkOwnership()
            try await writeUncounted(offset: offset, data: data, fua: fua)
            // Never acknowledge a write once the lease ran out (a new owner may exist by now).
            try checkOwnership()
        } catch {
            metrics.write.record(since: start, now: env.clock.now(), failed: true)
            throw error
        }
        metrics.write.record(since: start, now: env.clock.now(), bytes: data.readableBytes)
    }

    private func writeUncounted(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {
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
            var merged = ByteBuffer.zeroes(Int((last - first + 1) * cs))
            if offset % cs != 0 {
                merged.setBuffer(
                    try await readSparseUncounted(offset: first * cs, length: UInt32(cs)).data, at: 0)
            }
            if (offset + length) % cs != 0 && (last != first || offset % cs == 0) {
                merged.setBuffer(
                    try await readSparseUncounted(offset: last * cs, length: UInt32(cs)).data,
                    at: Int((last - first) * cs))
            }
            merged.setBuffer(data, at: Int(offset - first * cs))
            buffer = merged
        }
        let ticket = try await journal.submit(.write(clusterWrite(first: first, buffer: buffer)))
        if let mirror = journal.mirror {
            await mirror.waitForWrites(ticket)
            // A degraded mirror that could not record it releases its writes once the lease ran out: they fail, and
            // go on failing after a renewal until the record is written.
            try checkOwnership()
            try mirror.checkRecorded()
        }
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
        try checkOwnership()
        try await unmap(offset: offset, length: UInt64(length), zeroPartialClusters: false, fua: fua)
        try checkOwnership()
    }

    package func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {
        // Unmapped clusters read as zeroes and take no space, so zeroes are always stored as unmapped whole
        // clusters; partial clusters at the ends are written with zeroes.
        try checkOwnership()
        try await unmap(offset: offset, length: UInt64(length), zeroPartialClusters: true, fua: fua)
        try checkOwnership()
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
                try await write(offset: offset, data: ByteBuffer.zeroes(Int(length)), fua: false)
            } else {
                if offset < firstFull * cs {
                    try await write(
                        offset: offset, data: ByteBuffer.zeroes(Int(firstFull * cs - offset)), fua: false)
                }
                if end > endFull * cs {
                    try await write(
                        offset: endFull * cs, data: ByteBuffer.zeroes(Int(end - endFull * cs)), fua: false)
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
            let ticket = try await journal.submit(
                .write(ClusterWrite(entries: entries, payloadIndex: [], buffer: ByteBuffer())))
            if let mirror = journal.mirror {
                await mirror.waitForWrites(ticket)
                try checkOwnership()
                try mirror.checkRecorded()
            }
        }
        if fua { try await flush() }
    }

    /// NBD_CMD_CACHE: reads the range and drops the bytes, which brings clusters held only on the backend into the
    /// flash cache (reads of local clusters cost little). Bounded by the request limit.
    package func prefetch(offset: UInt64, length: UInt32) async throws(VDError) {
        try checkRange(offset: offset, length: UInt64(length))
        var position = offset
        let end = offset + UInt64(length)
        while position < end {
            let step = UInt32(min(UInt64(4 << 20), end - position))
            _ = try await read(offset: position, length: step)
            position += UInt64(step)
        }
    }

    // MARK: allocation

    package func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] {
        try checkOwnership()
        try checkRange(offset: offset, length: UInt64(length))
        return try await allocation(offset: offset, length: UInt64(length), atEpoch: nil)
    }

    /// Allocation from the map (see `mapAllocation`), at the end of `epoch` (nil: now).
    package func allocation(
        offset: UInt64, length: UInt64, atEpoch epoch: UInt64?
    ) async throws(VDError) -> [BlockExtent] {
        try await mapAllocation(offset: offset, length: length, atEpoch: epoch, in: map)
    }
}

extension Volume: MapBackedReads {}
