// The simulated backend: an in-memory object store shared by every simulated node, reached with virtual-time
// latency (so requests complete out of order) and seeded faults: a request that fails before it is performed, one
// that is performed and then reported failed (an unknown outcome: a PUT that landed, a DELETE that happened), a GET
// whose bytes come back corrupted or cut short, outages during which every request fails, and (for the names a
// simulation selects) a write that times out for the client and that the store performs later.
//
// Like S3Store, it retries failed attempts itself (up to 10, exponential backoff with full jitter, in virtual time)
// and reports an error only when they are used up: callers see what they would see over S3.

package import NIOCore
package import ObjectStore
package import VolumeCore

package final class SimObjectStore: ObjectStore, @unchecked Sendable {
    package struct Faults: Sendable {
        package var failBefore = 0.0
        package var failAfter = 0.0
        package var corruptRead = 0.0
        package var truncateRead = 0.0
        /// Upper bound of the usual latency; one request in 50 takes up to `slowLatency`.
        package var latency: Duration = .milliseconds(20)
        package var slowLatency: Duration = .seconds(3)
        /// A write to a name `lateWrites` selects times out for the client, and the store performs it up to
        /// `slowLatency` later (a request held in the network or the server): a retry may land before it.
        package var lateWrite = 0.0
        package init() {}
    }

    let scheduler: SimScheduler
    package var faults = Faults()
    /// While true every request fails (the backend is unreachable).
    package var outage = false
    /// Requests on names starting with one of these fail (a store that refuses one kind of object).
    package var failingPrefixes: Set<String> = []
    /// Object names under which uploads (PUT) fail; reads and listings work (uploads that cannot get through).
    package var failingPutPrefixes: Set<String> = []
    /// Names where several writers race to create the same name on purpose (compare-and-swap records): a refused
    /// create there is the expected outcome, not a broken invariant.
    package var contendedPrefixes: Set<String> = []
    /// Which writes may arrive late (`Faults.lateWrite`): records that change, whose late copy must never win.
    package var lateWrites: @Sendable (String) -> Bool = { _ in false }
    /// Performs the writes that arrive late (the store itself: never killed).
    private lazy var backend = scheduler.makeProcess("backend")
    private var objects: [String: ByteBuffer] = [:]
    package private(set) var requests = 0
    package private(set) var injectedFaults = 0

    package init(scheduler: SimScheduler) { self.scheduler = scheduler }

    package var description: String { "simulated store" }
    package func confirmsCreateOnly() async throws(VDError) -> Bool { true }

    /// Frees every object (the run is over).
    package func releaseAll() { objects = [:] }

    /// Every object name (for checks).
    package var names: [String] { objects.keys.sorted() }
    package func peek(_ name: String) -> ByteBuffer? { objects[name] }
    /// Test hook: replaces or removes an object directly.
    package func plant(_ name: String, _ data: ByteBuffer?) { objects[name] = data }

    private func delay() async {
        let bound = scheduler.chance(0.02) ? faults.slowLatency : faults.latency
        let nanoseconds = bound.components.seconds * 1_000_000_000 + bound.components.attoseconds / 1_000_000_000
        await scheduler.sleep(for: .nanoseconds(Int64(scheduler.below(max(1, Int(nanoseconds))))))
    }

    /// Runs a request with S3Store's retry policy: attempts that fail with `.backend` are repeated.
    private func request<T>(
        _ what: String, _ name: String, late: (() -> Void)? = nil, _ perform: () throws(VDError) -> T
    ) async throws(VDError) -> T {
        var attempt = 0
        while true {
            attempt += 1
            do throws(VDError) {
                return try await self.attempt(what, name, late: late, perform)
            } catch  where error.code == .backend && attempt < Self.attemptsMax {
                let cap = min(2.0, 0.05 * Double(1 << min(attempt - 1, 20)))
                await scheduler.sleep(
                    for: .seconds(double: Double(scheduler.nextRandom() >> 11) / Double(1 << 53) * cap))
            }
        }
    }

    static let attemptsMax = 10

    /// One attempt: latency, maybe a failure before, the effect, latency, maybe a failure after.
    private func attempt<T>(
        _ what: String, _ name: String, late: (() -> Void)?, _ perform: () throws(VDError) -> T
    ) async throws(VDError) -> T {
        requests += 1
        await delay()
        if outage {
            throw VDError(.backend, "simulated store: \(what) \(name): the backend is unreachable")
        }
        if failingPrefixes.contains(where: { name.hasPrefix($0) })
            || (what == "PUT" && failingPutPrefixes.contains(where: { name.hasPrefix($0) }))
        {
            throw VDError(.backend, "simulated store: \(what) \(name): 500 Internal Server Error")
        }
        if scheduler.chance(faults.failBefore) {
            injectedFaults += 1
            throw VDError(.backend, "simulated store: \(what) \(name): 503 Slow Down")
        }
        if let process = scheduler.currentProcess, !process.isAlive {
            throw VDError(.io, "\(process.name) is gone")
        }
        if let late, lateWrites(name), scheduler.chance(faults.lateWrite) {
            injectedFaults += 1
            let held = Duration.nanoseconds(
                Int64(scheduler.below(Int(faults.slowLatency.components.seconds) * 1_000_000_000 + 1)))
            scheduler.addTimer(after: held, process: backend, late)
            await delay()
            throw VDError(.backend, "simulated store: \(what) \(name): timed out (the store may still perform it)")
        }
        let result = try perform()
        await delay()
        if scheduler.chance(faults.failAfter) {
            injectedFaults += 1
            throw VDError(.backend, "simulated store: \(what) \(name): connection reset after the request was sent")
        }
        return result
    }

    /// Create-only, like S3 with signature V4 (If-None-Match): the same bytes again succeed (an upload repeated after
    /// a crash); other bytes under an existing name are refused and reported as a broken invariant (VolumeDriver never
    /// reuses a name).
    package func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        // Arriving late, a create that finds the name taken is refused with nobody to tell.
        try await request("PUT", name, late: { [self] in if objects[name] == nil { objects[name] = data } }) {
            () throws(VDError) in
            if let existing = objects[name], existing != data {
                if !contendedPrefixes.contains(where: { name.hasPrefix($0) }) {
                    scheduler.reportInvariantFailure(
                        "object \(name) written again with other bytes (names are never reused)")
                }
                throw VDError(.alreadyExists, "object \(name) already exists with other content")
            }
            objects[name] = data
        }
    }

    package func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        try await request("PUT", name, late: { [self] in objects[name] = data }) { () throws(VDError) in
            objects[name] = data
        }
    }

    package func get(_ name: String) async throws(VDError) -> ByteBuffer {
        try ObjectName.validate(name)
        let data = try await request("GET", name) { () throws(VDError) -> ByteBuffer in
            guard let data = objects[name] else { throw .notFound("object \(name) does not exist") }
            return data
        }
        return damaged(data)
    }

    package func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        try ObjectName.validate(name)
        let data = try await request("GET", name) { () throws(VDError) -> ByteBuffer in
            guard let data = objects[name] else { throw .notFound("object \(name) does not exist") }
            try ObjectName.checkRange(range, size: UInt64(data.readableBytes), name: name)
            return data.getSlice(at: data.readerIndex + Int(range.lowerBound), length: range.count)!
        }
        return damaged(data)
    }

    /// A GET's bytes as the network delivered them.
    private func damaged(_ data: ByteBuffer) -> ByteBuffer {
        guard data.readableBytes > 0 else { return data }
        if scheduler.chance(faults.corruptRead) {
            injectedFaults += 1
            var copy = ByteBuffer(bytes: Array(data.readableBytesView))
            let index = scheduler.below(copy.readableBytes)
            copy.setInteger(~copy.getInteger(at: index, as: UInt8.self)!, at: index)
            return copy
        }
        if scheduler.chance(faults.truncateRead) {
            injectedFaults += 1
            return data.getSlice(at: data.readerIndex, length: scheduler.below(data.readableBytes))!
        }
        return data
    }

    package func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try ObjectName.validate(name)
        return try await request("HEAD", name) { () throws(VDError) -> ObjectInfo? in
            objects[name].map { ObjectInfo(name: name, sizeBytes: UInt64($0.readableBytes)) }
        }
    }

    package func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        try await request("LIST", prefix) { () throws(VDError) -> [ObjectInfo] in
            objects.filter { $0.key.hasPrefix(prefix) }
                .map { ObjectInfo(name: $0.key, sizeBytes: UInt64($0.value.readableBytes)) }
                .sorted { $0.name < $1.name }
        }
    }

    package func delete(_ name: String) async throws(VDError) {
        try ObjectName.validate(name)
        try await request("DELETE", name) { () throws(VDError) in objects[name] = nil }
    }

    package func verifyAccess() async throws(VDError) {
        try await request("HEAD", "bucket") { () throws(VDError) in }
    }
}
