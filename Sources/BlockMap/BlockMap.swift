// The LBA-to-location map of one volume: RocksDB keys for the current location of every written cluster, keys for
// older versions that snapshots still need, and a few metadata keys, fronted by an in-memory cache of hot entries.
//
// It is an index, not the source of truth: every update is also in the volume's journal (the open SCO) or in a TLog,
// and the map's checkpoint says how far it has applied them. Updates therefore run with RocksDB's WAL off; a crash
// loses at most the memtable, and recovery replays the journal from the checkpoint.
//
// Key layout (big-endian so keys sort by address):
//   "c" addr                  -> current value of the cluster
//   "h" addr ~epoch           -> an older value kept for snapshots (newest first per address)
//   "m" name                  -> metadata (checkpoint, counters)
// Value (24 bytes, little-endian): epoch u64 | sco u64 (0 = unmapped) | offset u32 | crc u32.

import Collections
import Synchronization
package import VolumeCore

/// The state of one cluster in one version: where its data is (nil: it reads as zeroes), and the epoch that wrote it.
package struct MapValue: Hashable, Sendable {
    package var epoch: UInt64
    package var location: ClusterLocation?

    package init(epoch: UInt64, location: ClusterLocation?) {
        self.epoch = epoch
        self.location = location
    }

    static let encodedBytes = 24

    func encode() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: MapValue.encodedBytes)
        bytes.withUnsafeMutableBytes { encode(into: $0) }
        return bytes
    }

    func encode(into raw: UnsafeMutableRawBufferPointer) {
        raw.storeBytes(of: epoch.littleEndian, toByteOffset: 0, as: UInt64.self)
        raw.storeBytes(of: (location?.sco.rawValue ?? 0).littleEndian, toByteOffset: 8, as: UInt64.self)
        raw.storeBytes(of: (location?.offset ?? 0).littleEndian, toByteOffset: 16, as: UInt32.self)
        raw.storeBytes(of: (location?.crc ?? 0).littleEndian, toByteOffset: 20, as: UInt32.self)
    }

    static func decode(_ raw: UnsafeRawBufferPointer, key: String, path: String) throws(VDError) -> MapValue {
        guard raw.count == encodedBytes else {
            throw .corrupt("map database \(path): value of \(key) is \(raw.count) bytes, expected \(encodedBytes)")
        }
        let epoch = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let sco = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let offset = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        let crc = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 20, as: UInt32.self))
        return MapValue(
            epoch: epoch, location: sco == 0 ? nil : ClusterLocation(sco: SCONumber(sco), offset: offset, crc: crc))
    }
}

/// One atomic change to the map.
package struct MapUpdate {
    /// New current values (nil removes the key: the cluster was never written, as far as any version can tell).
    package var current: [(ClusterAddress, MapValue?)] = []
    /// Versions to keep for snapshots.
    package var history: [(ClusterAddress, MapValue)] = []
    /// History versions to drop.
    package var dropHistory: [(ClusterAddress, UInt64)] = []
    package var metadata: [(String, [UInt8])] = []
    package init() {}
    package var isEmpty: Bool { current.isEmpty && history.isEmpty && dropHistory.isEmpty && metadata.isEmpty }
}

package final class BlockMap: Sendable {
    private let database: any KeyValueStore
    private let cache: Mutex<Cache>

    /// A two-generation cache: lookups hit `young` then `old` (promoting); when `young` is full it becomes `old`.
    /// Absent clusters are cached too (as `.none`), so reads of unwritten space cost no database access.
    private struct Cache {
        var young: [ClusterAddress: MapValue?] = [:]
        var old: [ClusterAddress: MapValue?] = [:]
        var generationEntriesMax: Int
        /// Bumped by every update: a lookup that read the database while an update ran does not cache its result.
        var updates: UInt64 = 0

        mutating func get(_ address: ClusterAddress) -> MapValue?? {
            if let hit = young[address] { return hit }
            if let hit = old.removeValue(forKey: address) {
                insert(address, hit)
                return hit
            }
            return nil
        }

        mutating func insert(_ address: ClusterAddress, _ value: MapValue?) {
            if young.count >= generationEntriesMax {
                old = young
                young = [:]
                young.reserveCapacity(generationEntriesMax)
            }
            young[address] = value
        }
    }

    /// `cacheEntries`: the most map entries kept in memory (about 64 bytes each).
    package init(database: any KeyValueStore, cacheEntries: Int = 1 << 20) {
        self.database = database
        cache = Mutex(Cache(generationEntriesMax: max(1024, cacheEntries / 2)))
    }

    package var path: String { database.path }

    // MARK: keys

    @inline(__always)
    static func currentKey(_ address: ClusterAddress) -> [UInt8] {
        var key = [UInt8](repeating: UInt8(ascii: "c"), count: 9)
        key.withUnsafeMutableBytes { $0.storeBytes(of: address.bigEndian, toByteOffset: 1, as: UInt64.self) }
        return key
    }

    static func historyKey(_ address: ClusterAddress, epoch: UInt64) -> [UInt8] {
        var key = [UInt8](repeating: UInt8(ascii: "h"), count: 17)
        key.withUnsafeMutableBytes {
            $0.storeBytes(of: address.bigEndian, toByteOffset: 1, as: UInt64.self)
            $0.storeBytes(of: (~epoch).bigEndian, toByteOffset: 9, as: UInt64.self)
        }
        return key
    }

    static func metadataKey(_ name: String) -> [UInt8] { [UInt8(ascii: "m")] + Array(name.utf8) }

    static func address(ofKey key: UnsafeRawBufferPointer) -> ClusterAddress {
        UInt64(bigEndian: key.loadUnaligned(fromByteOffset: 1, as: UInt64.self))
    }

    // MARK: lookups

    /// The current value of a cluster (nil: never written).
    package func current(_ address: ClusterAddress) throws(VDError) -> MapValue? {
        let (cached, ticket) = cache.withLock { cache -> (MapValue??, UInt64) in (cache.get(address), cache.updates) }
        if let cached { return cached }
        let value = try loadCurrent(address)
        cache.withLock { cache in
            if cache.updates == ticket { cache.insert(address, value) }
        }
        return value
    }

    private func loadCurrent(_ address: ClusterAddress) throws(VDError) -> MapValue? {
        guard let raw = try database.get(Self.currentKey(address)) else { return nil }
        let path = database.path
        return try VDError.catching {
            try raw.withUnsafeBytes { try MapValue.decode($0, key: "cluster \(address)", path: path) }
        }
    }

    /// Current values of `count` clusters from `start` (one database scan when many are not cached).
    package func current(from start: ClusterAddress, count: Int) throws(VDError) -> [MapValue?] {
        if count == 1 { return [try current(start)] }
        var values = [MapValue?](repeating: nil, count: count)
        var misses: [Int] = []
        let ticket = cache.withLock { cache -> UInt64 in
            for i in 0..<count {
                if let hit = cache.get(start + UInt64(i)) { values[i] = hit } else { misses.append(i) }
            }
            return cache.updates
        }
        if misses.isEmpty { return values }
        if misses.count <= 4 {
            for i in misses { values[i] = try loadCurrent(start + UInt64(i)) }
        } else {
            var found: [ClusterAddress: MapValue] = [:]
            let path = database.path
            try database.scan(from: Self.currentKey(start), to: Self.currentKey(start + UInt64(count))) {
                (key, value) throws(VDError) -> Bool in
                found[Self.address(ofKey: key)] = try MapValue.decode(value, key: "current", path: path)
                return true
            }
            for i in misses { values[i] = found[start + UInt64(i)] }
        }
        cache.withLock { cache in
            guard cache.updates == ticket else { return }
            for i in misses { cache.insert(start + UInt64(i), values[i]) }
        }
        return values
    }

    /// The value a snapshot taken at `epoch` sees for a cluster: the newest version with epoch <= `epoch`.
    ///
    /// History is reached only through a current key (a value or a tombstone): an unmap removes the key only when no
    /// retained epoch needs an older version, so whatever history that cluster still has is dead (kept for a
    /// snapshot deleted since) and must not be read.
    package func value(_ address: ClusterAddress, atEpoch epoch: UInt64) throws(VDError) -> MapValue? {
        guard let current = try current(address) else { return nil }
        if current.epoch <= epoch { return current }
        var result: MapValue?
        let path = database.path
        try database.scan(from: Self.historyKey(address, epoch: epoch), to: Self.historyKey(address, epoch: 0)) {
            (_, value) throws(VDError) -> Bool in
            result = try MapValue.decode(value, key: "history of cluster \(address)", path: path)
            return false
        }
        // Also accept the epoch-0 key itself (the scan's end bound is exclusive).
        if result == nil, let raw = try database.get(Self.historyKey(address, epoch: 0)) {
            result = try VDError.catching {
                try raw.withUnsafeBytes { try MapValue.decode($0, key: "history", path: path) }
            }
        }
        return result
    }

    /// The history version of a cluster written at exactly `epoch`, if kept.
    package func history(_ address: ClusterAddress, epoch: UInt64) throws(VDError) -> MapValue? {
        guard let raw = try database.get(Self.historyKey(address, epoch: epoch)) else { return nil }
        let path = database.path
        return try VDError.catching { try raw.withUnsafeBytes { try MapValue.decode($0, key: "history", path: path) } }
    }

    /// Addresses in `[start, end)` that have a current key (written at least once and not forgotten).
    package func writtenAddresses(
        from start: ClusterAddress, to end: ClusterAddress, limit: Int = .max
    ) throws(VDError)
        -> [(ClusterAddress, MapValue)]
    {
        var result: [(ClusterAddress, MapValue)] = []
        let path = database.path
        try database.scan(from: Self.currentKey(start), to: Self.currentKey(end)) {
            (key, value) throws(VDError) -> Bool in
            result.append((Self.address(ofKey: key), try MapValue.decode(value, key: "current", path: path)))
            return result.count < limit
        }
        return result
    }

    /// The kept older versions of the clusters in `[start, end)`, as (cluster, epoch), in key order.
    package func historyVersions(from start: ClusterAddress, to end: ClusterAddress) throws(VDError)
        -> [(ClusterAddress, UInt64)]
    {
        var result: [(ClusterAddress, UInt64)] = []
        guard start < end else { return result }
        try database.scan(from: Self.historyKey(start, epoch: .max), to: Self.historyKey(end, epoch: .max)) {
            (key, _) throws(VDError) -> Bool in
            let epoch = ~UInt64(bigEndian: key.loadUnaligned(fromByteOffset: 9, as: UInt64.self))
            result.append((Self.address(ofKey: key), epoch))
            return true
        }
        return result
    }

    /// Every history version, in key order (for garbage accounting and checks).
    package func forEachHistory(_ body: (ClusterAddress, MapValue) throws(VDError) -> Void) throws(VDError) {
        let path = database.path
        try database.scan(from: [UInt8(ascii: "h")], to: [UInt8(ascii: "i")]) { (key, value) throws(VDError) -> Bool in
            try body(Self.address(ofKey: key), try MapValue.decode(value, key: "history", path: path))
            return true
        }
    }

    /// Calls `body` for every live cluster version: the current value of each cluster, and each kept older value
    /// that a snapshot at one of `snapshotEpochs` reads (its epoch is at or below the snapshot and its successor's
    /// is after it). Nothing else can be read again. `dead` receives kept older versions no snapshot reads, with the
    /// epoch of the version that superseded them.
    ///
    /// Everything is read from one consistent view of the map (writes may go on meanwhile: a version they move into
    /// history is judged by the view, where it is still current), in chunks of `chunkClusters` written clusters, so
    /// memory stays bounded whatever the volume's size.
    package func forEachLiveVersion(
        snapshotEpochs: [UInt64], chunkClusters: Int = 65536,
        _ body: (ClusterAddress, MapValue, _ isCurrent: Bool) throws(VDError) -> Void,
        dead: (ClusterAddress, MapValue, _ successorEpoch: UInt64) throws(VDError) -> Void = {
            _, _, _ throws(VDError) in
        }
    ) throws(VDError) {
        precondition(chunkClusters > 0)
        let epochs = snapshotEpochs.sorted()
        func readBySnapshot(_ epoch: UInt64, successor: UInt64) -> Bool {
            // First snapshot >= epoch, and is it before the successor?
            var low = 0
            var high = epochs.count
            while low < high {
                let mid = (low + high) / 2
                if epochs[mid] < epoch { low = mid + 1 } else { high = mid }
            }
            return low < epochs.count && epochs[low] < successor
        }
        let view = try database.snapshot()
        defer { view.release() }
        let path = database.path
        var start: ClusterAddress = 0
        while true {
            // Current values of the next chunk of written clusters.
            var currentEpochs: [ClusterAddress: UInt64] = [:]
            currentEpochs.reserveCapacity(min(chunkClusters, 1 << 16))
            var last: ClusterAddress?
            try view.scan(from: Self.currentKey(start), to: [UInt8(ascii: "d")]) { (key, raw) throws(VDError) -> Bool in
                let address = Self.address(ofKey: key)
                let value = try MapValue.decode(raw, key: "current", path: path)
                currentEpochs[address] = value.epoch
                last = address
                if value.location != nil { try body(address, value, true) }
                return currentEpochs.count < chunkClusters
            }
            // History of the same address range (to the end of the map after the last chunk).
            let isLastChunk = currentEpochs.count < chunkClusters || last == .max
            let historyEnd = isLastChunk ? [UInt8(ascii: "i")] : Self.historyKey(last! + 1, epoch: .max)
            var successor: (address: ClusterAddress, epoch: UInt64)?
            try view.scan(from: Self.historyKey(start, epoch: .max), to: historyEnd) {
                (key, raw) throws(VDError) -> Bool in
                let address = Self.address(ofKey: key)
                let value = try MapValue.decode(raw, key: "history", path: path)
                let next = successor?.address == address ? successor!.epoch : (currentEpochs[address] ?? .max)
                successor = (address, value.epoch)
                // A kept copy of the current version itself (a rollback restored it from history): neither a live
                // older version nor dead. Never report it dead: a write after this view moves the current version
                // into history under this very key, and dropping the key then would drop a version snapshots read.
                if value.epoch >= next { return true }
                // A cluster with no current key reads as never written at every epoch (see `value(_:atEpoch:)`).
                if currentEpochs[address] != nil && readBySnapshot(value.epoch, successor: next) {
                    if value.location != nil { try body(address, value, false) }
                } else {
                    try dead(address, value, next)
                }
                return true
            }
            if isLastChunk { return }
            start = last! + 1
        }
    }

    /// Metadata values whose names start with `prefix`, in name order.
    package func metadata(withPrefix prefix: String) throws(VDError) -> [(String, [UInt8])] {
        var result: [(String, [UInt8])] = []
        let start = Self.metadataKey(prefix)
        var end = start
        end[end.count - 1] &+= 1
        try database.scan(from: start, to: end) { (key, value) throws(VDError) -> Bool in
            result.append((String(decoding: key.dropFirst(), as: UTF8.self), Array(value)))
            return true
        }
        return result
    }

    // MARK: updates

    /// Applies `update` atomically to the database, then to the cache.
    package func apply(_ update: MapUpdate) throws(VDError) {
        guard !update.isEmpty else { return }
        let batch = database.makeBatch()
        // Keys and values are built in one stack buffer per entry: no heap allocation per cluster.
        withUnsafeTemporaryAllocation(byteCount: 9 + MapValue.encodedBytes, alignment: 8) { scratch in
            let key = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<9])
            let encoded = UnsafeMutableRawBufferPointer(rebasing: scratch[9...])
            key.storeBytes(of: UInt8(ascii: "c"), toByteOffset: 0, as: UInt8.self)
            for (address, value) in update.current {
                key.storeBytes(of: address.bigEndian, toByteOffset: 1, as: UInt64.self)
                if let value {
                    value.encode(into: encoded)
                    batch.put(UnsafeRawBufferPointer(key), UnsafeRawBufferPointer(encoded))
                } else {
                    batch.delete(UnsafeRawBufferPointer(key))
                }
            }
        }
        for (address, value) in update.history {
            batch.put(Self.historyKey(address, epoch: value.epoch), value.encode())
        }
        for (address, epoch) in update.dropHistory { batch.delete(Self.historyKey(address, epoch: epoch)) }
        for (name, value) in update.metadata { batch.put(Self.metadataKey(name), value) }
        try database.write(batch)
        if !update.current.isEmpty {
            cache.withLock { cache in
                cache.updates &+= 1
                for (address, value) in update.current { cache.insert(address, value) }
            }
        }
    }

    /// Forgets every cached entry (after a bulk change made behind the cache's back, e.g. rollback).
    package func invalidateCache() {
        cache.withLock { cache in
            cache.updates &+= 1
            cache.young = [:]
            cache.old = [:]
        }
    }

    package func metadata(_ name: String) throws(VDError) -> [UInt8]? {
        try database.get(Self.metadataKey(name))
    }

    /// Makes every applied update durable (memtable to disk).
    package func persist() throws(VDError) { try database.flush() }

    package func close() { database.close() }
}

extension Array where Element == UInt8 {
    /// A little-endian UInt64 stored with `init(littleEndian64:)`.
    package var littleEndianUInt64: UInt64? {
        guard count == 8 else { return nil }
        return withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
    }

    package init(littleEndian64 value: UInt64) {
        self = Swift.withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }
}
