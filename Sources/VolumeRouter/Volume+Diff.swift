// What changed between two versions of a volume (incremental backup), found without reading any data and without
// scanning the volume: the TLogs of the epochs in between name every cluster written or unmapped there, so the
// candidates cost time in proportion to what changed; each candidate is then decided by comparing the map's value at
// both versions (a cluster written back to the version it had, by a rollback, is not a change).
//
// Sources of an epoch's changes, newest first: the open journal (its batch headers, no payload read), a rolled
// journal still sealing (same), the local TLog, the backend's TLog. A rollback in the range reverts clusters changed
// after its target, which may lie before the range: the range is widened to the target. The candidates are a sparse
// bitmap (memory bounded by the volume's size, not by the number of changes); a full diff walks the map one window
// at a time.

import BlockMap
import FlashIO
import NIOCore
import ObjectStore
import Scrubber
import TransactionLog
package import VolumeCore

/// A set of clusters as a sparse bitmap: chunks of 64 Ki clusters (8 KiB each), allocated when first touched. Its
/// memory is bounded by the volume's size (1 bit per cluster: 32 MiB per TiB of 4 KiB clusters), however many changes
/// the TLogs record, and it is usually far less (only chunks something changed in).
package struct ClusterBitmap: Sendable {
    static let chunkClusters: UInt64 = 1 << 16
    static let wordsPerChunk = Int(chunkClusters / 64)
    private var chunks: [UInt64: [UInt64]] = [:]

    package init() {}

    package mutating func insert(_ range: Range<UInt64>) {
        var address = range.lowerBound
        while address < range.upperBound {
            let chunk = address / Self.chunkClusters
            let chunkEnd = min(range.upperBound, (chunk + 1) * Self.chunkClusters)
            var words = chunks[chunk] ?? [UInt64](repeating: 0, count: Self.wordsPerChunk)
            var bit = address - chunk * Self.chunkClusters
            let end = chunkEnd - chunk * Self.chunkClusters
            while bit < end {
                let word = Int(bit / 64)
                let first = bit % 64
                let count = min(64 - first, end - bit)
                let mask = count == 64 ? UInt64.max : ((UInt64(1) << count) - 1) << first
                words[word] |= mask
                bit += count
            }
            chunks[chunk] = words
            address = chunkEnd
        }
    }

    package func contains(_ address: UInt64) -> Bool {
        guard let words = chunks[address / Self.chunkClusters] else { return false }
        let bit = address % Self.chunkClusters
        return words[Int(bit / 64)] & (UInt64(1) << (bit % 64)) != 0
    }

    /// The chunks holding members, in address order.
    package var chunkIndices: [UInt64] { chunks.keys.sorted() }

    /// The members of one chunk as ascending ranges.
    package func ranges(inChunk chunk: UInt64) -> [Range<UInt64>] {
        guard let words = chunks[chunk] else { return [] }
        var ranges: [Range<UInt64>] = []
        let base = chunk * Self.chunkClusters
        var start: UInt64?
        for (index, word) in words.enumerated() {
            if word == 0 && start == nil { continue }
            if word == .max && start != nil { continue }
            for bit in 0..<UInt64(64) {
                let address = base + UInt64(index) * 64 + bit
                if word & (UInt64(1) << bit) != 0 {
                    if start == nil { start = address }
                } else if let open = start {
                    ranges.append(open..<address)
                    start = nil
                }
            }
        }
        if let open = start { ranges.append(open..<(base + Self.chunkClusters)) }
        return ranges
    }

    package var clusterCount: Int { chunks.values.reduce(0) { $0 + $1.reduce(0) { $0 + $1.nonzeroBitCount } } }
}

/// One extent of a diff: bytes `[offset, offset + length)` differ; `zero`: they read as zeroes in the newer version.
package struct DiffExtent: Codable, Sendable, Hashable {
    package var offset: UInt64
    package var length: UInt64
    package var zero: Bool

    package init(offset: UInt64, length: UInt64, zero: Bool) {
        self.offset = offset
        self.length = length
        self.zero = zero
    }
}

/// The older side of a diff.
package enum DiffBase: Sendable, Hashable {
    /// Nothing: every cluster that holds data (a full backup).
    case nothing
    /// The end of this epoch of the volume (one of its snapshots).
    case epoch(UInt64)
    /// A clone's parent snapshot (what the clone was created from).
    case cloneBase
}

extension Volume {
    /// The content of `address` given its map value here (nil: never written, read through a clone's parent).
    func content(_ address: ClusterAddress, value: MapValue?) throws(VDError) -> ClusterContent {
        if let value { return ClusterContent(volume: config.id, location: value.location) }
        guard let parent else { return ClusterContent(volume: config.id, location: nil) }
        return try parent.content(address)
    }

    /// The content of `address` at the end of `epoch` (nil: now).
    package func content(_ address: ClusterAddress, atEpoch epoch: UInt64?) throws(VDError) -> ClusterContent {
        let value = if let epoch { try map.value(address, atEpoch: epoch) } else { try map.current(address) }
        return try content(address, value: value)
    }

    /// The extents whose content differs between `base` and the end of epoch `to` (nil: the live volume), sorted
    /// and merged. Time and memory in proportion to the clusters changed (for `.nothing`: to the clusters written).
    package func diff(from base: DiffBase, to: UInt64?) async throws(VDError) -> [DiffExtent] {
        let cs = UInt64(clusterBytes)
        let clusters = (config.sizeBytes + cs - 1) / cs
        var extents: [DiffExtent] = []
        /// Decides the candidates of one window and appends the extents that differ. Only clusters with a key in
        /// this volume's map can differ: a change after a snapshot always leaves one (a value or a tombstone, a
        /// clone's hiding its parent's data too), and a cluster without one reads the same in both versions. So a
        /// huge unmap costs a scan of the keys it covers, not a lookup per cluster.
        func decide(_ ranges: [Range<UInt64>], keyed: Bool) async throws(VDError) {
            for range in ranges where range.lowerBound < clusters {
                var start = range.lowerBound
                let end = min(range.upperBound, clusters)
                while start < end {
                    let addresses: [ClusterAddress]
                    if keyed {
                        addresses = try map.writtenAddresses(from: start, to: end, limit: 4096).map(\.0)
                        start = addresses.count == 4096 ? addresses.last! + 1 : end
                    } else {
                        addresses = Array(start..<end)
                        start = end
                    }
                    try decide(addresses)
                    await Task.yield()
                }
            }
        }
        func decide(_ addresses: [ClusterAddress]) throws(VDError) {
            for address in addresses {
                let newer = try content(address, atEpoch: to)
                let older: ClusterContent
                switch base {
                case .nothing: older = ClusterContent(volume: config.id, location: nil)
                case .epoch(let from): older = try content(address, atEpoch: from)
                case .cloneBase: older = try content(address, value: nil)
                }
                guard !newer.sameBytes(as: older) else { continue }
                let zero = newer.location == nil
                let offset = address * cs
                let length = min(cs, config.sizeBytes - offset)
                if let last = extents.last, last.zero == zero, last.offset + last.length == offset {
                    extents[extents.count - 1].length += length
                } else {
                    extents.append(DiffExtent(offset: offset, length: length, zero: zero))
                }
            }
        }
        switch base {
        case .nothing:
            // Every cluster that may hold data, one window of the map at a time (memory stays bounded).
            var start: ClusterAddress = 0
            while start < clusters {
                let end = min(start + ClusterBitmap.chunkClusters, clusters)
                var window = ClusterBitmap()
                for address in try addressesPossiblyWithData(from: start, to: end) {
                    window.insert(address..<(address + 1))
                }
                for chunk in window.chunkIndices { try await decide(window.ranges(inChunk: chunk), keyed: false) }
                start = end
                await Task.yield()
            }
            return extents
        case .epoch(let from):
            if let to, to < from {
                throw .invalidArgument("volume \(config.name): a diff runs from an older version to a newer one")
            }
        case .cloneBase:
            guard parent != nil else {
                throw .invalidArgument("volume \(config.name) is not a clone: it has no parent snapshot to diff from")
            }
        }
        let since: UInt64 = if case .epoch(let from) = base { from } else { 0 }
        let candidates = try await changedClusters(after: since, through: to, clusters: clusters)
        for chunk in candidates.chunkIndices {
            try await decide(candidates.ranges(inChunk: chunk), keyed: true)
        }
        return extents
    }

    /// Clusters written, unmapped or rolled back in epochs `(after, through]` (`through` nil: up to the open
    /// journal now): a superset of those whose content differs.
    func changedClusters(
        after from: UInt64, through to: UInt64?, clusters: UInt64
    ) async throws(VDError) -> ClusterBitmap {
        let open = journal.openJournal
        let last = min(to ?? open.epoch, open.epoch)
        var changed = ClusterBitmap()
        var lowest = from
        var epoch = last
        // Newest first, so a rollback found in the range can widen it downwards.
        while epoch > lowest {
            for record in try await records(ofEpoch: epoch, open: open) {
                switch record {
                case .write(let address, _):
                    if address < clusters { changed.insert(address..<(address + 1)) }
                case .unmap(let address, let count):
                    changed.insert(min(address, clusters)..<min(address + UInt64(count), clusters))
                case .rollback(let target): lowest = min(lowest, target)
                case .scoSealed, .snapshot, .scrubApplied: break
                }
            }
            epoch -= 1
        }
        return changed
    }

    /// The change records of one epoch, from wherever they are now (see the file comment).
    private func records(
        ofEpoch epoch: UInt64, open: (epoch: UInt64, sco: SCONumber, file: FlashFile)
    ) async throws(VDError) -> [TLogRecord] {
        let config = self.config
        let journalFile: (sco: SCONumber, file: FlashFile)? =
            epoch == open.epoch ? (open.sco, open.file) : journal.unsealedJournal(epoch)
        if let (sco, file) = journalFile {
            do throws(VDError) {
                return try await blocking { () throws(VDError) -> [TLogRecord] in
                    try JournalScanner.scan(
                        file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes,
                        verifyPayloads: false
                    ).tlogRecords()
                }
            } catch {
                // Sealed and evicted meanwhile: its TLog exists now.
                logger.debug("epoch \(epoch): journal unreadable (\(error.message)); reading its TLog")
            }
        }
        let number = SCONumber(epoch)
        let directory = layout.tlogDirectory
        let fs = env.fs
        if let local = try await blocking({ () throws(VDError) -> TLog? in
            try TLogFiles.read(number, directory: directory, fs: fs)
        }) {
            try local.checkBelongs(to: config, epoch: number, what: directory + "/" + TLogFiles.fileName(number))
            return local.records
        }
        let object = generations.tlogObject(epoch, layout: layout)
        let remote = try await NamespaceObjects.getVerified(object, backend: backend) { (bytes) throws(VDError) in
            try TLog.decode(bytes, what: object)
        }
        try remote.checkBelongs(to: config, epoch: number, what: object)
        return remote.records
    }
}

// MARK: dirty bitmaps over NBD (`qemu:dirty-bitmap:SNAPSHOT`)

extension Volume {
    /// Clusters one BLOCK_STATUS reply covers at most (the reply may stop early; clients ask again from there).
    static let dirtyStatusClustersMax: UInt64 = 1 << 12

    /// Every snapshot is a dirty bitmap of the live volume: what changed since it.
    package var dirtyBitmaps: [String] { snapshotTable.snapshots.map(\.name) }

    package func dirtyExtents(bitmap: String, offset: UInt64, length: UInt32) async throws(VDError) -> [DirtyExtent] {
        try checkOwnership()
        return try await dirtyExtents(since: bitmap, to: nil, offset: offset, length: length)
    }

    /// Whether each cluster of `[offset, offset+length)` differs between snapshot `bitmap` and the end of `to` (nil:
    /// now). Time in proportion to the range (one scan of the current values; older values only where a cluster was
    /// written after the snapshot).
    func dirtyExtents(
        since bitmap: String, to: UInt64?, offset: UInt64, length: UInt32
    ) async throws(VDError) -> [DirtyExtent] {
        try checkRange(offset: offset, length: UInt64(length))
        guard let from = snapshotTable.snapshot(named: bitmap), from.epoch <= (to ?? .max) else {
            throw VDError(.notFound, "volume \(config.name) has no dirty bitmap (snapshot) \(bitmap) for this version")
        }
        guard length > 0 else { return [] }
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let last = min((offset + UInt64(length) - 1) / cs, first + Self.dirtyStatusClustersMax - 1)
        let current = try map.current(from: first, count: Int(last - first + 1))
        var extents: [DirtyExtent] = []
        for (index, value) in current.enumerated() {
            let address = first + UInt64(index)
            let dirty: Bool
            if value.map({ $0.epoch <= from.epoch }) ?? true {
                dirty = false  // unchanged since the snapshot: no newer version exists (history is strictly older)
            } else {
                dirty = !(try content(address, atEpoch: to)).sameBytes(as: try content(address, atEpoch: from.epoch))
            }
            let start = max(address * cs, offset)
            let end = min((address + 1) * cs, offset + UInt64(length))
            if let lastExtent = extents.last, lastExtent.dirty == dirty {
                extents[extents.count - 1].lengthBytes += end - start
            } else {
                extents.append(DirtyExtent(lengthBytes: end - start, dirty: dirty))
            }
        }
        guard snapshotTable.snapshots.contains(where: { $0.id == from.id }) else {
            throw VDError(.notFound, "snapshot \(bitmap) of \(config.name) was deleted")
        }
        return extents
    }
}
