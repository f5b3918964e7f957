// The CLI's side of the management API: one HTTP/1.1 request per call over the router's Unix socket.

import FoundationEssentials
import NIOCore
import NIOHTTP1
import NIOPosix
package import NIOSSL
import Synchronization
public import VolumeCore

public struct ManagementClient: ManagementService {
    public let socketPath: String
    public let timeoutSeconds: Double
    /// Another router's cluster API (TCP, with the shared token) instead of the local socket.
    private let tcp: (host: String, port: Int, token: String)?
    /// TLS to that router (nil: plain HTTP).
    private let tls: NIOSSLContext?

    public init(socketPath: String, timeoutSeconds: Double = 600) {
        self.socketPath = socketPath
        self.timeoutSeconds = timeoutSeconds
        tcp = nil
        tls = nil
    }

    /// A router's cluster API at `host`:`port` (`vd serve --cluster-listen`), authenticated with the shared token.
    public init(host: String, port: Int, token: String, timeoutSeconds: Double = 600) {
        socketPath = "\(host):\(port)"
        self.timeoutSeconds = timeoutSeconds
        tcp = (host, port, token)
        tls = nil
    }

    /// The same over TLS (`ClusterTLS.makeClientContext`).
    package init(host: String, port: Int, token: String, tls: NIOSSLContext?, timeoutSeconds: Double = 600) {
        socketPath = "\(host):\(port)"
        self.timeoutSeconds = timeoutSeconds
        tcp = (host, port, token)
        self.tls = tls
    }

    /// Whether a router answers on `socketPath`.
    public static func isListening(socketPath: String) async -> Bool {
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.seconds(2))
                .connect(unixDomainSocketPath: socketPath).get()
            try? await channel.close()
            return true
        } catch {
            return false
        }
    }

    public func listVolumes() async throws(VDError) -> [VolumeStatus] { try await call("GET", "/v1/volumes") }
    public func volumeStatus(_ name: String) async throws(VDError) -> VolumeStatus {
        try await call("GET", "/v1/volumes/\(name)")
    }
    public func createVolume(_ request: CreateVolumeRequest) async throws(VDError) -> VolumeStatus {
        try await call("POST", "/v1/volumes", request)
    }
    public func attachVolume(_ request: AttachVolumeRequest) async throws(VDError) -> VolumeStatus {
        try await call("POST", "/v1/volumes/attach", request)
    }
    public func deleteVolume(_ name: String) async throws(VDError) {
        let _: Empty? = try await call("DELETE", "/v1/volumes/\(name)")
    }
    public func listSnapshots(_ volume: String) async throws(VDError) -> [SnapshotStatus] {
        try await call("GET", "/v1/volumes/\(volume)/snapshots")
    }
    public func createSnapshot(
        _ volume: String, _ request: CreateSnapshotRequest
    ) async throws(VDError) -> SnapshotStatus {
        try await call("POST", "/v1/volumes/\(volume)/snapshots", request)
    }
    public func deleteSnapshot(_ volume: String, _ snapshot: String) async throws(VDError) {
        let _: Empty? = try await call("DELETE", "/v1/volumes/\(volume)/snapshots/\(snapshot)")
    }
    public func rollback(
        _ volume: String, _ snapshot: String, _ request: RollbackRequest
    ) async throws(VDError)
        -> SnapshotStatus
    {
        try await call("POST", "/v1/volumes/\(volume)/snapshots/\(snapshot)/rollback", request)
    }
    public func createClone(_ request: CreateCloneRequest) async throws(VDError) -> VolumeStatus {
        try await call("POST", "/v1/clones", request)
    }
    public func diff(_ volume: String, _ request: DiffRequest) async throws(VDError) -> DiffResponse {
        try await call("POST", "/v1/volumes/\(volume)/diff", request)
    }
    public func exportDiff(_ volume: String, _ request: ExportDiffRequest) async throws(VDError) -> DiffTransferStatus {
        try await call("POST", "/v1/volumes/\(volume)/export-diff", request)
    }
    public func importDiff(_ volume: String, _ request: ImportDiffRequest) async throws(VDError) -> DiffTransferStatus {
        try await call("POST", "/v1/volumes/\(volume)/import-diff", request)
    }
    public func applyScrubResults(_ volume: String) async throws(VDError) {
        let _: Empty? = try await call("POST", "/v1/volumes/\(volume)/scrub-results")
    }
    public func moveVolume(_ volume: String, _ request: MoveVolumeRequest) async throws(VDError) -> MoveVolumeResponse {
        try await call("POST", "/v1/volumes/\(volume)/move", request)
    }
    public func takeVolume(_ request: TakeVolumeRequest) async throws(VDError) -> VolumeStatus {
        try await call("POST", "/v1/volumes/take", request)
    }
    public func takeoverVolume(_ request: TakeoverVolumeRequest) async throws(VDError) -> VolumeStatus {
        try await call("POST", "/v1/volumes/takeover", request)
    }
    public func setVolumeDTL(_ volume: String, _ request: SetDTLRequest) async throws(VDError) -> VolumeStatus {
        try await call("PUT", "/v1/volumes/\(volume)/dtl", request)
    }
    public func clusterVolumes(backend: String?) async throws(VDError) -> [ClusterVolume] {
        let query = backend.map { "?backend=" + APIRoutes.percentEncoded($0) } ?? ""
        return try await call("GET", "/v1/cluster/volumes" + query)
    }
    public func registerClone(
        _ volume: String, _ snapshot: String, _ request: CloneRegistrationRequest
    ) async throws(VDError) -> SnapshotStatus {
        try await call("POST", "/v1/volumes/\(volume)/snapshots/\(snapshot)/clones", request)
    }
    public func metrics() async throws(VDError) -> String {
        let (_, body) = try await send("GET", "/metrics", body: [])
        return String(decoding: body, as: UTF8.self)
    }

    private func call<T: Decodable>(_ method: String, _ path: String) async throws(VDError) -> T {
        try await call(method, path, Optional<Empty>.none)
    }

    private func call<T: Decodable, B: Encodable>(
        _ method: String, _ path: String, _ request: B?
    ) async throws(VDError)
        -> T
    {
        var body: [UInt8] = []
        if let request {
            let encoder = JSONEncoder()
            encoder.dateEncodingStrategy = .iso8601
            guard let data = try? encoder.encode(request) else {
                throw VDError(.invalidArgument, "cannot encode the request")
            }
            body = Array(data)
        }
        let (status, response) = try await send(method, path, body: body)
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        guard (200..<300).contains(status) else {
            if let error = try? decoder.decode(APIError.self, from: Data(response)) { throw error.vdError }
            throw VDError(.io, "the router answered HTTP \(status) to \(method) \(path)")
        }
        if T.self == Optional<Empty>.self, response.isEmpty { return Optional<Empty>.none as! T }
        do {
            return try decoder.decode(T.self, from: Data(response))
        } catch {
            throw VDError(.io, "cannot read the router's answer to \(method) \(path): \(error)")
        }
    }

    private func send(_ method: String, _ path: String, body: [UInt8]) async throws(VDError) -> (Int, [UInt8]) {
        let collector = ResponseCollector()
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.seconds(5))
                .channelInitializer { [tls] channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls {
                            try channel.pipeline.syncOperations.addHandler(
                                try NIOSSLClientHandler(context: tls, serverHostname: nil))
                        }
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(collector)
                    }
                }
                .connect(
                    to: try tcp.map { try SocketAddress.makeAddressResolvingHost($0.host, port: $0.port) }
                        ?? SocketAddress(unixDomainSocketPath: socketPath)
                ).get()
        } catch {
            throw VDError(.shutdown, "cannot reach the router at \(socketPath): \(error)")
        }
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: "vd")
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        if let tcp { headers.add(name: "Authorization", value: "Bearer " + tcp.token) }
        let head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: path, headers: headers)
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if !body.isEmpty {
            channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let timeout = channel.eventLoop.scheduleTask(in: .milliseconds(Int64(timeoutSeconds * 1000))) {
            collector.fail(
                VDError(.timeout, "the router did not answer \(method) \(path) within \(Int(timeoutSeconds)) s"))
            channel.close(promise: nil)
        }
        defer { timeout.cancel() }
        let result = await collector.result()
        try? await channel.close()
        return try result.get()
    }
}

/// Collects one HTTP response.
final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart

    private let state = Mutex<
        (
            status: Int, body: [UInt8], done: Result<(Int, [UInt8]), VDError>?,
            waiter: CheckedContinuation<Result<(Int, [UInt8]), VDError>, Never>?
        )
    >((0, [], nil, nil))

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): state.withLock { $0.status = Int(head.status.code) }
        case .body(let buffer): state.withLock { $0.body += buffer.readableBytesView }
        case .end:
            let (status, body) = state.withLock { ($0.status, $0.body) }
            finish(.success((status, body)))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(VDError(.io, "the router closed the connection before answering")))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(.failure(VDError(.io, "talking to the router failed: \(error)")))
        context.close(promise: nil)
    }

    func fail(_ error: VDError) { finish(.failure(error)) }

    private func finish(_ result: Result<(Int, [UInt8]), VDError>) {
        let waiter = state.withLock { state -> CheckedContinuation<Result<(Int, [UInt8]), VDError>, Never>? in
            guard state.done == nil else { return nil }
            state.done = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: result)
    }

    func result() async -> Result<(Int, [UInt8]), VDError> {
        await withCheckedContinuation { continuation in
            let done = state.withLock { state -> Result<(Int, [UInt8]), VDError>? in
                if let done = state.done { return done }
                state.waiter = continuation
                return nil
            }
            if let done { continuation.resume(returning: done) }
        }
    }
}
