// An open file on the local flash: positional reads and writes, syncs and sizing. Thread-safe (pread/pwrite carry
// their own offset). The descriptor closes when the last reference goes away or on `close()`; a file unlinked while
// readers still hold it stays readable for them, which is what lets the SCO cache evict under in-flight reads.
//
// A FlashFile is a handle on a `FileIO`: a real descriptor (`PosixFileIO`), or a simulated file (VolumeSimulation)
// whose page cache and durable contents differ until it is synced.

import Synchronization
package import VolumeCore

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif

/// The operations on one open file.
package protocol FileIO: Sendable {
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(VDError)
    func writev(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(VDError)
    /// Reads into `buffer`; returns how many bytes were read (short only at end of file).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VDError) -> Int
    func dataSync() throws(VDError)
    func sync() throws(VDError)
    func truncate(to length: UInt64) throws(VDError)
    func preallocate(_ length: UInt64, keepSize: Bool) throws(VDError)
    func size() throws(VDError) -> UInt64
    func dropCache()
    func close()
    /// The raw descriptor for libaio, or -1 (simulated, or closed).
    var fd: Int32 { get }
}

/// A file handle with its path, closed deterministically.
package final class FlashFile: Sendable {
    package let path: String
    package let io: any FileIO

    package struct Options: OptionSet, Sendable, Hashable {
        package let rawValue: Int32
        package init(rawValue: Int32) { self.rawValue = rawValue }
        package static let create = Options(rawValue: 1)
        package static let exclusive = Options(rawValue: 2)
        package static let readOnly = Options(rawValue: 4)
        package static let direct = Options(rawValue: 8)
        package static let truncate = Options(rawValue: 16)
    }

    /// Opens a real file.
    package convenience init(path: String, options: Options = []) throws(VDError) {
        self.init(path: path, io: try PosixFileIO(path: path, options: options))
    }

    package init(path: String, io: any FileIO) {
        self.path = path
        self.io = io
    }

    /// The raw descriptor (for libaio); -1 for simulated files. Valid until `close()`.
    package var fd: Int32 { io.fd }

    package func close() { io.close() }

    package func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(VDError) {
        try io.write(bytes, at: offset)
    }

    package func write(_ bytes: [UInt8], at offset: UInt64) throws(VDError) {
        try VDError.catching { try bytes.withUnsafeBytes { raw in try io.write(raw, at: offset) } }
    }

    package func writev(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(VDError) {
        try io.writev(buffers, at: offset)
    }

    /// Reads into `buffer`; returns how many bytes were read (short only at end of file).
    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VDError) -> Int {
        try io.read(into: buffer, at: offset)
    }

    /// Reads exactly `count` bytes or fails with `.corrupt` (the file is shorter than its metadata says).
    package func readExactly(_ count: Int, at offset: UInt64) throws(VDError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let n = try VDError.catching { try bytes.withUnsafeMutableBytes { raw in try io.read(into: raw, at: offset) } }
        guard n == count else {
            throw VDError(.corrupt, "\(path) ends at \(offset + UInt64(n)); expected \(count) bytes at \(offset)")
        }
        return bytes
    }

    package func dataSync() throws(VDError) { try io.dataSync() }
    package func sync() throws(VDError) { try io.sync() }
    package func truncate(to length: UInt64) throws(VDError) { try io.truncate(to: length) }
    package func preallocate(_ length: UInt64, keepSize: Bool) throws(VDError) {
        try io.preallocate(length, keepSize: keepSize)
    }
    package func size() throws(VDError) -> UInt64 { try io.size() }
    package func dropCache() { io.dropCache() }
}

/// A real file descriptor.
package final class PosixFileIO: FileIO {
    let path: String
    private let descriptor: Atomic<Int32>

    package init(path: String, options: FlashFile.Options) throws(VDError) {
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

    package func writev(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(VDError) {
        try Syscall.pwritevAll(try liveDescriptor(), buffers, at: offset, path: path)
    }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VDError) -> Int {
        try Syscall.preadFully(try liveDescriptor(), buffer, at: offset, path: path)
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
