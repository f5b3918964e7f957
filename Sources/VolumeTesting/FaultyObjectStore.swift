// An ObjectStore wrapper that misbehaves on purpose, for tests and seeded simulations of the layers above the store
// (upload queues, the read path, scrubbing): scripted faults ("fail the next 3 PUTs with .backend", "stall the next GET
// for 2 s", "flip a byte of the next GET", "cut the next GET short", "store the next PUT but report failure") and
// seeded random failures. Every random choice comes from one seeded generator, so a failing run is replayed by its
// seed (`seed` is in every applied-fault record).

public import NIOCore
public import ObjectStore
import Synchronization
public import VolumeCore

/// A small deterministic generator (SplitMix64) for seeded tests.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Wraps any store and injects scripted or seeded random faults.
public final class FaultyObjectStore: ObjectStore {
    /// The store operations faults can target.
    public enum Operation: String, Sendable, Hashable, CaseIterable {
        case put, get, getRange, head, list, delete, verifyAccess
    }

    /// One fault.
    public enum Fault: Sendable, Equatable {
        /// The operation fails with the error; the wrapped store is not called.
        case fail(VDError)
        /// The operation waits this long, then runs normally.
        case stall(seconds: Double)
        /// A GET returns the right length with one byte (at a seeded position) inverted.
        case corruptReturnedBytes
        /// A GET returns a seeded, strictly shorter prefix of the data.
        case truncateReturnedBytes
        /// The operation runs on the wrapped store (a PUT is stored), then fails with the error: an outcome the
        /// caller cannot know.
        case failAfterPerforming(VDError)
    }

    /// A fault that was applied: to which operation and object.
    public struct AppliedFault: Sendable, Equatable {
        public var operation: Operation
        public var name: String
        public var fault: Fault
    }

    private struct Rule {
        var fault: Fault
        var remaining: Int
        var operations: Set<Operation>
        var namePrefix: String?
    }

    private struct State {
        var rules: [Rule] = []
        var random: SeededRandom
        var randomFailure: (probability: Double, error: VDError, operations: Set<Operation>)?
        var applied: [AppliedFault] = []
    }

    /// Bound on scripted rules and on the applied-fault record.
    public static let rulesMax = 1024
    public static let appliedRecordMax = 100_000

    public let wrapped: any ObjectStore
    public let seed: UInt64
    private let state: Mutex<State>

    public init(wrapping store: any ObjectStore, seed: UInt64 = 1) {
        wrapped = store
        self.seed = seed
        state = Mutex(State(random: SeededRandom(seed: seed)))
    }

    public var description: String { "faulty(seed \(seed)) \(wrapped.description)" }
    public func confirmsCreateOnly() async throws(VDError) -> Bool { try await wrapped.confirmsCreateOnly() }

    /// Applies `fault` to the next `count` operations among `operations` on names starting with `namePrefix`.
    public func inject(
        _ fault: Fault, count: Int = 1, on operations: Set<Operation> = Set(Operation.allCases),
        namePrefix: String? = nil
    ) {
        precondition(count > 0, "a fault must apply to at least one operation")
        state.withLock { state in
            precondition(state.rules.count < Self.rulesMax, "more than \(Self.rulesMax) fault rules")
            state.rules.append(Rule(fault: fault, remaining: count, operations: operations, namePrefix: namePrefix))
        }
    }

    /// Makes each of `operations` fail with `error` with `probability`, drawn from the seeded generator.
    /// `probability` 0 turns random failures off.
    public func failRandomly(
        probability: Double, with error: VDError, on operations: Set<Operation> = Set(Operation.allCases)
    ) {
        precondition((0...1).contains(probability), "a probability is in 0...1")
        state.withLock { $0.randomFailure = probability > 0 ? (probability, error, operations) : nil }
    }

    /// Removes scripted and random faults.
    public func clearFaults() {
        state.withLock {
            $0.rules.removeAll()
            $0.randomFailure = nil
        }
    }

    /// Faults applied so far, in order.
    public var appliedFaults: [AppliedFault] { state.withLock { $0.applied } }

    private func take(_ operation: Operation, _ name: String) -> Fault? {
        state.withLock { state -> Fault? in
            var chosen: Fault?
            if let index = state.rules.firstIndex(where: {
                $0.operations.contains(operation) && ($0.namePrefix.map { name.hasPrefix($0) } ?? true)
            }) {
                chosen = state.rules[index].fault
                state.rules[index].remaining -= 1
                if state.rules[index].remaining == 0 { state.rules.remove(at: index) }
            } else if let random = state.randomFailure, random.operations.contains(operation),
                Double.random(in: 0..<1, using: &state.random) < random.probability
            {
                chosen = .fail(random.error)
            }
            if let chosen, state.applied.count < Self.appliedRecordMax {
                state.applied.append(AppliedFault(operation: operation, name: name, fault: chosen))
            }
            return chosen
        }
    }

    private func randomIndex(below count: Int) -> Int {
        state.withLock { Int.random(in: 0..<count, using: &$0.random) }
    }

    /// Runs `body` under the fault chosen for this operation.
    private func run<T>(
        _ operation: Operation, _ name: String, _ body: () async throws(VDError) -> T
    ) async throws(VDError) -> T {
        switch take(operation, name) {
        case .fail(let error)?:
            throw error
        case .stall(let seconds)?:
            try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
            return try await body()
        case .failAfterPerforming(let error)?:
            _ = try await body()
            throw error
        case .corruptReturnedBytes?:
            let value = try await body()
            guard var buffer = value as? ByteBuffer, buffer.readableBytes > 0 else { return value }
            let index = buffer.readerIndex + randomIndex(below: buffer.readableBytes)
            buffer.setInteger(~buffer.getInteger(at: index, as: UInt8.self)!, at: index)
            return buffer as! T
        case .truncateReturnedBytes?:
            let value = try await body()
            guard let buffer = value as? ByteBuffer, buffer.readableBytes > 0 else { return value }
            let kept = randomIndex(below: buffer.readableBytes)
            return buffer.getSlice(at: buffer.readerIndex, length: kept)! as! T
        case nil:
            return try await body()
        }
    }

    public func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try await run(.put, name) { () async throws(VDError) in try await wrapped.put(name, data: data) }
    }

    public func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        try await run(.put, name) { () async throws(VDError) in try await wrapped.replace(name, data: data) }
    }

    public func get(_ name: String) async throws(VDError) -> ByteBuffer {
        try await run(.get, name) { () async throws(VDError) in try await wrapped.get(name) }
    }

    public func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        try await run(.getRange, name) { () async throws(VDError) in try await wrapped.get(name, range: range) }
    }

    public func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try await run(.head, name) { () async throws(VDError) in try await wrapped.head(name) }
    }

    public func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        try await run(.list, prefix) { () async throws(VDError) in try await wrapped.list(prefix: prefix) }
    }

    public func delete(_ name: String) async throws(VDError) {
        try await run(.delete, name) { () async throws(VDError) in try await wrapped.delete(name) }
    }

    public func verifyAccess() async throws(VDError) {
        try await run(.verifyAccess, "") { () async throws(VDError) in try await wrapped.verifyAccess() }
    }
}
