// What a volume, the router and the scrubber take from the world, behind interfaces with a real implementation and
// a simulated one (the VolumeSimulation target): time, randomness, where tasks and blocking work run, and the map's
// key-value store. The file system is next to them in FlashIO (`FileSystem`); `Environment` (FlashIO) bundles all.
//
// Nothing in the storage engine reads the system clock, the system random generator or starts an unstructured Task
// directly: a seeded simulation replays any run exactly, in virtual time, only if every such call goes through here.

public import FoundationEssentials

/// A point in monotonic time (a duration since an arbitrary origin of the clock that produced it).
public struct MonotonicInstant: Comparable, Hashable, Sendable, CustomStringConvertible {
    public var sinceOrigin: Duration
    public init(sinceOrigin: Duration) { self.sinceOrigin = sinceOrigin }
    public static func < (a: MonotonicInstant, b: MonotonicInstant) -> Bool { a.sinceOrigin < b.sinceOrigin }
    public static func + (a: MonotonicInstant, b: Duration) -> MonotonicInstant {
        MonotonicInstant(sinceOrigin: a.sinceOrigin + b)
    }
    public func duration(to later: MonotonicInstant) -> Duration { later.sinceOrigin - sinceOrigin }
    public var description: String { "\(sinceOrigin)" }
}

extension Duration {
    /// The duration in seconds, as a Double.
    public var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
    /// A duration from seconds (negative values become zero).
    public static func seconds(double value: Double) -> Duration { .nanoseconds(Int64(max(0, value) * 1e9)) }
}

/// Monotonic time, wall-clock time and sleeping.
public protocol VDClock: Sendable {
    /// Monotonic now (never goes back; unrelated to the wall clock).
    func now() -> MonotonicInstant
    /// Wall-clock now (for records other hosts read: leases, creation times).
    func wallNow() -> Date
    /// Suspends for `duration` (returns early when the task is cancelled).
    func sleep(for duration: Duration) async
}

/// The system clocks.
public struct SystemClock: VDClock {
    private static let origin = ContinuousClock.now
    public init() {}
    public func now() -> MonotonicInstant { MonotonicInstant(sinceOrigin: Self.origin.duration(to: .now)) }
    public func wallNow() -> Date { Date() }
    public func sleep(for duration: Duration) async {
        guard duration > .zero else { return }
        try? await Task.sleep(for: duration)
    }
}

/// A source of random numbers (seeded in simulations).
public protocol RandomSource: Sendable {
    func next() -> UInt64
}

extension RandomSource {
    /// A uniform Double in `range`.
    public func double(in range: ClosedRange<Double>) -> Double {
        let unit = Double(next() >> 11) / Double(1 << 53)
        return range.lowerBound + unit * (range.upperBound - range.lowerBound)
    }

    /// A uniform integer below `bound` (> 0).
    public func below(_ bound: UInt64) -> UInt64 {
        precondition(bound > 0, "an empty range has no random element")
        return next() % bound
    }

    /// 16 hex digits, for temporary names.
    public func hexToken() -> String {
        let digits = String(next(), radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
}

/// The operating system's generator.
public struct SystemRandom: RandomSource {
    public init() {}
    public func next() -> UInt64 {
        var generator = SystemRandomNumberGenerator()
        return generator.next()
    }
}

/// Where background tasks and blocking file work run.
public protocol TaskRunner: Sendable {
    /// Starts a background task (real: an unstructured Task; simulated: a task of the simulated process).
    @discardableResult
    func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never>
    /// Runs blocking work (file I/O that may wait on the device) off the cooperative threads and event loops.
    func blocking<T: Sendable>(_ body: @escaping @Sendable () throws(VDError) -> T) async throws(VDError) -> T
    /// A named crash point: a test may end the process here (see `Failpoint`).
    func failpoint(_ name: String)
    /// An invariant does not hold: the process must not go on (real: a fatal error with the message; simulated: the
    /// run fails with it and the process is killed).
    func invariantFailed(_ message: String)
}

extension TaskRunner {
    /// Checks an invariant whose failure means data could be lost if the process went on.
    public func check(_ condition: Bool, _ message: @autoclosure () -> String) {
        if !condition { invariantFailed(message()) }
    }
}

// MARK: the map's key-value store

/// An atomic group of puts and deletes for a `KeyValueStore`. Not thread-safe.
public protocol KeyValueBatch: AnyObject {
    func put(_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer)
    func delete(_ key: UnsafeRawBufferPointer)
    var count: Int { get }
}

extension KeyValueBatch {
    public func put(_ key: [UInt8], _ value: [UInt8]) {
        key.withUnsafeBytes { k in value.withUnsafeBytes { v in put(k, v) } }
    }
    public func delete(_ key: [UInt8]) { key.withUnsafeBytes { delete($0) } }
}

/// A consistent read view of a `KeyValueStore` (later writes are not seen). Release it when done.
public protocol KeyValueSnapshot: Sendable {
    func get(_ key: [UInt8]) throws(VDError) -> [UInt8]?
    func scan(
        from start: [UInt8], to end: [UInt8],
        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError)
    func release()
}

/// An ordered key-value store (RocksDB in production) used without a write-ahead log: every write is lost on a
/// crash until `flush()` made it durable, except that the store may also flush on its own at any moment (RocksDB
/// flushes full memtables), always as a prefix of the writes in order.
public protocol KeyValueStore: Sendable {
    var path: String { get }
    func get(_ key: [UInt8]) throws(VDError) -> [UInt8]?
    func get(_ key: UnsafeRawBufferPointer) throws(VDError) -> [UInt8]?
    func makeBatch() -> any KeyValueBatch
    /// Applies a batch from `makeBatch()` atomically.
    func write(_ batch: any KeyValueBatch) throws(VDError)
    /// Calls `body(key, value)` for keys in `[start, end)` in order until it returns false.
    func scan(
        from start: [UInt8], to end: [UInt8],
        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError)
    /// A read view frozen at this moment.
    func snapshot() throws(VDError) -> any KeyValueSnapshot
    /// Makes every write so far durable.
    func flush() throws(VDError)
    /// Flushes and closes.
    func close()
}

/// Opens and destroys key-value stores by path.
public protocol KeyValueStoreFactory: Sendable {
    func open(path: String) throws(VDError) -> any KeyValueStore
    /// Removes a closed store's files.
    func destroy(path: String) throws(VDError)
    /// Whether a store exists at `path`.
    func exists(path: String) -> Bool
}
