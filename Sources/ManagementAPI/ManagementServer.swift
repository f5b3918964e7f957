// Serves the management API as HTTP/1.1 on a Unix socket. Access control is the socket's permissions: it is created
// 0600, so only its owner (and root) can manage volumes. Request bodies are bounded; a malformed request gets a 400
// and its connection closes; nothing a client sends stops the server.
//
// The same server serves the metrics alone on TCP (`[metrics] listen`, for Prometheus): there only GET /metrics is
// answered, everything else is 404, so the TCP port never exposes volume management.

public import Logging
public import NIOCore
import NIOHTTP1
import NIOPosix
package import NIOSSL
import Synchronization
public import VolumeCore

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif

public final class ManagementServer: Sendable {
    public static let requestBodyBytesMax = 1 << 20

    public let socketPath: String
    /// Set for the TCP listeners (metrics only, or the cluster API).
    private let tcp: (host: String, port: Int)?
    /// The cluster API's shared token: every request must carry `Authorization: Bearer TOKEN`.
    private let token: String?
    /// TLS on the cluster API (nil: plain HTTP).
    private let tls: NIOSSLContext?
    private let service: any ManagementService
    private let group: any EventLoopGroup
    private let logger: Logger
    private let channel = Mutex<(any Channel)?>(nil)

    public init(socketPath: String, service: any ManagementService, group: any EventLoopGroup, logger: Logger) {
        self.socketPath = socketPath
        self.service = service
        self.group = group
        self.logger = logger
        tcp = nil
        token = nil
        tls = nil
    }

    /// The whole API on TCP for other routers and remote CLIs (`vd serve --cluster-listen`); every request must
    /// carry the shared token (401 otherwise).
    package init(
        clusterHost host: String, port: Int, token: String, tls: NIOSSLContext? = nil, service: any ManagementService,
        group: any EventLoopGroup, logger: Logger
    ) {
        socketPath = ""
        tcp = (host, port)
        self.token = token
        self.tls = tls
        self.service = service
        self.group = group
        self.logger = logger
    }

    /// A listener on TCP that answers GET /metrics only.
    public init(
        metricsHost host: String, port: Int, service: any ManagementService, group: any EventLoopGroup, logger: Logger
    ) {
        socketPath = ""
        tcp = (host, port)
        token = nil
        tls = nil
        self.service = service
        self.group = group
        self.logger = logger
    }

    /// The TCP port listened on (the one the system chose when asked for port 0), or nil on a Unix socket.
    public var localPort: Int? { channel.withLock { $0?.localAddress?.port } }

    public func start() async throws(VDError) {
        if let tcp {
            let service = self.service
            let logger = self.logger
            let token = self.token
            let tls = self.tls
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(
                            APIHandler(service: service, logger: logger, metricsOnly: token == nil, token: token))
                    }
                }
            do {
                let listener = try await bootstrap.bind(host: tcp.host, port: tcp.port).get()
                channel.withLock { $0 = listener }
            } catch {
                throw VDError(.io, "cannot listen on \(tcp.host):\(tcp.port): \(error)")
            }
            return
        }
        // A socket file left by a dead router is removed; a live one means another router serves this directory.
        if await ManagementClient.isListening(socketPath: socketPath) {
            throw VDError(.busy, "another router answers on \(socketPath)")
        }
        unlink(socketPath)
        let service = self.service
        let logger = self.logger
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(APIHandler(service: service, logger: logger))
                }
            }
        do {
            let listener = try await bootstrap.bind(unixDomainSocketPath: socketPath).get()
            chmod(socketPath, 0o600)
            channel.withLock { $0 = listener }
        } catch {
            throw VDError(.io, "cannot listen on \(socketPath): \(error)")
        }
    }

    public func stop() async {
        let listener = channel.withLock { channel -> (any Channel)? in
            defer { channel = nil }
            return channel
        }
        try? await listener?.close()
        if tcp == nil { unlink(socketPath) }
    }
}

final class APIHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let service: any ManagementService
    let logger: Logger
    /// Only GET /metrics is answered (the TCP metrics listener).
    let metricsOnly: Bool
    /// Requests must carry this bearer token (the cluster API).
    let token: String?
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var tooLarge = false

    init(service: any ManagementService, logger: Logger, metricsOnly: Bool = false, token: String? = nil) {
        self.service = service
        self.logger = logger
        self.metricsOnly = metricsOnly
        self.token = token
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body = []
            tooLarge = false
        case .body(let buffer):
            if body.count + buffer.readableBytes > ManagementServer.requestBodyBytesMax {
                tooLarge = true
            } else {
                body += buffer.readableBytesView
            }
        case .end:
            guard let head else { return }
            self.head = nil
            let keepAlive = head.isKeepAlive
            let channel = context.channel
            if tooLarge {
                Self.respond(
                    channel: channel, head: head,
                    response: .error(
                        VDError(.invalidArgument, "request body over \(ManagementServer.requestBodyBytesMax) bytes")),
                    keepAlive: false)
                return
            }
            if let token, !Secrets.equal(head.headers.first(name: "Authorization") ?? "", "Bearer " + token) {
                Self.respond(
                    channel: channel, head: head,
                    response: APIResponse.json(
                        APIError(VDError(.authentication, "the cluster API needs the shared token (VD_CLUSTER_TOKEN)")),
                        status: 401),
                    keepAlive: false)
                return
            }
            if token != nil && !Self.clusterRoutes(method: head.method.rawValue, path: head.uri) {
                Self.respond(
                    channel: channel, head: head,
                    response: .error(VDError(.notFound, "not served on the cluster port: \(head.method) \(head.uri)")),
                    keepAlive: keepAlive)
                return
            }
            if metricsOnly && (head.method != .GET || head.uri.split(separator: "?").first != "/metrics") {
                Self.respond(
                    channel: channel, head: head,
                    response: .error(VDError(.notFound, "only GET /metrics is served here")), keepAlive: keepAlive)
                return
            }
            Self.dispatch(channel: channel, head: head, body: body, service: service, keepAlive: keepAlive)
        }
    }

    /// What the cluster port serves: listing and status, moves, takes, DTL settings, clone registrations from other
    /// routers and metrics; nothing that names a local file (export-diff, import-diff) or deletes.
    static func clusterRoutes(method: String, path: String) -> Bool {
        let parts = path.split(separator: "?").first.map { $0.split(separator: "/").map(String.init) } ?? []
        switch (method, parts.count) {
        case ("GET", _):
            return parts == ["metrics"] || parts == ["v1", "volumes"] || parts == ["v1", "cluster", "volumes"]
                || (parts.count == 3 && parts[1] == "volumes")
        case ("POST", 3): return parts == ["v1", "volumes", "take"] || parts == ["v1", "volumes", "takeover"]
        case ("POST", 4): return parts[0] == "v1" && parts[1] == "volumes" && parts[3] == "move"
        case ("PUT", 4): return parts[0] == "v1" && parts[1] == "volumes" && parts[3] == "dtl"
        case ("POST", 6):
            return parts[0] == "v1" && parts[1] == "volumes" && parts[3] == "snapshots" && parts[5] == "clones"
        default: return false
        }
    }

    private static func dispatch(
        channel: any Channel, head: HTTPRequestHead, body: [UInt8], service: any ManagementService, keepAlive: Bool
    ) {
        Task {
            let response = await APIRoutes.handle(
                method: head.method.rawValue, path: head.uri, body: body, service: service)
            respond(channel: channel, head: head, response: response, keepAlive: keepAlive)
        }
    }

    private static func respond(channel: any Channel, head: HTTPRequestHead, response: APIResponse, keepAlive: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: "\(response.body.count)")
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        let responseHead = HTTPResponseHead(
            version: head.version, status: HTTPResponseStatus(statusCode: response.status), headers: headers)
        let body = response.body
        channel.eventLoop.execute {
            channel.write(HTTPServerResponsePart.head(responseHead), promise: nil)
            if !body.isEmpty {
                channel.write(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil)
            }
            let done = channel.writeAndFlush(HTTPServerResponsePart.end(nil))
            if !keepAlive { done.whenComplete { _ in channel.close(promise: nil) } }
        }
    }
}
