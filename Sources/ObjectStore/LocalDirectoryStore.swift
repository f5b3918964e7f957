// The embedded default backend: objects are files under a directory (`name` a/b/c is ROOT/a/b/c). A PUT writes a
// temporary file, fsyncs it, hard-links it into place and fsyncs the directory, so an object is either absent or whole
// and durable, also across power loss. The link never replaces an existing name: PUT is create-only, like S3 with
// If-None-Match (the same bytes again succeed: a repeated upload; other bytes are refused). `replace` (the few objects
// that change in place) renames over the name instead. Blocking file I/O runs on the store's own thread pool, never on
// an event loop.

import FlashIO
public import NIOCore
import NIOPosix
public import VolumeCore

public final class LocalDirectoryStore: ObjectStore {
    public let root: String
    private let pool: NIOThreadPool

    /// Opens (and creates if needed) a store rooted at `root`. `threads` bounds concurrent file operations.
    public init(root: String, threads: Int = 4) throws(VDError) {
        var root = root
        while root.count > 1 && root.hasSuffix("/") { root.removeLast() }
        self.root = root
        try Syscall.makeDirectories(root)
        pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
    }

    deinit {
        pool.shutdownGracefully { _ in }
    }

    public var description: String { "local directory \(root)" }
    public func confirmsCreateOnly() async throws(VDError) -> Bool { true }

    private func path(_ name: String) throws(VDError) -> String {
        try ObjectName.validate(name)
        return root + "/" + name
    }

    private func run<T: Sendable>(_ body: @escaping @Sendable () throws(VDError) -> T) async throws(VDError) -> T {
        let result: Result<T, VDError>
        do {
            result = try await pool.runIfActive { () -> Result<T, VDError> in
                do throws(VDError) { return .success(try body()) } catch { return .failure(error) }
            }
        } catch {
            throw VDError(.shutdown, "the local directory store at \(root) is shut down")
        }
        return try result.get()
    }

    /// Writes a temporary file and renames it over the name: an object that changes in place (the scrub lease).
    public func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        let target = try path(name)
        let directory = String(target[..<target.lastIndex(of: "/")!])
        try await run { () throws(VDError) in
            try Syscall.makeDirectories(directory)
            let temporary = try Self.writeTemporary(data, in: directory)
            do throws(VDError) {
                try Syscall.rename(temporary, target)
            } catch {
                try? Syscall.unlinkIfPresent(temporary)
                throw error
            }
            try Syscall.syncDirectory(directory)
        }
    }

    /// Create-only: the temporary file is hard-linked as the name, which fails if the name exists.
    public func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        let target = try path(name)
        let directory = String(target[..<target.lastIndex(of: "/")!])
        let description = self.description
        try await run { () throws(VDError) in
            try Syscall.makeDirectories(directory)
            let temporary = try Self.writeTemporary(data, in: directory)
            defer { try? Syscall.unlinkIfPresent(temporary) }
            try Self.install(temporary, as: target, name: name, store: description)
            try Syscall.syncDirectory(directory)
        }
    }

    /// A temporary file next to the target holding `data`, synced.
    private static func writeTemporary(_ data: ByteBuffer, in directory: String) throws(VDError) -> String {
        let temporary = directory + "/.tmp-" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
        do throws(VDError) {
            let file = try FlashFile(path: temporary, options: [.create, .exclusive])
            defer { file.close() }
            try data.withUnsafeReadableBytes { (bytes) throws(VDError) in try file.write(bytes, at: 0) }
            try file.sync()
        } catch {
            try? Syscall.unlinkIfPresent(temporary)
            throw error
        }
        return temporary
    }

    /// Links `source` (a complete, synced file) as `target` unless `target` exists; an existing `target` with the same
    /// bytes is success (a repeated upload), with other bytes `.alreadyExists`.
    private static func install(_ source: String, as target: String, name: String, store: String) throws(VDError) {
        let result = Syscall.linkNoReplace(source, target)
        if result == 0 { return }
        guard result == EEXIST else { throw Syscall.error("link", target, errno: result) }
        guard try sameContent(source, target) else {
            throw VDError(
                .alreadyExists,
                "object \(name) already exists in \(store) with other content: objects are never overwritten")
        }
    }

    private static func sameContent(_ a: String, _ b: String) throws(VDError) -> Bool {
        let first = try FlashFile(path: a, options: .readOnly)
        defer { first.close() }
        let second = try FlashFile(path: b, options: .readOnly)
        defer { second.close() }
        let size = try first.size()
        guard try second.size() == size else { return false }
        var offset: UInt64 = 0
        while offset < size {
            let count = min(size - offset, 1 << 20)
            guard try read(first, range: offset..<(offset + count)) == read(second, range: offset..<(offset + count))
            else { return false }
            offset += count
        }
        return true
    }

    /// A hard link when the file is on the store's file system (no copy: the file is immutable), else a copy;
    /// either way fsynced and renamed into place like `put`.
    public func put(_ name: String, contentsOf path: String, length: UInt64) async throws(VDError) {
        let target = try self.path(name)
        let directory = String(target[..<target.lastIndex(of: "/")!])
        let description = self.description
        try await run { () throws(VDError) in
            try Syscall.makeDirectories(directory)
            let source = try FlashFile(path: path, options: .readOnly)
            defer { source.close() }
            guard try source.size() == length else {
                throw VDError(
                    .invalidArgument, "\(path) is not \(length) bytes long; only whole sealed files are uploaded")
            }
            let temporary = directory + "/.tmp-" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
            defer { try? Syscall.unlinkIfPresent(temporary) }
            if !Syscall.link(path, temporary) {
                let copy = try FlashFile(path: temporary, options: [.create, .exclusive])
                defer { copy.close() }
                try Syscall.copyFile(from: source.fd, to: copy.fd, length: length, path: temporary)
                try copy.sync()
            }
            try Self.install(temporary, as: target, name: name, store: description)
            try Syscall.syncDirectory(directory)
        }
    }

    public func get(_ name: String) async throws(VDError) -> ByteBuffer {
        let target = try path(name)
        return try await run { () throws(VDError) -> ByteBuffer in
            let file: FlashFile
            do throws(VDError) {
                file = try FlashFile(path: target, options: .readOnly)
            } catch  where error.code == .notFound {
                throw .notFound("object \(name) does not exist in \(self.description)")
            }
            defer { file.close() }
            let size = try file.size()
            return try Self.read(file, range: 0..<size)
        }
    }

    public func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        let target = try path(name)
        return try await run { () throws(VDError) -> ByteBuffer in
            let file: FlashFile
            do throws(VDError) {
                file = try FlashFile(path: target, options: .readOnly)
            } catch  where error.code == .notFound {
                throw .notFound("object \(name) does not exist in \(self.description)")
            }
            defer { file.close() }
            try ObjectName.checkRange(range, size: try file.size(), name: name)
            return try Self.read(file, range: range)
        }
    }

    private static func read(_ file: FlashFile, range: Range<UInt64>) throws(VDError) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: range.count)
        let n = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: range.count) {
            (raw) throws(VDError) -> Int in
            try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<range.count]), at: range.lowerBound)
        }
        guard n == range.count else {
            throw VDError(.corrupt, "\(file.path) is shorter than expected (\(n) of \(range.count) bytes)")
        }
        return buffer
    }

    public func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        let target = try path(name)
        return try await run { () throws(VDError) -> ObjectInfo? in
            let file: FlashFile
            do throws(VDError) {
                file = try FlashFile(path: target, options: .readOnly)
            } catch  where error.code == .notFound {
                return nil
            }
            defer { file.close() }
            return ObjectInfo(name: name, sizeBytes: try file.size())
        }
    }

    public func listChildren(of prefix: String) async throws(VDError) -> [String] {
        precondition(prefix.isEmpty || prefix.hasSuffix("/"), "listChildren takes a prefix ending with /")
        let directory = prefix.isEmpty ? root : root + "/" + prefix.dropLast()
        return try await run { () throws(VDError) -> [String] in
            guard Syscall.isDirectory(directory) else { return [] }
            return try Syscall.listDirectory(directory).filter { !$0.hasPrefix(".tmp-") && !$0.hasPrefix(".") }.sorted()
        }
    }

    public func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        let root = self.root
        return try await run { () throws(VDError) -> [ObjectInfo] in
            // Walk only the directory that can hold the prefix.
            let directoryPart = prefix.lastIndex(of: "/").map { String(prefix[..<$0]) } ?? ""
            var results: [ObjectInfo] = []
            try Self.walk(root: root, relative: directoryPart, prefix: prefix, into: &results)
            return results.sorted { $0.name < $1.name }
        }
    }

    private static func walk(
        root: String, relative: String, prefix: String, into results: inout [ObjectInfo]
    )
        throws(VDError)
    {
        let directory = relative.isEmpty ? root : root + "/" + relative
        for entry in try Syscall.listDirectory(directory) where !entry.hasPrefix(".tmp-") {
            let name = relative.isEmpty ? entry : relative + "/" + entry
            let full = root + "/" + name
            if Syscall.isDirectory(full) {
                if name.hasPrefix(prefix) || prefix.hasPrefix(name + "/") {
                    try walk(root: root, relative: name, prefix: prefix, into: &results)
                }
            } else if name.hasPrefix(prefix) {
                let file = try FlashFile(path: full, options: .readOnly)
                defer { file.close() }
                results.append(ObjectInfo(name: name, sizeBytes: try file.size()))
            }
        }
    }

    public func delete(_ name: String) async throws(VDError) {
        let target = try path(name)
        try await run { () throws(VDError) in try Syscall.unlinkIfPresent(target) }
    }

    public func verifyAccess() async throws(VDError) {
        let root = self.root
        try await run { () throws(VDError) in
            guard Syscall.isDirectory(root) else {
                throw VDError(.configuration, "the backend directory \(root) does not exist or is not a directory")
            }
            let probe = root + "/.tmp-probe-" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
            do throws(VDError) {
                let file = try FlashFile(path: probe, options: [.create, .exclusive])
                file.close()
                try Syscall.unlinkIfPresent(probe)
            } catch {
                throw VDError(error.code, "the backend directory \(root) is not writable: \(error.message)")
            }
        }
    }
}
