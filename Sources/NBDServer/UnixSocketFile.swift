// UnixSocketFile
// Decides whether a Unix socket path may be bound: a socket file nobody listens on (left by a crashed server) is
// removed; a socket somebody listens on means another server is running (`.busy`, naming the path); anything that is
// not a socket is never touched.
//
// Faults it must survive: races with another server starting at the same time (bind then fails with EADDRINUSE,
// reported as `.busy` by the caller), permission errors (reported with the errno), EINTR on connect.

import VolumeCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

enum UnixSocketFile {
    /// Size of `sockaddr_un.sun_path` (including the terminating NUL).
    static let pathBytesMax: Int = MemoryLayout.size(ofValue: sockaddr_un().sun_path)

    /// Removes `path` if it is a socket file nobody listens on.
    static func removeIfStale(_ path: String) throws(VDError) {
        var status = stat()
        guard lstat(path, &status) == 0 else {
            let code = errno
            if code == ENOENT { return }
            throw VDError(.io, "cannot inspect '\(path)': \(describe(code))", errno: code)
        }
        guard status.st_mode & S_IFMT == S_IFSOCK else {
            throw VDError(.alreadyExists, "'\(path)' exists and is not a socket; refusing to replace it")
        }
        switch probe(path) {
        case .listening:
            throw VDError(.busy, "another server is listening on '\(path)'")
        case .stale:
            guard unlink(path) == 0 || errno == ENOENT else {
                let code = errno
                throw VDError(.io, "cannot remove the stale socket '\(path)': \(describe(code))", errno: code)
            }
        case .failed(let code):
            throw VDError(.io, "cannot check whether a server listens on '\(path)': \(describe(code))", errno: code)
        }
    }

    /// Removes the socket file at `path` if there is one (after the server closed its listener).
    static func remove(_ path: String) {
        var status = stat()
        if lstat(path, &status) == 0, status.st_mode & S_IFMT == S_IFSOCK {
            unlink(path)
        }
    }

    private enum Probe {
        case listening
        case stale
        case failed(Int32)
    }

    private static func probe(_ path: String) -> Probe {
        #if canImport(Darwin)
            let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #else
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #endif
        guard fd >= 0 else { return .failed(errno) }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < pathBytesMax else { return .failed(ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        while true {
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            if result == 0 { return .listening }
            let code = errno
            switch code {
            case EINTR: continue
            case ECONNREFUSED, ENOENT: return .stale
            // A listener whose backlog is full is still a listener.
            case EAGAIN: return .listening
            default: return .failed(code)
            }
        }
    }

    private static func describe(_ code: Int32) -> String {
        String(cString: strerror(code))
    }
}
