// An open file on the local flash: positional reads and writes, syncs and sizing. Thread-safe (pread/pwrite carry
// their own offset). The descriptor closes when the last reference goes away or on `close()`; a file unlinked while
// readers still hold it stays readable for them, which is what lets the SCO cache evict under in-flight reads.

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif
import Synchronization
package import VolumeCore

/// A file descriptor with its path, closed deterministically.
package final class FlashFile: Sendable {
    package let path: String
    private let descriptor: Atomic<Int32>

    package struct Options: OptionSet, Sendable {
        package let rawValue: Int32
        package init(rawValue: Int32) { self.rawValue = rawValue }
        package static let create = Options(rawValue: 1)
        package static let exclusive = Options(rawValue: 2)
        package static let readOnly = Options(rawValue: 4)
        package static let direct = Options(rawValue: 8)
        package static let truncate = Options(rawValue: 16)
    }

    package init(path: String, options: Options = []) throws(VDError) {
        var flags: Int32 = options.contains(.readOnly) ? O_RDONLY : O_RDWR
        if options.contains(.create) { flags |= O_CREAT }
        if options.contains(.exclusive) { flags |= O_EXCL }
        if options.contains(.truncate) { flags |= O_TRUNC }
        if options.contains(.direct) { flags |= Syscall.directIOFlag }
        self.path = path
        self.descriptor = Atomic(try Syscall.open(path, flags: flags))
    }

    deinit {
        let fd = descriptor.exchange(-1, ordering: .acquiring)
        if fd >= 0 { Syscall.close(fd) }
    }

    /// The raw descriptor (for libaio). Valid until `close()`.
    package var fd: Int32 { descriptor.load(ordering: .relaxed) }

    package func close() {
        let fd = descriptor.exchange(-1, ordering: .acquiring)
        if fd >= 0 { Syscall.close(fd) }
    }

    private func liveDescriptor() throws(VDError) -> Int32 {
        let fd = descriptor.load(ordering: .relaxed)
        guard fd >= 0 else { throw VDError(.shutdown, "\(path) is closed") }
        return fd
    }

    package func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(VDError) {
        try Syscall.pwriteAll(try liveDescriptor(), bytes, at: offset, path: path)
    }

    package func write(_ bytes: [UInt8], at offset: UInt64) throws(VDError) {
        let fd = try liveDescriptor()
        try VDError.catching { try bytes.withUnsafeBytes { raw in try Syscall.pwriteAll(fd, raw, at: offset, path: path) } }
    }

    package func writev(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(VDError) {
        try Syscall.pwritevAll(try liveDescriptor(), buffers, at: offset, path: path)
    }

    /// Reads into `buffer`; returns how many bytes were read (short only at end of file).
    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VDError) -> Int {
        try Syscall.preadFully(try liveDescriptor(), buffer, at: offset, path: path)
    }

    /// Reads exactly `count` bytes or fails with `.corrupt` (the file is shorter than its metadata says).
    package func readExactly(_ count: Int, at offset: UInt64) throws(VDError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let fd = try liveDescriptor()
        let n = try VDError.catching {
            try bytes.withUnsafeMutableBytes { raw in try Syscall.preadFully(fd, raw, at: offset, path: path) }
        }
        guard n == count else {
            throw VDError(.corrupt, "\(path) ends at \(offset + UInt64(n)); expected \(count) bytes at \(offset)")
        }
        return bytes
    }

    package func dataSync() throws(VDError) { try Syscall.fdatasync(try liveDescriptor(), path: path) }
    package func sync() throws(VDError) { try Syscall.fsync(try liveDescriptor(), path: path) }
    package func truncate(to length: UInt64) throws(VDError) {
        try Syscall.ftruncate(try liveDescriptor(), length: length, path: path)
    }
    package func preallocate(_ length: UInt64, keepSize: Bool) throws(VDError) {
        try Syscall.fallocate(try liveDescriptor(), length: length, keepSize: keepSize, path: path)
    }
    package func size() throws(VDError) -> UInt64 { try Syscall.fileSize(try liveDescriptor(), path: path) }
    package func dropCache() { if let fd = try? liveDescriptor() { Syscall.dropCache(fd) } }
}

extension FlashFile {
    /// Replaces the file `directory/name` with `bytes` durably and atomically: written to `name.tmp`, synced, renamed
    /// over the target, then the directory synced. A crash leaves the old file or the new one, never a mix; a
    /// failure removes the temporary file.
    package static func replaceDurably(
        directory: String, name: String, with bytes: UnsafeRawBufferPointer
    ) throws(VDError) {
        let target = directory + "/" + name
        let temporary = target + ".tmp"
        try Syscall.unlinkIfPresent(temporary)
        let file = try FlashFile(path: temporary, options: [.create, .truncate])
        do throws(VDError) {
            try file.write(bytes, at: 0)
            try file.sync()
            file.close()
            try Syscall.rename(temporary, target)
            try Syscall.syncDirectory(directory)
        } catch {
            file.close()
            try? Syscall.unlinkIfPresent(temporary)
            throw error
        }
    }
}
