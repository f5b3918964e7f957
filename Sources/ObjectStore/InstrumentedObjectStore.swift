// Backend request metrics: a store that counts and times every request of the store it wraps, through swift-metrics
// (labels: backend NAME, operation put|replace|get|head|list|delete|verify):
//   vd_backend_requests_total, vd_backend_request_duration_seconds (histogram), vd_backend_request_errors_total
//   (also labelled with the error code), vd_backend_sent_bytes_total, vd_backend_received_bytes_total.
// A request is what VolumeDriver asked of the store; the store's own retries of it are inside its duration.

import CoreMetrics
public import NIOCore
public import VolumeCore

public struct InstrumentedObjectStore: ObjectStore {
    private struct Operation: Sendable {
        let name: String
        let count: Counter
        let duration: Timer
    }

    private let wrapped: any ObjectStore
    private let backendName: String
    private let operations: [String: Operation]
    private let sent: Counter
    private let received: Counter

    public init(_ wrapped: any ObjectStore, name: String) {
        self.wrapped = wrapped
        backendName = name
        var operations: [String: Operation] = [:]
        for operation in ["put", "replace", "get", "head", "list", "delete", "verify"] {
            let dimensions = [("backend", name), ("operation", operation)]
            operations[operation] = Operation(
                name: operation, count: Counter(label: "vd_backend_requests_total", dimensions: dimensions),
                duration: Timer(
                    label: "vd_backend_request_duration_seconds", dimensions: dimensions,
                    preferredDisplayUnit: .seconds))
        }
        self.operations = operations
        sent = Counter(label: "vd_backend_sent_bytes_total", dimensions: [("backend", name)])
        received = Counter(label: "vd_backend_received_bytes_total", dimensions: [("backend", name)])
    }

    public var description: String { wrapped.description }
    public func confirmsCreateOnly() async throws(VDError) -> Bool { try await wrapped.confirmsCreateOnly() }

    /// The store this one measures.
    public var underlying: any ObjectStore { wrapped }

    private func measure<T>(
        _ name: String, _ body: () async throws(VDError) -> T
    ) async throws(VDError) -> T {
        let operation = operations[name]!
        let start = ContinuousClock.now
        defer {
            let (seconds, attoseconds) = (ContinuousClock.now - start).components
            operation.count.increment()
            operation.duration.recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
        }
        do {
            return try await body()
        } catch {
            Counter(
                label: "vd_backend_request_errors_total",
                dimensions: [("backend", backendName), ("operation", name), ("code", "\(error.code)")]
            ).increment()
            throw error
        }
    }

    public func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try await measure("put") { () async throws(VDError) in try await wrapped.put(name, data: data) }
        sent.increment(by: data.readableBytes)
    }

    public func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        try await measure("replace") { () async throws(VDError) in try await wrapped.replace(name, data: data) }
        sent.increment(by: data.readableBytes)
    }

    public func get(_ name: String) async throws(VDError) -> ByteBuffer {
        let data = try await measure("get") { () async throws(VDError) in try await wrapped.get(name) }
        received.increment(by: data.readableBytes)
        return data
    }

    public func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        let data = try await measure("get") { () async throws(VDError) in try await wrapped.get(name, range: range) }
        received.increment(by: data.readableBytes)
        return data
    }

    public func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try await measure("head") { () async throws(VDError) in try await wrapped.head(name) }
    }

    public func listChildren(of prefix: String) async throws(VDError) -> [String] {
        try await measure("list") { () async throws(VDError) in try await wrapped.listChildren(of: prefix) }
    }

    public func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        try await measure("list") { () async throws(VDError) in try await wrapped.list(prefix: prefix) }
    }

    public func delete(_ name: String) async throws(VDError) {
        try await measure("delete") { () async throws(VDError) in try await wrapped.delete(name) }
    }

    public func verifyAccess() async throws(VDError) {
        try await measure("verify") { () async throws(VDError) in try await wrapped.verifyAccess() }
    }

    public func put(_ name: String, contentsOf path: String, length: UInt64) async throws(VDError) {
        try await measure("put") { () async throws(VDError) in
            try await wrapped.put(name, contentsOf: path, length: length)
        }
        sent.increment(by: Int(length))
    }
}
