// The local flash cache of SCOs, shared by every volume of a router. It knows which SCO files are on local flash,
// serves reads from them, and evicts the least recently read SCOs once the cache is over its capacity.
//
// Safety rules it enforces: only SCOs that their volume marked evictable (the SCO and its TLog are on the backend
// and the map no longer needs the local journal) are ever removed; a read that already holds an SCO's file keeps
// reading it after eviction (the descriptor outlives the unlink). A read of an SCO that is not local returns nil and
// the caller goes to the backend.

package import FlashIO
package import Logging
package import NIOCore
import Synchronization
package import VolumeCore

package final class FlashCache: Sendable {
    package struct Key: Hashable, Sendable {
        package var volume: VolumeID
        package var sco: SCONumber
        package init(volume: VolumeID, sco: SCONumber) {
            self.volume = volume
            self.sco = sco
        }
    }

    private struct Entry {
        var file: FlashFile
        var direct: FlashFile?
        /// Bytes the file takes on flash.
        var footprintBytes: UInt64
        var evictable = false
        var lastAccess: UInt64 = 0
        /// For a copy of backend data filled as it is read: which 4096-byte blocks are present (nil: all).
        var present: [UInt64]? = nil

        func covers(_ offset: UInt64, _ length: Int) -> Bool {
            guard let present else { return true }
            var block = offset / 4096
            let end = (offset + UInt64(length) + 4095) / 4096
            while block < end {
                let word = Int(block / 64)
                guard word < present.count, present[word] & (1 << (block % 64)) != 0 else { return false }
                block += 1
            }
            return true
        }
    }

    private struct State {
        var entries: [Key: Entry] = [:]
        var footprintBytes: UInt64 = 0
        var clock: UInt64 = 0
        var evictedCount: UInt64 = 0
        var closed = false
    }

    package let capacityBytes: UInt64
    private let aio: AIOQueue?
    private let state = Mutex(State())
    private let logger: Logger
    private let fs: any FileSystem

    /// `aio`: when given, sealed SCOs are read with O_DIRECT through it; otherwise through the page cache.
    package init(capacityBytes: UInt64, aio: AIOQueue?, logger: Logger, fs: any FileSystem = PosixFileSystem()) {
        precondition(aio == nil || fs.pathsAreReal, "direct I/O needs a real file system")
        self.capacityBytes = capacityBytes
        self.aio = aio
        self.logger = logger
        self.fs = fs
    }

    package var usesDirectIO: Bool { aio != nil }

    package struct Statistics: Sendable {
        package var files: Int
        package var footprintBytes: UInt64
        package var evictedCount: UInt64
    }

    package var statistics: Statistics {
        state.withLock { Statistics(files: $0.entries.count, footprintBytes: $0.footprintBytes, evictedCount: $0.evictedCount) }
    }

    /// Adds a local SCO file (open journal or sealed). `footprintBytes` is what it occupies on flash.
    package func add(_ key: Key, file: FlashFile, footprintBytes: UInt64) {
        state.withLock { state in
            if let old = state.entries[key] { state.footprintBytes -= old.footprintBytes }
            state.clock += 1
            state.entries[key] = Entry(file: file, footprintBytes: footprintBytes, lastAccess: state.clock)
            state.footprintBytes += footprintBytes
        }
    }

    /// The SCO is sealed: reads may now use O_DIRECT; its footprint shrinks to `footprintBytes`.
    package func sealed(_ key: Key, footprintBytes: UInt64) {
        var direct: FlashFile?
        if aio != nil, let path = state.withLock({ $0.entries[key]?.file.path }) {
            do {
                direct = try fs.open(path, options: [.readOnly, .direct])
            } catch {
                logger.warning("cannot open \(path) for direct I/O, reading it through the page cache: \(error)")
            }
        }
        state.withLock { state in
            guard var entry = state.entries[key] else { return }
            entry.direct = direct
            state.footprintBytes = state.footprintBytes - entry.footprintBytes + footprintBytes
            entry.footprintBytes = footprintBytes
            state.entries[key] = entry
        }
    }

    /// The SCO may be dropped from flash when space is needed.
    package func markEvictable(_ key: Key) {
        state.withLock { state in state.entries[key]?.evictable = true }
    }

    package func contains(_ key: Key) -> Bool { state.withLock { $0.entries[key] != nil } }

    /// Reads `length` bytes at `offset` of a local SCO, or returns nil when those bytes are not on local flash.
    package func read(_ key: Key, offset: UInt64, length: Int) async throws(VDError) -> ByteBuffer? {
        let files = state.withLock { state -> (FlashFile, FlashFile?)? in
            guard var entry = state.entries[key], entry.covers(offset, length) else { return nil }
            state.clock += 1
            entry.lastAccess = state.clock
            state.entries[key] = entry
            return (entry.file, entry.direct)
        }
        guard let (file, direct) = files else { return nil }
        if let direct, let aio, offset % UInt64(AIOQueue.alignmentBytes) == 0, length % AIOQueue.alignmentBytes == 0 {
            return try await aio.read(direct, offset: offset, length: length)
        }
        var buffer = ByteBufferAllocator().buffer(capacity: length)
        let n = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { (raw) throws(VDError) -> Int in
            try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]), at: offset)
        }
        guard n == length else {
            throw VDError(.corrupt, "\(file.path) ends before offset \(offset + UInt64(length)) (read \(n) of \(length) bytes)")
        }
        return buffer
    }

    /// Keeps bytes fetched from the backend (4096-aligned, at their offset in the SCO) in a sparse local file at
    /// `path`, so later reads of them stay local. Best effort: a failure only costs a later refetch.
    package func storeFetched(_ key: Key, path: String, offset: UInt64, bytes: ByteBuffer) {
        guard offset % 4096 == 0, bytes.readableBytes % 4096 == 0, bytes.readableBytes > 0 else { return }
        let file = state.withLock { state -> FlashFile? in
            if let entry = state.entries[key] { return entry.present == nil ? nil : entry.file }
            guard let file = try? fs.open(path, options: [.create, .truncate]) else { return nil }
            state.clock += 1
            state.entries[key] = Entry(file: file, footprintBytes: 0, evictable: true, lastAccess: state.clock, present: [])
            return file
        }
        guard let file else { return }
        do {
            try bytes.withUnsafeReadableBytes { (raw) throws(VDError) in try file.write(raw, at: offset) }
        } catch {
            logger.debug("cannot keep fetched data in \(path): \(error)")
            return
        }
        state.withLock { state in
            guard var entry = state.entries[key], entry.file === file, var present = entry.present else { return }
            var added: UInt64 = 0
            let first = offset / 4096
            let end = first + UInt64(bytes.readableBytes / 4096)
            for block in first..<end {
                let word = Int(block / 64)
                if word >= present.count { present += [UInt64](repeating: 0, count: word - present.count + 1) }
                if present[word] & (1 << (block % 64)) == 0 {
                    present[word] |= 1 << (block % 64)
                    added += 4096
                }
            }
            entry.present = present
            entry.footprintBytes += added
            state.footprintBytes += added
            state.entries[key] = entry
        }
        evictIfNeeded()
    }

    /// Removes an SCO file from the cache and from flash (volume deletion, or a discarded journal).
    package func remove(_ key: Key) {
        let entry = state.withLock { state -> Entry? in
            guard let entry = state.entries.removeValue(forKey: key) else { return nil }
            state.footprintBytes -= entry.footprintBytes
            return entry
        }
        guard let entry else { return }
        try? fs.unlinkIfPresent(entry.file.path)
    }

    /// Removes every entry of a volume from the cache (files are left alone: the caller owns them).
    package func forget(volume: VolumeID) {
        state.withLock { state in
            for key in state.entries.keys where key.volume == volume {
                state.footprintBytes -= state.entries.removeValue(forKey: key)!.footprintBytes
            }
        }
    }

    /// Evicts least recently read evictable SCOs until the footprint is within capacity. Returns what was evicted.
    @discardableResult
    package func evictIfNeeded() -> [Key] {
        let victims = state.withLock { state -> [(Key, Entry)] in
            guard state.footprintBytes > capacityBytes else { return [] }
            var candidates = state.entries.filter { $0.value.evictable }.sorted { $0.value.lastAccess < $1.value.lastAccess }
            var victims: [(Key, Entry)] = []
            while state.footprintBytes > capacityBytes, !candidates.isEmpty {
                let (key, entry) = candidates.removeFirst()
                state.entries[key] = nil
                state.footprintBytes -= entry.footprintBytes
                state.evictedCount += 1
                victims.append((key, entry))
            }
            return victims
        }
        for (key, entry) in victims {
            do {
                try fs.unlinkIfPresent(entry.file.path)
                logger.debug("evicted SCO \(key.sco) of volume \(key.volume) from flash")
            } catch {
                logger.warning("cannot remove evicted SCO file \(entry.file.path): \(error)")
            }
        }
        return victims.map(\.0)
    }

    /// Whether the cache is over capacity with nothing left to evict (writers should slow down).
    package var isOverCapacityWithoutVictims: Bool {
        state.withLock { state in
            state.footprintBytes > capacityBytes && !state.entries.values.contains { $0.evictable }
        }
    }
}
