// A TCP proxy on 127.0.0.1 between libs3 and an S3 server (RGW) that injects the network and server faults S3Store
// must survive: connection resets, stalls past the client's timeout, HTTP 500 / 503 SlowDown answers (a synthesized S3
// XML error), response bodies cut short, a flipped byte in a response body and a flipped byte in a request body.
// Without a scripted fault it passes every byte through unchanged, in both directions (including `Expect:
// 100-continue` and the interim `100 Continue`). Faults are scripted per request (method and path), counted, and
// applied in order. Each proxied connection is one client channel and one upstream channel on the same event loop;
// when one side cannot take more bytes, reading from the other side pauses, so a stalled reader bounds the buffering.

import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

#if canImport(Glibc)
    @preconcurrency import Glibc
#elseif canImport(Musl)
    @preconcurrency import Musl
#endif

/// A fault-injecting TCP proxy for S3 traffic.
public final class S3FaultProxy: Sendable {
    /// What to do to one request (or to its response).
    public enum Fault: Sendable, Hashable, CustomStringConvertible {
        /// Close the client connection (RST) as soon as the request head arrives; nothing reaches the server.
        case resetConnection
        /// Hold the request, forwarding nothing, for `seconds`; then close the connection.
        case stall(seconds: Double)
        /// Answer with an S3 XML error (`status`, `code`) and close; nothing reaches the server.
        case httpError(status: Int, code: String)
        /// Forward the response head and the first `keepingBytes` body bytes, then close the connection.
        case truncateResponseBody(keepingBytes: Int)
        /// Invert the bits of the response body byte at `offset`.
        case flipResponseBodyByte(offset: Int)
        /// Invert the bits of the request body byte at `offset` (the server then sees a corrupted upload).
        case flipRequestBodyByte(offset: Int)
        /// Forward the request (the server acts on it), then reset the client connection instead of answering: an
        /// operation whose outcome the client cannot know.
        case dropResponse

        public static let internalError = Fault.httpError(status: 500, code: "InternalError")
        public static let slowDown = Fault.httpError(status: 503, code: "SlowDown")

        public var description: String {
            switch self {
            case .resetConnection: "reset"
            case .stall(let seconds): "stall \(seconds) s"
            case .httpError(let status, let code): "HTTP \(status) \(code)"
            case .truncateResponseBody(let bytes): "truncate response body after \(bytes) bytes"
            case .flipResponseBodyByte(let offset): "flip response body byte \(offset)"
            case .flipRequestBodyByte(let offset): "flip request body byte \(offset)"
            case .dropResponse: "drop the response"
            }
        }
    }

    /// Bound on scripted rules (tests script a handful).
    public static let rulesMax = 1024

    private let group: MultiThreadedEventLoopGroup
    private let serverChannel: any Channel
    private let box: FaultScript
    /// `127.0.0.1:PORT` of the proxy: give this to S3Store as its endpoint.
    public let endpoint: String
    public let upstreamHost: String
    public let upstreamPort: Int

    /// Starts a proxy on 127.0.0.1 (a free port) forwarding to `upstreamHost:upstreamPort`. With `tls` (PEM files of
    /// a certificate chain and its key) the proxy speaks HTTPS to its clients (a TLS front for a plain-HTTP server).
    public static func start(
        upstreamHost: String, upstreamPort: Int, tls: (certificateFile: String, keyFile: String)? = nil,
        listenHost: String = "127.0.0.1"
    ) async throws -> S3FaultProxy {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let box = FaultScript()
        let sslContext: NIOSSLContext? = try tls.map { files in
            let configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(files.certificateFile).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: files.keyFile, format: .pem)))
            return try NIOSSLContext(configuration: configuration)
        }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let session = ProxySession(upstreamHost: upstreamHost, upstreamPort: upstreamPort, script: box)
                    if let sslContext {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sslContext))
                    }
                    try channel.pipeline.syncOperations.addHandler(ClientSideHandler(session: session))
                }
            }
        do {
            let channel = try await bootstrap.bind(host: listenHost, port: 0).get()
            let port = channel.localAddress?.port ?? 0
            return S3FaultProxy(
                group: group, serverChannel: channel, script: box, endpoint: "\(listenHost):\(port)",
                upstreamHost: upstreamHost, upstreamPort: upstreamPort)
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
    }

    /// Starts a proxy in front of `endpoint` (`HOST:PORT`).
    public static func start(
        upstream endpoint: String, tls: (certificateFile: String, keyFile: String)? = nil,
        listenHost: String = "127.0.0.1"
    ) async throws -> S3FaultProxy {
        guard let colon = endpoint.lastIndex(of: ":"), let port = Int(endpoint[endpoint.index(after: colon)...]) else {
            throw ProxyError(message: "upstream endpoint '\(endpoint)' is not HOST:PORT")
        }
        return try await start(
            upstreamHost: String(endpoint[..<colon]), upstreamPort: port, tls: tls, listenHost: listenHost)
    }

    private init(
        group: MultiThreadedEventLoopGroup, serverChannel: any Channel, script: FaultScript, endpoint: String,
        upstreamHost: String, upstreamPort: Int
    ) {
        self.group = group
        self.serverChannel = serverChannel
        self.box = script
        self.endpoint = endpoint
        self.upstreamHost = upstreamHost
        self.upstreamPort = upstreamPort
    }

    /// Applies `fault` to the next `count` requests whose method is `method` (any when nil) and whose path contains
    /// `pathContains` (any when nil). Rules are tried in the order they were added.
    public func inject(_ fault: Fault, count: Int = 1, method: String? = nil, pathContains: String? = nil) {
        precondition(count > 0, "a fault must apply to at least one request")
        box.add(
            FaultScript.Rule(fault: fault, remaining: count, method: method?.uppercased(), pathContains: pathContains))
    }

    /// Removes every scripted fault that has not been applied yet.
    public func clearFaults() { box.state.withLock { $0.rules.removeAll() } }

    /// Faults applied so far, in order.
    public var appliedFaults: [Fault] { box.state.withLock { $0.applied } }
    /// Requests seen so far (request heads).
    public var requestCount: Int { box.state.withLock { $0.requests } }
    /// "METHOD target" of the requests seen (the most recent 512 to 1024).
    public var requestLines: [String] { box.state.withLock { $0.requestLines } }
    /// Scripted faults not yet applied.
    public var pendingFaultCount: Int { box.state.withLock { $0.rules.reduce(0) { $0 + $1.remaining } } }

    /// Closes the listening socket and every proxied connection.
    public func stop() async {
        try? await serverChannel.close()
        try? await group.shutdownGracefully()
    }
}

struct ProxyError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// The fault script, shared by the proxy object and its sessions.
final class FaultScript: Sendable {
    struct Rule: Sendable {
        var fault: S3FaultProxy.Fault
        var remaining: Int
        var method: String?
        var pathContains: String?
    }

    struct State: Sendable {
        var rules: [Rule] = []
        var requests = 0
        /// "METHOD target" of the most recent requests (bounded).
        var requestLines: [String] = []
        var applied: [S3FaultProxy.Fault] = []
    }

    let state = Mutex(State())

    func add(_ rule: Rule) {
        state.withLock { state in
            precondition(state.rules.count < S3FaultProxy.rulesMax, "more than \(S3FaultProxy.rulesMax) fault rules")
            state.rules.append(rule)
        }
    }

    /// The fault for one request, if a rule matches (and counts the request).
    func fault(method: String, path: String) -> S3FaultProxy.Fault? {
        state.withLock { state in
            state.requests += 1
            if state.requestLines.count >= 1024 { state.requestLines.removeFirst(512) }
            state.requestLines.append("\(method) \(path)")
            for index in state.rules.indices {
                let rule = state.rules[index]
                if let wanted = rule.method, wanted != method.uppercased() { continue }
                if let needle = rule.pathContains, !path.contains(needle) { continue }
                state.rules[index].remaining -= 1
                if state.rules[index].remaining == 0 { state.rules.remove(at: index) }
                state.applied.append(rule.fault)
                return rule.fault
            }
            return nil
        }
    }
}

/// One proxied connection: the client channel, the upstream channel and the framing of both directions. Confined to
/// the client channel's event loop (the upstream channel is created on the same loop).
final class ProxySession {
    private let upstreamHost: String
    private let upstreamPort: Int
    private let script: FaultScript
    private var client: (any Channel)?
    private var upstream: (any Channel)?
    private var toUpstreamBeforeConnect: [ByteBuffer] = []
    private var requests = HTTPStreamParser(isResponse: false)
    private var responses = HTTPStreamParser(isResponse: true)
    /// Requests forwarded whose final response has not started: method and the fault for the response.
    private var outstanding: [(method: String, fault: S3FaultProxy.Fault?)] = []
    private var requestBodyFault: S3FaultProxy.Fault?
    private var responseBodyFault: S3FaultProxy.Fault?
    /// Nothing more is forwarded in either direction (a fault ended the exchange).
    private var isHalted = false
    private var isClosed = false

    init(upstreamHost: String, upstreamPort: Int, script: FaultScript) {
        self.upstreamHost = upstreamHost
        self.upstreamPort = upstreamPort
        self.script = script
    }

    func clientActive(_ channel: any Channel) {
        client = channel
        let bound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        ClientBootstrap(group: channel.eventLoop)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { upstream in
                upstream.eventLoop.makeCompletedFuture {
                    try upstream.pipeline.syncOperations.addHandler(UpstreamSideHandler(session: bound.value))
                }
            }
            .connect(host: upstreamHost, port: upstreamPort)
            .whenComplete { result in
                let session = bound.value
                switch result {
                case .success(let upstream):
                    session.upstream = upstream
                    if session.isClosed {
                        upstream.close(promise: nil)
                        return
                    }
                    for buffer in session.toUpstreamBeforeConnect { upstream.write(buffer, promise: nil) }
                    session.toUpstreamBeforeConnect.removeAll()
                    upstream.flush()
                case .failure:
                    session.closeAll()
                }
            }
    }

    // MARK: client -> upstream

    func fromClient(_ bytes: ByteBuffer) {
        guard !isHalted else { return }
        requests.append(bytes)
        var out: [ByteBuffer] = []
        while !isHalted, let piece = requests.next() {
            switch piece {
            case .head(let head):
                let fault = script.fault(method: head.method, path: head.target)
                switch fault {
                case .resetConnection:
                    reset()
                    return
                case .stall(let seconds):
                    stall(seconds: seconds)
                    return
                case .httpError(let status, let code):
                    answerWithError(status: status, code: code, head: head)
                    return
                case .truncateResponseBody, .flipResponseBodyByte, .dropResponse:
                    outstanding.append((head.method, fault))
                case .flipRequestBodyByte:
                    outstanding.append((head.method, nil))
                    requestBodyFault = fault
                case nil:
                    outstanding.append((head.method, nil))
                }
                out.append(head.raw)
            case .body(var body, let offset, let isFramed):
                if !isFramed, case .flipRequestBodyByte(let at) = requestBodyFault, at >= offset,
                    at < offset + body.readableBytes
                {
                    Self.flip(&body, at: at - offset)
                }
                out.append(body)
            case .end:
                requestBodyFault = nil
            }
        }
        send(out, to: upstream)
    }

    // MARK: upstream -> client

    func fromUpstream(_ bytes: ByteBuffer) {
        guard !isHalted else { return }
        responses.append(bytes)
        var out: [ByteBuffer] = []
        let pendingMethod = outstanding.first?.method
        while !isHalted, let piece = responses.next(bodyless: { _ in pendingMethod == "HEAD" }) {
            switch piece {
            case .head(let head):
                if head.status / 100 != 1, !outstanding.isEmpty {
                    responseBodyFault = outstanding.removeFirst().fault
                    if case .dropResponse = responseBodyFault {
                        // The server has acted on the request; the client never learns how it went.
                        reset()
                        return
                    }
                }
                out.append(head.raw)
            case .body(var body, let offset, let isFramed):
                switch responseBodyFault {
                case .truncateResponseBody(let keep) where !isFramed:
                    if offset + body.readableBytes > keep {
                        let kept = max(keep - offset, 0)
                        out.append(body.getSlice(at: body.readerIndex, length: kept)!)
                        halt()
                        // The client sees the connection close before the body is complete.
                        guard let client else { return }
                        for buffer in out { client.write(buffer, promise: nil) }
                        client.writeAndFlush(ByteBuffer()).whenComplete { _ in client.close(promise: nil) }
                        upstream?.close(promise: nil)
                        return
                    }
                case .flipResponseBodyByte(let at) where !isFramed:
                    if at >= offset && at < offset + body.readableBytes { Self.flip(&body, at: at - offset) }
                default:
                    break
                }
                out.append(body)
            case .end:
                responseBodyFault = nil
            }
        }
        send(out, to: client)
    }

    // MARK: faults and plumbing

    private static func flip(_ buffer: inout ByteBuffer, at index: Int) {
        let position = buffer.readerIndex + index
        let byte = buffer.getInteger(at: position, as: UInt8.self)!
        buffer.setInteger(~byte, at: position)
    }

    private func send(_ buffers: [ByteBuffer], to channel: (any Channel)?) {
        guard !buffers.isEmpty else { return }
        if channel === client {
            guard let client else { return }
            for buffer in buffers { client.write(buffer, promise: nil) }
            client.flush()
        } else if let upstream {
            for buffer in buffers { upstream.write(buffer, promise: nil) }
            upstream.flush()
        } else {
            toUpstreamBeforeConnect.append(contentsOf: buffers)
        }
    }

    private func reset() {
        halt()
        if let provider = client as? any SocketOptionProvider {
            // SO_LINGER 0: close() sends RST instead of FIN.
            _ = provider.setSoLinger(linger(l_onoff: 1, l_linger: 0))
        }
        closeAll()
    }

    private func stall(seconds: Double) {
        halt()
        guard let client else { return }
        let bound = NIOLoopBound(self, eventLoop: client.eventLoop)
        client.eventLoop.scheduleTask(in: .nanoseconds(Int64(seconds * 1e9))) { bound.value.closeAll() }
    }

    private func answerWithError(status: Int, code: String, head: HTTPMessageHead) {
        halt()
        guard let client else { return }
        let reason =
            switch status {
            case 500: "Internal Server Error"
            case 503: "Service Unavailable"
            case 400: "Bad Request"
            case 403: "Forbidden"
            case 404: "Not Found"
            default: "Error"
            }
        let xml =
            head.method == "HEAD"
            ? ""
            : "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>\(code)</Code>"
                + "<Message>injected by S3FaultProxy</Message><Resource>\(head.target)</Resource>"
                + "<RequestId>s3-fault-proxy</RequestId></Error>"
        let response =
            "HTTP/1.1 \(status) \(reason)\r\nContent-Type: application/xml\r\n"
            + "Content-Length: \(xml.utf8.count)\r\nConnection: close\r\n\r\n" + xml
        client.writeAndFlush(ByteBuffer(string: response)).whenComplete { _ in client.close(promise: nil) }
        upstream?.close(promise: nil)
    }

    private func halt() {
        isHalted = true
        toUpstreamBeforeConnect.removeAll()
    }

    func closeAll() {
        isHalted = true
        isClosed = true
        client?.close(promise: nil)
        upstream?.close(promise: nil)
    }

    /// Back-pressure: stop reading from one side while the other cannot take more.
    func writabilityChanged(of channel: any Channel) {
        let other: (any Channel)? = channel === client ? upstream : client
        _ = other?.setOption(ChannelOptions.autoRead, value: channel.isWritable)
        if channel.isWritable { other?.read() }
    }

    func clientInactive() { closeAll() }
    func upstreamInactive() {
        // Let the client receive what was already written, then close it.
        isHalted = true
        isClosed = true
        guard let client else { return }
        client.writeAndFlush(ByteBuffer()).whenComplete { _ in client.close(promise: nil) }
    }
}

final class ClientSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let session: ProxySession
    init(session: ProxySession) { self.session = session }

    func channelActive(context: ChannelHandlerContext) {
        session.clientActive(context.channel)
        context.fireChannelActive()
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.fromClient(unwrapInboundIn(data))
    }
    func channelInactive(context: ChannelHandlerContext) {
        session.clientInactive()
        context.fireChannelInactive()
    }
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        session.writabilityChanged(of: context.channel)
        context.fireChannelWritabilityChanged()
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        session.closeAll()
    }
}

final class UpstreamSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let session: ProxySession
    init(session: ProxySession) { self.session = session }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.fromUpstream(unwrapInboundIn(data))
    }
    func channelInactive(context: ChannelHandlerContext) {
        session.upstreamInactive()
        context.fireChannelInactive()
    }
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        session.writabilityChanged(of: context.channel)
        context.fireChannelWritabilityChanged()
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        session.closeAll()
    }
}
