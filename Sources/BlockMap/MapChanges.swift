// Builds map changes from journal entries or TLog records. Live writes, journal replay and TLog replay all go
// through here, so they build the same map.
//
// Versions: when a cluster changes at epoch e and its previous value (epoch p) is still what some retained epoch s
// sees (p <= s < e: a snapshot, or a rollback target), the previous value moves to the history keys first. Unmapping
// leaves a tombstone (a value with no location) when the volume is a clone (where "never written" means "read the
// parent") or keeps snapshots (so a snapshot after the unmap does not see older history); otherwise the key goes, and
// any history of the cluster (dead: kept for snapshots deleted since) goes with it in the same batch. History is only
// ever read through a current key, so a cluster without one must have none: a later write would bring it back.
//
// Unmaps, rollbacks and scrub applications need the map's current state, so pending changes are applied first. Such
// an intermediate apply may reach durable storage (RocksDB flushes when it likes) before the journal batch it comes
// from does: it therefore carries a dirty checkpoint naming the end of that batch, and recovery trusts the map only
// if that batch is in the durable journal (replaying it again from the previous checkpoint is idempotent).

package import VolumeCore

package struct MapChanges {
    package let map: BlockMap
    /// Sorted epochs whose state must stay readable.
    package let retainedEpochs: [UInt64]
    package let keepTombstones: Bool
    /// A clone: clusters it never wrote read its parent, so an unmap must tombstone every cluster of the range.
    package let isClone: Bool
    /// Scrub results by id, for `scrubApplied` entries.
    package var scrubResults: [UInt64: ScrubResult] = [:]
    /// Written with every intermediate apply: the last clean checkpoint, marked dirty up to the end of the batch or
    /// epoch being applied (see the file comment). Nil only where no crash can matter (a throwaway replay map).
    package var dirtyCheckpoint: MapCheckpoint?
    /// Clusters handled per intermediate apply of a large unmap, rollback or scrub (bounds memory).
    package var chunkClusters = 65536
    /// Called after each intermediate apply (a crash point for the simulation).
    package var failpoint: (String) -> Void = { _ in }
    /// For a clone: the addresses in `[start, end)` where the parent's view may hold data (a superset is fine). An
    /// unmap tombstones only those and the clone's own written clusters, so trimming a large range costs what was
    /// written there, not the range's size. Nil: only the clone's own clusters (a replay that never reads through
    /// the parent, such as the scrubber's).
    package var parentAddresses: ((ClusterAddress, ClusterAddress) throws(VDError) -> [ClusterAddress])?
    package var update = MapUpdate()
    private var pending: Set<ClusterAddress> = []

    package init(map: BlockMap, retainedEpochs: [UInt64] = [], isClone: Bool = false) {
        self.map = map
        self.retainedEpochs = retainedEpochs
        self.isClone = isClone
        self.keepTombstones = isClone || !retainedEpochs.isEmpty
    }

    /// Whether a value written at epoch `previous` is still what a retained epoch sees once epoch `next` changes it.
    package func mustRetain(previous: UInt64, next: UInt64) -> Bool {
        guard previous < next, !retainedEpochs.isEmpty else { return false }
        // First retained epoch >= previous.
        var low = 0
        var high = retainedEpochs.count
        while low < high {
            let mid = (low + high) / 2
            if retainedEpochs[mid] < previous { low = mid + 1 } else { high = mid }
        }
        return low < retainedEpochs.count && retainedEpochs[low] < next
    }

    /// Applies the entries of one journal batch of epoch `epoch`, whose payloads are in SCO `sco`.
    package mutating func add(
        entries: [BatchEntry], sco: SCONumber, epoch: UInt64, payloadOffset: UInt64, clusterBytes: Int
    ) throws(VDError) {
        var payload = payloadOffset
        for entry in entries {
            switch entry {
            case .data(let address, let crc):
                try write(address, epoch: epoch, location: ClusterLocation(sco: sco, offset: UInt32(payload), crc: crc))
                payload += UInt64(clusterBytes)
            case .unmap(let address, let count):
                try unmap(address, count: UInt64(count), epoch: epoch)
            case .rollback(let target):
                try rollback(toEpoch: target)
            case .scrubApplied(let id):
                try applyScrub(id, epoch: epoch)
            case .snapshot:
                break
            }
        }
    }

    package mutating func add(tlog: TLog) throws(VDError) {
        for record in tlog.records {
            switch record {
            case .write(let address, let location):
                try write(address, epoch: tlog.number.rawValue, location: location)
            case .unmap(let address, let count):
                try unmap(address, count: UInt64(count), epoch: tlog.number.rawValue)
            case .rollback(let epoch):
                try rollback(toEpoch: epoch)
            case .scrubApplied(let id):
                try applyScrub(id, epoch: tlog.number.rawValue)
            case .scoSealed(let sco, let length, _):
                update.metadata.append((MapChanges.epochBytesKey(sco), [UInt8](littleEndian64: length)))
            case .snapshot:
                break
            }
        }
    }

    package mutating func write(_ address: ClusterAddress, epoch: UInt64, location: ClusterLocation) throws(VDError) {
        if !retainedEpochs.isEmpty, !pending.contains(address), let previous = try map.current(address),
            mustRetain(previous: previous.epoch, next: epoch)
        {
            update.history.append((address, previous))
        }
        if !retainedEpochs.isEmpty { pending.insert(address) }
        update.current.append((address, MapValue(epoch: epoch, location: location)))
    }

    private mutating func flush() throws(VDError) {
        guard !update.isEmpty else { return }
        let intermediate = !update.metadata.contains(where: { $0.0 == MapCheckpoint.key })
        if let dirtyCheckpoint, intermediate {
            update.metadata.append((MapCheckpoint.key, dirtyCheckpoint.encode()))
        }
        try map.apply(update)
        if intermediate { failpoint("map-intermediate-apply") }
        update = MapUpdate()
        pending.removeAll(keepingCapacity: true)
    }

    /// Unmaps the written clusters of the run: they read as zeroes again.
    package mutating func unmap(_ address: ClusterAddress, count: UInt64, epoch: UInt64) throws(VDError) {
        try flush()
        var start = address
        let end = address + count
        if isClone {
            // Every cluster of the range that the clone wrote, or that its parent's view may hold data for, gets a
            // tombstone (or keeps the one it has): nothing of the parent shows through an unmapped range.
            while start < end {
                let chunkEnd = min(end, start + UInt64(chunkClusters))
                var written: [ClusterAddress: MapValue] = [:]
                for (a, value) in try map.writtenAddresses(from: start, to: chunkEnd) { written[a] = value }
                var addresses = Set(written.keys)
                if let parentAddresses { addresses.formUnion(try parentAddresses(start, chunkEnd)) }
                for a in addresses.sorted() {
                    if let previous = written[a] {
                        let retain = mustRetain(previous: previous.epoch, next: epoch)
                        if previous.location == nil && !retain { continue }
                        if retain { update.history.append((a, previous)) }
                    }
                    update.current.append((a, MapValue(epoch: epoch, location: nil)))
                }
                try flush()
                start = chunkEnd
            }
            return
        }
        while start < end {
            var found: [(ClusterAddress, MapValue)] = []
            if count <= 256 {
                for (index, value) in try map.current(from: address, count: Int(count)).enumerated() {
                    if let value { found.append((address + UInt64(index), value)) }
                }
                start = end
            } else {
                found = try map.writtenAddresses(from: start, to: end, limit: chunkClusters)
                start = found.count == chunkClusters ? found.last!.0 + 1 : end
            }
            var removed: Set<ClusterAddress> = []
            for (written, previous) in found {
                if previous.location == nil && !mustRetain(previous: previous.epoch, next: epoch) { continue }
                if mustRetain(previous: previous.epoch, next: epoch) { update.history.append((written, previous)) }
                update.current.append((written, keepTombstones ? MapValue(epoch: epoch, location: nil) : nil))
                if !keepTombstones { removed.insert(written) }
            }
            // A key that goes takes the cluster's history with it, in the same batch: versions a deleted snapshot
            // read may still be there, and a later write recreating the key would let a later snapshot see them.
            if let first = found.first?.0, let last = found.last?.0, !removed.isEmpty {
                for (address, old) in try map.historyVersions(from: first, to: last + 1)
                where removed.contains(address) {
                    update.dropHistory.append((address, old))
                }
            }
            if start < end { try flush() }
        }
    }

    /// Every cluster changed after `toEpoch` returns to its value at `toEpoch`; versions after it are dropped.
    package mutating func rollback(toEpoch target: UInt64) throws(VDError) {
        try flush()
        var start: ClusterAddress = 0
        while true {
            let found = try map.writtenAddresses(from: start, to: .max, limit: chunkClusters)
            for (address, value) in found where value.epoch > target {
                let restored = try map.value(address, atEpoch: target)
                update.current.append((address, restored))
                // The restored version is current again: its history copy goes (history stays strictly older
                // than the current version; see `BlockMap.forEachLiveVersion`).
                if let restored { update.dropHistory.append((address, restored.epoch)) }
            }
            try flush()
            guard found.count == chunkClusters, let last = found.last else { break }
            start = last.0 + 1
        }
        var drop: [(ClusterAddress, UInt64)] = []
        try map.forEachHistory { (address, value) throws(VDError) in
            if value.epoch > target { drop.append((address, value.epoch)) }
        }
        for chunk in stride(from: 0, to: drop.count, by: chunkClusters) {
            update.dropHistory = Array(drop[chunk..<min(chunk + chunkClusters, drop.count)])
            try flush()
        }
    }

    /// Points every cluster version a scrub copied at its new place, where the map still holds the exact old place
    /// (a version changed since, by a write or a rollback, is left alone: it won).
    package mutating func applyScrub(_ id: UInt64, epoch: UInt64) throws(VDError) {
        guard let result = scrubResults[id] else {
            throw VDError(.corrupt, "the history applies scrub result \(id), which is not in the namespace")
        }
        try flush()
        for (index, relocation) in result.relocations.enumerated() {
            if let current = try map.current(relocation.address), current.epoch == relocation.epoch,
                current.location == relocation.from
            {
                update.current.append((relocation.address, MapValue(epoch: relocation.epoch, location: relocation.to)))
            } else if let old = try map.history(relocation.address, epoch: relocation.epoch),
                old.location == relocation.from
            {
                update.history.append((relocation.address, MapValue(epoch: relocation.epoch, location: relocation.to)))
            }
            if index % chunkClusters == chunkClusters - 1 { try flush() }
        }
        update.metadata.append((Self.scrubAppliedKey(id), [UInt8](littleEndian64: epoch)))
        for created in result.created {
            update.metadata.append(
                (Self.scrubSCOBytesKey(SCONumber(created.sco)), [UInt8](littleEndian64: created.lengthBytes)))
        }
        try flush()
    }

    /// Metadata: the epoch whose journal applied scrub result `id`.
    package static func scrubAppliedKey(_ id: UInt64) -> String { "scrub-applied-" + SCONumber(id).hex }
    /// Metadata: the length of an SCO written by a scrub (counted as written space once applied).
    package static func scrubSCOBytesKey(_ sco: SCONumber) -> String { "scrub-sco-bytes-" + sco.hex }

    /// Metadata key recording the length of epoch `sco`'s SCO.
    package static func epochBytesKey(_ sco: SCONumber) -> String { "epoch-bytes-" + sco.hex }

    package mutating func finish(checkpoint: MapCheckpoint) throws(VDError) {
        update.metadata.append((MapCheckpoint.key, checkpoint.encode()))
        try flush()
    }
}

/// Where the map's knowledge of the history ends: replay resumes in epoch `epoch` at byte `offset` of its journal,
/// expecting `chainCRC` (offset 0: the start of the epoch). A dirty checkpoint (`dirtyEnd` set) also says that some
/// effects of the batch ending at `dirtyEnd` of that epoch (`.max`: the whole epoch) may already be in the map.
package struct MapCheckpoint: Equatable, Sendable {
    package static let key = "checkpoint"
    package var epoch: UInt64
    package var offset: UInt64
    package var chainCRC: UInt32
    package var dirtyEnd: UInt64?

    package init(epoch: UInt64, offset: UInt64, chainCRC: UInt32, dirtyEnd: UInt64? = nil) {
        self.epoch = epoch
        self.offset = offset
        self.chainCRC = chainCRC
        self.dirtyEnd = dirtyEnd
    }

    /// This checkpoint, marked dirty up to `end`.
    package func dirty(until end: UInt64) -> MapCheckpoint {
        MapCheckpoint(epoch: epoch, offset: offset, chainCRC: chainCRC, dirtyEnd: end)
    }

    package func encode() -> [UInt8] {
        var bytes = [UInt8](littleEndian64: epoch)
        bytes += [UInt8](littleEndian64: offset)
        bytes += [UInt8](littleEndian64: UInt64(chainCRC))
        bytes += [UInt8](littleEndian64: dirtyEnd.map { $0 == 0 ? 1 : $0 } ?? 0)
        return bytes
    }

    package static func decode(_ bytes: [UInt8]) -> MapCheckpoint? {
        guard bytes.count == 24 || bytes.count == 32, let epoch = Array(bytes[0..<8]).littleEndianUInt64,
            let offset = Array(bytes[8..<16]).littleEndianUInt64, let crc = Array(bytes[16..<24]).littleEndianUInt64
        else { return nil }
        let dirty = bytes.count == 32 ? Array(bytes[24..<32]).littleEndianUInt64 ?? 0 : 0
        return MapCheckpoint(
            epoch: epoch, offset: offset, chainCRC: UInt32(truncatingIfNeeded: crc), dirtyEnd: dirty == 0 ? nil : dirty)
    }
}
