// One owner per data directory: an exclusive flock on DIR/vd.lock, held for the owner's lifetime and released by the
// kernel if the process dies (kill -9 included), so a stale lock never blocks a restart. The file names the holder
// so a refused second owner can say who has it.

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif
package import VolumeCore

/// A held lock on a data directory, released explicitly or when its process ends.
package protocol DirectoryLockHandle: Sendable {
    func release()
}

package final class DirectoryLock: DirectoryLockHandle {
    package let path: String
    private let file: FlashFile

    /// Takes the lock or throws `.busy` naming the current holder. `holder` describes this process (e.g. "vd serve").
    package init(directory: String, holder: String) throws(VDError) {
        path = directory + "/vd.lock"
        let file = try FlashFile(path: path, options: .create)
        if flock(file.fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            let current = (try? file.readExactly(Int((try? file.size()) ?? 0), at: 0)).map {
                String(decoding: $0, as: UTF8.self).trimmingCharacters(in: "\n ")
            }
            file.close()
            if code == EWOULDBLOCK {
                let who = (current?.isEmpty ?? true) ? "another process" : current!
                throw VDError(.busy, "the data directory \(directory) is in use by \(who)")
            }
            throw Syscall.error("lock", path, errno: code)
        }
        var host = [UInt8](repeating: 0, count: 256)
        _ = host.withUnsafeMutableBufferPointer { gethostname(UnsafeMutableRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self), 255) }
        let hostName = String(decoding: host.prefix { $0 != 0 }, as: UTF8.self)
        let text = "\(holder) (pid \(getpid()) on \(hostName))\n"
        try file.truncate(to: 0)
        try file.write(Array(text.utf8), at: 0)
        self.file = file
    }

    /// Releases the lock (also released when the process exits).
    package func release() {
        _ = flock(file.fd, LOCK_UN)
        file.close()
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}
