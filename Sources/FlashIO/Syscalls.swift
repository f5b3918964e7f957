// Every file-system call of VolumeDriver goes through here: EINTR is retried in one place, short reads and writes are
// completed, and errno becomes a VDError naming the file and the operation (ENOSPC becomes `.noSpace`).

import CLibAIO
package import VolumeCore

#if canImport(Glibc)
    @preconcurrency import Glibc
#elseif canImport(Musl)
    @preconcurrency import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

package enum Syscall {
    /// `errno` as a VDError: ENOSPC/EDQUOT are `.noSpace`, ENOENT `.notFound`, EEXIST `.alreadyExists`,
    /// the rest `.io`.
    package static func error(_ operation: String, _ path: String, errno code: Int32) -> VDError {
        let text = String(cString: strerror(code))
        let message = "\(operation) \(path): \(text)"
        switch code {
        case ENOSPC, EDQUOT: return VDError(.noSpace, message, errno: code)
        case ENOENT: return VDError(.notFound, message, errno: code)
        case EEXIST: return VDError(.alreadyExists, message, errno: code)
        case EWOULDBLOCK: return VDError(.busy, message, errno: code)
        default: return VDError(.io, message, errno: code)
        }
    }

    @inline(__always)
    package static func retrying<T: BinaryInteger>(
        _ operation: String, _ path: String, _ body: () -> T
    ) throws(VDError) -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = errno
            if code == EINTR { continue }
            throw error(operation, path, errno: code)
        }
    }

    package static func open(_ path: String, flags: Int32, mode: UInt32 = 0o644) throws(VDError) -> Int32 {
        try retrying("open", path) { Glibc.open(path, flags | O_CLOEXEC, mode_t(mode)) }
    }

    package static var directIOFlag: Int32 { vd_o_direct }

    package static func close(_ fd: Int32) {
        // close is not retried on EINTR on Linux: the descriptor is released either way.
        _ = Glibc.close(fd)
    }

    /// Writes all of `buffer` at `offset`.
    package static func pwriteAll(
        _ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64, path: String
    )
        throws(VDError)
    {
        var done = 0
        while done < buffer.count {
            let n = try retrying("write", path) {
                pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { throw VDError(.io, "write \(path): wrote nothing at offset \(offset + UInt64(done))") }
            done += n
        }
    }

    /// Writes several buffers contiguously at `offset` with as few system calls as possible.
    package static func pwritevAll(
        _ fd: Int32, _ buffers: [UnsafeRawBufferPointer], at offset: UInt64, path: String
    ) throws(VDError) {
        var iovecs = buffers.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
        }
        var total = buffers.reduce(0) { $0 + $1.count }
        var position = offset
        var first = 0
        while total > 0 {
            let count = min(iovecs.count - first, 1024)
            let n = try iovecs.withUnsafeMutableBufferPointer { iov throws(VDError) -> Int in
                try retrying("write", path) { pwritev(fd, iov.baseAddress! + first, Int32(count), off_t(position)) }
            }
            if n == 0 { throw VDError(.io, "write \(path): wrote nothing at offset \(position)") }
            total -= n
            position += UInt64(n)
            var left = n
            while left > 0 && first < iovecs.count {
                if left >= iovecs[first].iov_len {
                    left -= iovecs[first].iov_len
                    first += 1
                } else {
                    iovecs[first].iov_base = iovecs[first].iov_base! + left
                    iovecs[first].iov_len -= left
                    left = 0
                }
            }
        }
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns the count read (short only at end of file).
    package static func preadFully(
        _ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, path: String
    ) throws(VDError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try retrying("read", path) {
                pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    package static func fdatasync(_ fd: Int32, path: String) throws(VDError) {
        _ = try retrying("fdatasync", path) { Glibc.fdatasync(fd) }
    }

    package static func fsync(_ fd: Int32, path: String) throws(VDError) {
        _ = try retrying("fsync", path) { Glibc.fsync(fd) }
    }

    package static func ftruncate(_ fd: Int32, length: UInt64, path: String) throws(VDError) {
        _ = try retrying("truncate", path) { Glibc.ftruncate(fd, off_t(length)) }
    }

    /// Reserves `length` bytes for the file (blocks allocated, size unchanged when `keepSize`).
    package static func fallocate(_ fd: Int32, length: UInt64, keepSize: Bool, path: String) throws(VDError) {
        let mode: Int32 = keepSize ? 0x01 : 0  // FALLOC_FL_KEEP_SIZE
        _ = try retrying("fallocate", path) { CLibAIO.fallocate(fd, mode, 0, off_t(length)) }
    }

    package static func fileSize(_ fd: Int32, path: String) throws(VDError) -> UInt64 {
        var st = stat()
        _ = try retrying("stat", path) { fstat(fd, &st) }
        return UInt64(st.st_size)
    }

    /// Drops clean cached pages of the file (after it was synced and will be read with O_DIRECT or not at all).
    package static func dropCache(_ fd: Int32) {
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    }

    package static func rename(_ from: String, _ to: String) throws(VDError) {
        _ = try retrying("rename", from) { Glibc.rename(from, to) }
    }

    /// Removes a file; a missing file is not an error.
    package static func unlinkIfPresent(_ path: String) throws(VDError) {
        if Glibc.unlink(path) != 0 && errno != ENOENT {
            throw error("remove", path, errno: errno)
        }
    }

    /// Creates a directory and its parents (like `mkdir -p`), durably: the parent of every directory created is
    /// fsynced, so the new entries survive a power loss.
    package static func makeDirectories(_ path: String, mode: UInt32 = 0o755) throws(VDError) {
        var prefix = path.hasPrefix("/") ? "/" : ""
        var parent = prefix.isEmpty ? "." : prefix
        for component in path.split(separator: "/") {
            prefix += component
            if Glibc.mkdir(prefix, mode_t(mode)) == 0 {
                try syncDirectory(parent)
            } else if errno != EEXIST {
                throw error("create directory", prefix, errno: errno)
            }
            parent = prefix
            prefix += "/"
        }
    }

    /// fsyncs a directory so entries created, renamed or removed in it survive power loss.
    package static func syncDirectory(_ path: String) throws(VDError) {
        let fd = try open(path, flags: O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        try fsync(fd, path: path)
    }

    /// Hard-links `from` as `to`; false when the file systems differ or links are not supported.
    package static func link(_ from: String, _ to: String) -> Bool {
        Glibc.link(from, to) == 0
    }

    /// Hard-links `from` as `to`, never replacing `to`: 0, or the errno (EEXIST: `to` exists; EXDEV: another file
    /// system). The atomic "create only if absent" of a directory store.
    package static func linkNoReplace(_ from: String, _ to: String) -> Int32 {
        Glibc.link(from, to) == 0 ? 0 : errno
    }

    /// Copies `length` bytes from the start of one descriptor to another (in the kernel when possible).
    package static func copyFile(from source: Int32, to target: Int32, length: UInt64, path: String) throws(VDError) {
        var sourceOffset = off_t(0)
        var targetOffset = off_t(0)
        var left = length
        while left > 0 {
            let n = CLibAIO.copy_file_range(source, &sourceOffset, target, &targetOffset, Int(min(left, 1 << 30)), 0)
            if n > 0 {
                left -= UInt64(n)
                continue
            }
            if n == 0 { throw VDError(.io, "copy to \(path): source ended \(left) bytes early") }
            if errno == EINTR { continue }
            throw error("copy to", path, errno: errno)
        }
    }

    package static func fileExists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    package static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Names in a directory (without "." and ".."), unsorted. A missing directory lists as empty.
    package static func listDirectory(_ path: String) throws(VDError) -> [String] {
        guard let dir = opendir(path) else {
            if errno == ENOENT { return [] }
            throw error("list", path, errno: errno)
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Removes a file or a directory tree; missing is not an error.
    package static func removeTree(_ path: String) throws(VDError) {
        var st = stat()
        if lstat(path, &st) != 0 {
            if errno == ENOENT { return }
            throw error("stat", path, errno: errno)
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in try listDirectory(path) { try removeTree(path + "/" + name) }
            if rmdir(path) != 0 && errno != ENOENT { throw error("remove directory", path, errno: errno) }
        } else {
            try unlinkIfPresent(path)
        }
    }

    /// Bytes free for unprivileged users on the file system holding `path`.
    package static func freeSpace(_ path: String) throws(VDError) -> UInt64 {
        var s = statvfs()
        _ = try retrying("statvfs", path) { statvfs(path, &s) }
        return UInt64(s.f_bavail) * UInt64(s.f_frsize)
    }
}
