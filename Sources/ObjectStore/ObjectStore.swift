// The backend contract. Every store (a local directory, S3 through libs3, the in-memory twin) passes the same
// contract suite. Object names are written once and never overwritten by VolumeDriver, which makes retries of a PUT
// with an unknown outcome, caches and eventual consistency safe.

import FlashIO
public import NIOCore
import NIOPosix
public import VolumeCore

/// One object in a listing.
public struct ObjectInfo: Sendable, Hashable {
    public var name: String
    public var sizeBytes: UInt64
    public init(name: String, sizeBytes: UInt64) {
        self.name = name
        self.sizeBytes = sizeBytes
    }
}

/// An object store. Names are `/`-separated paths of letters, digits and `._-` (see `ObjectName.validate`).
///
/// Errors: a missing object is `.notFound`; a range past the end of an object is `.outOfRange`; rejected credentials
/// are `.authentication`; a backend that keeps failing past the store's deadline is `.backend` or `.timeout`, with a
/// message naming the object.
public protocol ObjectStore: Sendable {
    /// For logs and messages: what and where the store is (never credentials).
    var description: String { get }
    /// Creates `name` with `data`. When this returns, the object is durable in the store. VolumeDriver never writes
    /// a name twice with other bytes (names are never reused), and every store that can enforces it (a local
    /// directory: link(); S3 with signature V4: If-None-Match; the in-memory and simulated stores) by refusing with
    /// `.alreadyExists`; writing the same bytes again succeeds. S3 with signature V2 cannot (libs3 sends no
    /// If-None-Match): `enforcesCreateOnly` tells.
    func put(_ name: String, data: ByteBuffer) async throws(VDError)
    /// Stores `data` under `name`, replacing what is there: only for the few objects that change in place (the
    /// scrub lease).
    func replace(_ name: String, data: ByteBuffer) async throws(VDError)
    /// The whole object.
    func get(_ name: String) async throws(VDError) -> ByteBuffer
    /// Bytes `range` of the object; exactly `range.count` bytes or an error.
    func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer
    /// Size of the object, or nil when it does not exist.
    func head(_ name: String) async throws(VDError) -> ObjectInfo?
    /// Every object whose name starts with `prefix`, sorted by name.
    func list(prefix: String) async throws(VDError) -> [ObjectInfo]
    /// Removes the object. Removing a missing object succeeds.
    func delete(_ name: String) async throws(VDError)
    /// The distinct first path components of the names under `prefix` (empty, or ending with "/"), sorted: what
    /// a listing with delimiter "/" returns. The default lists every name under the prefix; stores that can ask for
    /// only the components (S3's delimiter, a directory) override it.
    func listChildren(of prefix: String) async throws(VDError) -> [String]
    /// Whether `put` refuses other bytes under an existing name (what compare-and-swap by create-only names, as
    /// ownership records use, rests on), checked against the store itself where it could be wrong: an S3 server
    /// may ignore If-None-Match (rclone's does), so S3 stores probe it once.
    func confirmsCreateOnly() async throws(VDError) -> Bool
    /// Checks the store is reachable and usable (bucket exists, credentials accepted); the error says what to fix.
    func verifyAccess() async throws(VDError)
    /// Stores the first `length` bytes of the local file at `path` under `name`. The file must not change until
    /// this returns (VolumeDriver only uploads sealed, immutable files). The default reads the file into memory and
    /// calls `put`; stores that can do better (a hard link on the same file system) override it.
    func put(_ name: String, contentsOf path: String, length: UInt64) async throws(VDError)
}

extension ObjectStore {
    /// The store itself, without the wrappers that only measure it.
    public var unwrapped: any ObjectStore {
        if let instrumented = self as? InstrumentedObjectStore { return instrumented.underlying.unwrapped }
        return self
    }

    public func listChildren(of prefix: String) async throws(VDError) -> [String] {
        precondition(prefix.isEmpty || prefix.hasSuffix("/"), "listChildren takes a prefix ending with /")
        var children = Set<String>()
        for info in try await list(prefix: prefix) {
            if let first = info.name.dropFirst(prefix.count).split(separator: "/").first {
                children.insert(String(first))
            }
        }
        return children.sorted()
    }

    public func put(_ name: String, contentsOf path: String, length: UInt64) async throws(VDError) {
        let data = try await LocalFileReader.read(path: path, length: length)
        try await put(name, data: data)
    }
}

/// Reads local files off the caller's thread.
enum LocalFileReader {
    static func read(path: String, length: UInt64) async throws(VDError) -> ByteBuffer {
        let result: Result<ByteBuffer, VDError>
        do {
            result = try await NIOThreadPool.singleton.runIfActive { () -> Result<ByteBuffer, VDError> in
                do throws(VDError) {
                    let file = try FlashFile(path: path, options: .readOnly)
                    defer { file.close() }
                    var buffer = ByteBufferAllocator().buffer(capacity: Int(length))
                    let n = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) {
                        (raw) throws(VDError) -> Int in
                        try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(length)]), at: 0)
                    }
                    guard n == Int(length) else {
                        throw VDError(.corrupt, "\(path) is \(n) bytes, expected \(length)")
                    }
                    return .success(buffer)
                } catch {
                    return .failure(error)
                }
            }
        } catch {
            throw VDError(.shutdown, "cannot read \(path): the I/O thread pool is shut down")
        }
        return try result.get()
    }
}

public enum ObjectName {
    public static let lengthMax = 512

    /// Throws `.invalidArgument` unless `name` is a relative path of safe components.
    public static func validate(_ name: String) throws(VDError) {
        guard !name.isEmpty, name.utf8.count <= lengthMax else {
            throw .invalidArgument("object name '\(name)' is empty or longer than \(lengthMax) bytes")
        }
        for component in name.split(separator: "/", omittingEmptySubsequences: false) {
            guard !component.isEmpty, component != ".", component != ".." else {
                throw .invalidArgument("object name '\(name)' has an empty, '.' or '..' component")
            }
            for byte in component.utf8 {
                let ok =
                    (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                    || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                    || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                    || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
                    || byte == UInt8(ascii: "@")
                guard ok else {
                    throw .invalidArgument("object name '\(name)' has a character other than [A-Za-z0-9._@-/]")
                }
            }
        }
    }

    /// Checks a range request against an object size.
    public static func checkRange(_ range: Range<UInt64>, size: UInt64, name: String) throws(VDError) {
        guard range.upperBound <= size else {
            throw .outOfRange(
                "range \(range.lowerBound)..<\(range.upperBound) is past the end of \(name) (\(size) bytes)")
        }
    }
}
