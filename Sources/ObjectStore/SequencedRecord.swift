// Compare-and-swap on an object store that has no usable If-Match (the reference Ceph RGW refuses If-Match on PUT
// even with the current ETag, see docs/s3-backend.md) but enforces create-only writes: version N of a record is the
// object PREFIX + N (16 hex digits). Writing version N+1 is a create-only PUT, so of any writers that read version N,
// exactly one creates N+1 and the others get `.conflict`. The current version is the highest one listed. Old versions
// are deleted behind the writer (`prune`), keeping the newest few, so a reader between its listing and its GET still
// finds what it listed, or lists again.
//
// What a writer puts must differ from what any other writer could put for the same version (a node id, a nonce):
// a create-only PUT that meets the same bytes succeeds (that is how a retried PUT whose reply was lost succeeds).
//
// Pruning re-opens old names: a stale writer (one that was partitioned while others moved on) could create an old
// version number again after it was deleted. So a write lists the record after it succeeds, and a newer version than
// its own means it lost (`.conflict`); readers take the highest version, so the stale object changes nothing. (The
// deterministic lease simulation found this: a fenced owner "renewed" into a pruned version.)
//
// Meant for small records that change at human or lease pace (ownership of a volume), not for data.

public import NIOCore
public import VolumeCore

public struct SequencedRecord: Sendable {
    public let store: any ObjectStore
    /// Ends with "/": versions are PREFIX + 16 hex digits.
    public let prefix: String
    /// Versions kept below the newest by `prune`.
    public static let keptVersions: UInt64 = 4

    public init(store: any ObjectStore, prefix: String) {
        precondition(prefix.hasSuffix("/"), "a record prefix ends with /")
        self.store = store
        self.prefix = prefix
    }

    public func name(of version: UInt64) -> String { prefix + SCONumber(version).hex }

    /// Every version present, ascending.
    public func versions() async throws(VDError) -> [UInt64] {
        try await store.list(prefix: prefix).compactMap { info -> UInt64? in
            SCONumber(hex: info.name.dropFirst(prefix.count)).map(\.rawValue)
        }.sorted()
    }

    /// The newest version and its bytes; nil when the record was never written.
    public func read() async throws(VDError) -> (version: UInt64, data: ByteBuffer)? {
        for _ in 0..<8 {
            guard let newest = try await versions().last else { return nil }
            do {
                return (newest, try await store.get(name(of: newest)))
            } catch  where error.code == .notFound {
                continue  // pruned between the listing and the GET: list again
            }
        }
        throw VDError(.busy, "record \(prefix) changes faster than it can be read")
    }

    /// The newest version, decoded by `decode` (given its version and bytes); nil when the record was never written.
    /// Bytes damaged on the way (`decode` throws `.corrupt`) are read again, `attempts` times in all; an older version
    /// is never taken instead.
    public func readVerified<T>(
        attempts: Int = 4, _ decode: (UInt64, ByteBuffer) throws(VDError) -> T
    ) async throws(VDError) -> (version: UInt64, value: T)? {
        var attempt = 0
        while true {
            attempt += 1
            guard let (version, data) = try await read() else { return nil }
            do {
                return (version, try decode(version, data))
            } catch  where error.code == .corrupt && attempt < attempts {
                continue
            }
        }
    }

    /// Writes version `after + 1` (version 1 when `after` is nil: the record must not exist yet). `.conflict` when
    /// another writer created that version first; `.unsupported` on a store that does not enforce create-only.
    @discardableResult
    public func write(_ data: ByteBuffer, after: UInt64?) async throws(VDError) -> UInt64 {
        guard try await store.confirmsCreateOnly() else {
            throw VDError(
                .unsupported,
                "\(store.description) does not enforce create-only writes, which record \(prefix) needs (S3: signature V4 with create_only)"
            )
        }
        let version = (after ?? 0) + 1
        do {
            try await store.put(name(of: version), data: data)
        } catch  where error.code == .alreadyExists {
            throw VDError(.conflict, "record \(prefix): version \(version) was written by another writer first")
        }
        if let newest = try await versions().last, newest > version {
            throw VDError(
                .conflict, "record \(prefix): version \(version) is stale, version \(newest) was written since")
        }
        return version
    }

    /// Deletes versions older than `newest - keptVersions`.
    public func prune(newest: UInt64) async throws(VDError) {
        guard newest > Self.keptVersions else { return }
        for version in try await versions() where version < newest - Self.keptVersions {
            try await store.delete(name(of: version))
        }
    }
}
