// The in-memory twin of a backend, for unit tests and simulations: same contract, nothing persisted.

public import NIOCore
import Synchronization
public import VolumeCore

public final class MemoryStore: ObjectStore {
    private let objects = Mutex<[String: ByteBuffer]>([:])

    public init() {}

    public var description: String { "in-memory store" }
    public func confirmsCreateOnly() async throws(VDError) -> Bool { true }

    /// Create-only, like the other stores: the same bytes again succeed, other bytes are refused.
    public func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        let refused = objects.withLock { objects -> Bool in
            if let existing = objects[name] { return existing != data }
            objects[name] = data
            return false
        }
        if refused {
            throw VDError(.alreadyExists, "object \(name) already exists in the in-memory store with other content")
        }
    }

    public func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        objects.withLock { $0[name] = data }
    }

    public func get(_ name: String) async throws(VDError) -> ByteBuffer {
        try ObjectName.validate(name)
        guard let data = objects.withLock({ $0[name] }) else { throw .notFound("object \(name) does not exist") }
        return data
    }

    public func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        let data = try await get(name)
        try ObjectName.checkRange(range, size: UInt64(data.readableBytes), name: name)
        return data.getSlice(at: data.readerIndex + Int(range.lowerBound), length: range.count)!
    }

    public func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try ObjectName.validate(name)
        return objects.withLock { $0[name] }.map { ObjectInfo(name: name, sizeBytes: UInt64($0.readableBytes)) }
    }

    public func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        objects.withLock { objects in
            objects.filter { $0.key.hasPrefix(prefix) }
                .map { ObjectInfo(name: $0.key, sizeBytes: UInt64($0.value.readableBytes)) }
                .sorted { $0.name < $1.name }
        }
    }

    public func delete(_ name: String) async throws(VDError) {
        try ObjectName.validate(name)
        _ = objects.withLock { $0.removeValue(forKey: name) }
    }

    public func verifyAccess() async throws(VDError) {}

    /// Test hook: replaces an object's bytes without going through `put` (to simulate corruption).
    public func overwriteForTesting(_ name: String, data: ByteBuffer) {
        objects.withLock { $0[name] = data }
    }

    /// Names of all objects (tests).
    public var allNames: [String] { objects.withLock { $0.keys.sorted() } }
}
