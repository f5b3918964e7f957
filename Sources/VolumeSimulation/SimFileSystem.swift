// A simulated local file system (one per simulated node) that keeps two states: what the page cache holds (what
// every read sees) and what is durable. A process crash keeps the page cache; a power loss keeps only what is
// durable, except that unsynced writes are torn at 512-byte granularity (each sector independently old or new), a
// file whose size changed without a sync ends at its old or its new size, and every directory keeps a random prefix
// of its unsynced creations, renames and removals.
//
// The durability rules are POSIX's, strictly: file data after fdatasync/fsync of that file; a name after fsync of
// its directory. Nothing ext4 happens to give for free is given here.

package import FlashIO
import Foundation
import NIOCore
package import VolumeCore

package final class SimFileSystem: FileSystem, @unchecked Sendable {
    package let name: String
    let scheduler: SimScheduler
    private let root = SimDirectory()
    /// Every file ever created (to free their contents when the run ends: tasks a crash abandoned keep handles).
    private var inodes: [SimInode] = []
    private var locks: [String: (holder: String, process: SimProcess?)] = [:]
    /// Counters for the trace and for tests.
    package private(set) var syncCount = 0
    /// Inject ENOSPC into the next `n` calls of an operation (fallocate, write, fdatasync).
    package var failNext: [String: (count: Int, error: VDError)] = [:]

    package init(name: String, scheduler: SimScheduler) {
        self.name = name
        self.scheduler = scheduler
    }

    package var pathsAreReal: Bool { false }

    // MARK: paths

    private func components(_ path: String) -> [String] {
        path.split(separator: "/").map(String.init)
    }

    /// The directory at `parts`; with `create`, missing ones are created and (`durably`) their parents synced.
    private func directory(
        _ parts: ArraySlice<String>, create: Bool = false, durably: Bool = false
    ) throws(VDError)
        -> SimDirectory
    {
        var current = root
        for part in parts {
            switch current.cached[part] {
            case .directory(let next)?:
                current = next
            case .file?:
                throw VDError(.io, "\(name): \(parts.joined(separator: "/")) is not a directory")
            case nil:
                guard create else { throw VDError(.notFound, "\(name): no directory /\(parts.joined(separator: "/"))") }
                let next = SimDirectory()
                current.record(part, .directory(next))
                if durably { current.sync() }
                current = next
            }
        }
        return current
    }

    private func split(_ path: String) throws(VDError) -> (SimDirectory, String) {
        let parts = components(path)
        guard let last = parts.last else { throw VDError(.invalidArgument, "\(name): empty path") }
        return (try directory(parts.dropLast()), last)
    }

    /// Throws when the calling simulated process is dead (it must leave no further trace).
    private func checkCaller() throws(VDError) {
        if let process = scheduler.currentProcess, !process.isAlive {
            throw VDError(.io, "\(process.name) is gone")
        }
    }

    func injected(_ operation: String) throws(VDError) {
        guard var fault = failNext[operation] else { return }
        fault.count -= 1
        failNext[operation] = fault.count > 0 ? fault : nil
        throw fault.error
    }

    // MARK: FileSystem

    package func open(_ path: String, options: FlashFile.Options) throws(VDError) -> FlashFile {
        try checkCaller()
        let (directory, leaf) = try split(path)
        let inode: SimInode
        switch directory.cached[leaf] {
        case .file(let existing)?:
            if options.contains(.exclusive) && options.contains(.create) {
                throw VDError(.alreadyExists, "open \(path): file exists")
            }
            inode = existing
            if options.contains(.truncate) && !options.contains(.readOnly) { inode.truncate(to: 0) }
        case .directory?:
            throw VDError(.io, "open \(path): is a directory")
        case nil:
            guard options.contains(.create) else { throw VDError(.notFound, "open \(path): No such file or directory") }
            inode = SimInode()
            inodes.append(inode)
            directory.record(leaf, .file(inode))
        }
        let file = SimFile(
            fs: self, inode: inode, path: path, readOnly: options.contains(.readOnly), owner: scheduler.currentProcess)
        return FlashFile(path: path, io: file)
    }

    package func rename(_ from: String, _ to: String) throws(VDError) {
        try checkCaller()
        let (source, sourceName) = try split(from)
        let (target, targetName) = try split(to)
        guard let entry = source.cached[sourceName] else {
            throw VDError(.notFound, "rename \(from): No such file or directory")
        }
        if source === target {
            source.recordRename(from: sourceName, to: targetName, entry)
        } else {
            target.record(targetName, entry)
            source.record(sourceName, nil)
        }
    }

    package func unlinkIfPresent(_ path: String) throws(VDError) {
        try checkCaller()
        guard let (directory, leaf) = try? split(path) else { return }
        guard case .file? = directory.cached[leaf] else { return }
        directory.record(leaf, nil)
    }

    package func makeDirectories(_ path: String) throws(VDError) {
        try checkCaller()
        _ = try directory(components(path)[...], create: true, durably: true)
    }

    package func syncDirectory(_ path: String) throws(VDError) {
        try checkCaller()
        let directory = try directory(components(path)[...])
        syncCount += 1
        directory.sync()
    }

    package func listDirectory(_ path: String) throws(VDError) -> [String] {
        guard let directory = try? directory(components(path)[...]) else { return [] }
        return directory.cached.keys.sorted()
    }

    package func removeTree(_ path: String) throws(VDError) {
        try checkCaller()
        guard let (directory, leaf) = try? split(path), directory.cached[leaf] != nil else { return }
        directory.record(leaf, nil)
    }

    package func fileExists(_ path: String) -> Bool {
        guard let (directory, leaf) = try? split(path) else { return false }
        return directory.cached[leaf] != nil
    }

    package func lockDirectory(_ directory: String, holder: String) throws(VDError) -> any DirectoryLockHandle {
        if let current = locks[directory], current.process?.isAlive ?? false {
            throw VDError(.busy, "the data directory \(directory) is in use by \(current.holder)")
        }
        locks[directory] = (holder, scheduler.currentProcess)
        return SimDirectoryLock(fs: self, directory: directory)
    }

    fileprivate func unlock(_ directory: String) { locks[directory] = nil }

    // MARK: crashes

    /// A power loss: everything not durable is lost or torn (see the file comment).
    package func powerLoss() {
        root.powerLoss(scheduler)
    }

    /// Test hook: the bytes of a file as the page cache has them (nil when absent).
    package func contents(_ path: String) -> [UInt8]? {
        guard let (directory, leaf) = try? split(path), case .file(let inode)? = directory.cached[leaf] else {
            return nil
        }
        return Array(inode.cached)
    }

    /// Test hook: writes bytes into a file directly (durably), e.g. to simulate a stale file.
    package func plant(_ path: String, bytes: [UInt8]) throws(VDError) {
        let parts = components(path)
        let directory = try directory(parts.dropLast(), create: true)
        let inode = SimInode()
        inode.cached = bytes
        inode.durable = bytes
        directory.record(parts.last!, .file(inode))
        directory.sync()
    }

    /// Frees every file's contents (the run is over).
    package func releaseAll() {
        for inode in inodes {
            inode.cached = []
            inode.durable = []
        }
        inodes = []
    }

    /// Removes everything under `path` at once, durably (a lost disk).
    package func wipe(_ path: String) {
        guard let (directory, leaf) = try? split(path) else { return }
        directory.record(leaf, nil)
        directory.sync()
    }
}

struct SimDirectoryLock: DirectoryLockHandle, @unchecked Sendable {
    let fs: SimFileSystem
    let directory: String
    func release() { fs.unlock(directory) }
}

enum SimEntry {
    case file(SimInode)
    case directory(SimDirectory)
}

/// A directory: its entries as everyone sees them, its durable entries, and the unsynced changes in order.
final class SimDirectory {
    var cached: [String: SimEntry] = [:]
    var durable: [String: SimEntry] = [:]
    /// Unsynced changes, oldest first (a power loss keeps a prefix).
    var pending: [(name: String, entry: SimEntry?, renamedFrom: String?)] = []

    func record(_ name: String, _ entry: SimEntry?) {
        cached[name] = entry
        pending.append((name, entry, nil))
    }

    /// A rename inside one directory: atomic (both names change together or neither).
    func recordRename(from: String, to: String, _ entry: SimEntry) {
        cached[to] = entry
        cached[from] = nil
        pending.append((to, entry, from))
    }

    func sync() {
        durable = cached
        pending = []
    }

    func powerLoss(_ scheduler: SimScheduler) {
        let keep = pending.isEmpty ? 0 : scheduler.below(pending.count + 1)
        for change in pending.prefix(keep) {
            if let from = change.renamedFrom { durable[from] = nil }
            durable[change.name] = change.entry
        }
        pending = []
        cached = durable
        for name in cached.keys.sorted() {
            switch cached[name]! {
            case .file(let inode): inode.powerLoss(scheduler)
            case .directory(let directory): directory.powerLoss(scheduler)
            }
        }
    }
}

/// A file's contents: as the page cache has them, and as the device has them.
final class SimInode {
    var cached: [UInt8] = []
    var durable: [UInt8] = []
    static let sectorBytes = 512

    func truncate(to length: Int) {
        if length < cached.count {
            cached.removeLast(cached.count - length)
        } else if length > cached.count {
            cached.append(contentsOf: [UInt8](repeating: 0, count: length - cached.count))
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) {
        if offset + bytes.count > cached.count { truncate(to: offset + bytes.count) }
        cached.withUnsafeMutableBytes { raw in
            UnsafeMutableRawBufferPointer(rebasing: raw[offset..<(offset + bytes.count)]).copyMemory(from: bytes)
        }
    }

    func sync() { durable = cached }

    /// Keeps the durable contents plus, per 512-byte sector that differs, either the old or the new bytes; the size
    /// is the durable one or the page cache's.
    func powerLoss(_ scheduler: SimScheduler) {
        guard cached != durable else { return }
        let length = cached.count == durable.count || scheduler.chance(0.5) ? durable.count : cached.count
        var result = [UInt8](repeating: 0, count: length)
        let sector = Self.sectorBytes
        result.withUnsafeMutableBytes { target in
            cached.withUnsafeBytes { new in
                durable.withUnsafeBytes { old in
                    var start = 0
                    while start < length {
                        let end = min(start + sector, length)
                        let oldEnd = min(end, old.count)
                        let newEnd = min(end, new.count)
                        let oldPart =
                            start < oldEnd
                            ? UnsafeRawBufferPointer(rebasing: old[start..<oldEnd])
                            : UnsafeRawBufferPointer(start: nil, count: 0)
                        let newPart =
                            start < newEnd
                            ? UnsafeRawBufferPointer(rebasing: new[start..<newEnd])
                            : UnsafeRawBufferPointer(start: nil, count: 0)
                        let same =
                            oldPart.count == newPart.count
                            && (oldPart.count == 0
                                || memcmp(oldPart.baseAddress!, newPart.baseAddress!, oldPart.count) == 0)
                        let chosen = same || !scheduler.chance(0.5) ? oldPart : newPart
                        if chosen.count > 0 {
                            UnsafeMutableRawBufferPointer(rebasing: target[start..<(start + chosen.count)]).copyMemory(
                                from: chosen)
                        }
                        start = end
                    }
                }
            }
        }
        cached = result
        durable = result
    }
}

/// An open simulated file.
final class SimFile: FileIO, @unchecked Sendable {
    let fs: SimFileSystem
    let inode: SimInode
    let path: String
    let readOnly: Bool
    let owner: SimProcess?
    private var closed = false

    init(fs: SimFileSystem, inode: SimInode, path: String, readOnly: Bool, owner: SimProcess?) {
        self.fs = fs
        self.inode = inode
        self.path = path
        self.readOnly = readOnly
        self.owner = owner
    }

    var fd: Int32 { -1 }

    private func check(writing: Bool) throws(VDError) {
        guard !closed else { throw VDError(.shutdown, "\(path) is closed") }
        if let owner, !owner.isAlive { throw VDError(.io, "\(owner.name) is gone") }
        if let process = fs.scheduler.currentProcess, !process.isAlive { throw VDError(.io, "\(process.name) is gone") }
        if writing && readOnly { throw VDError(.io, "write \(path): Bad file descriptor") }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(VDError) {
        try check(writing: true)
        try fs.injected("write")
        inode.write(bytes, at: Int(offset))
    }

    func writev(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(VDError) {
        try check(writing: true)
        try fs.injected("write")
        var position = Int(offset)
        for buffer in buffers {
            inode.write(buffer, at: position)
            position += buffer.count
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VDError) -> Int {
        try check(writing: false)
        let start = Int(offset)
        guard start < inode.cached.count else { return 0 }
        let count = min(buffer.count, inode.cached.count - start)
        inode.cached.withUnsafeBytes { raw in
            UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]).copyMemory(
                from: UnsafeRawBufferPointer(rebasing: raw[start..<(start + count)]))
        }
        return count
    }

    func dataSync() throws(VDError) {
        try check(writing: false)
        try fs.injected("fdatasync")
        inode.sync()
    }

    func sync() throws(VDError) {
        try check(writing: false)
        try fs.injected("fdatasync")
        inode.sync()
    }

    func truncate(to length: UInt64) throws(VDError) {
        try check(writing: true)
        inode.truncate(to: Int(length))
    }

    func preallocate(_ length: UInt64, keepSize: Bool) throws(VDError) {
        try check(writing: true)
        try fs.injected("fallocate")
        if !keepSize && Int(length) > inode.cached.count { inode.truncate(to: Int(length)) }
    }

    func size() throws(VDError) -> UInt64 {
        try check(writing: false)
        return UInt64(inode.cached.count)
    }

    func dropCache() {}

    func close() { closed = true }
}
