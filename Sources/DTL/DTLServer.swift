// The DTL peer's TCP service and its client. Frames (DTLFrame.swift) over one connection per owner volume, in order,
// under TLS when the cluster's is configured (the cluster API's certificates: a CA-verified client certificate). The
// first frame must be `hello` with the cluster token; anything else closes the connection. The peer answers each
// `append` with `received`, `sync` with `synced` once every earlier append is durable, streams `journal` frames then
// `fetchDone` for a `fetch`, and answers a request it cannot take (a fenced generation, a full store, a damaged
// append, an owner connection replaced by a newer one) with `refused` naming why (DTLPeerLogic). Store work runs on a
// thread pool, never on the event loop: a connection's frames queue as they arrive and are handled in order, a burst
// per job (DTLPeerConnection), with at most `DTLServer.queuedBytesMax` queued.

package import Logging
package import NIOCore
package import NIOPosix
package import NIOSSL
import Synchronization
package import VolumeCore

/// Frames from a connection's reads (`DTLFrameReader`: a payload is kept as the slices it arrived in, not gathered
/// into one buffer). A frame that does not verify closes the connection: the stream cannot be trusted after it.
final class DTLFrameDecoder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = DTLFrame

    private var reader = DTLFrameReader()
    private var failed = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        var piece = unwrapInboundIn(data)
        do throws(VDError) {
            while true {
                guard let frame = try reader.next(from: &piece) else {
                    precondition(piece.readableBytes == 0, "a DTL frame reader stops only at the end of a read")
                    break
                }
                context.fireChannelRead(wrapInboundOut(frame))
            }
        } catch {
            failed = true
            context.fireErrorCaught(error)
        }
    }
}

/// Writes a frame as its header and then its payload's buffers (the payload is not copied).
final class DTLFrameEncoder: ChannelOutboundHandler, Sendable {
    typealias OutboundIn = DTLFrame
    typealias OutboundOut = ByteBuffer

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = unwrapOutboundIn(data)
        let parts = frame.payloadParts.parts
        context.write(wrapOutboundOut(frame.encodedHeader()), promise: parts.isEmpty ? promise : nil)
        for (index, part) in parts.enumerated() {
            context.write(wrapOutboundOut(part), promise: index == parts.count - 1 ? promise : nil)
        }
    }
}

extension Channel {
    /// Frames in, frames out.
    func addDTLCodec() throws {
        try pipeline.syncOperations.addHandler(DTLFrameDecoder())
        try pipeline.syncOperations.addHandler(DTLFrameEncoder())
    }
}

package final class DTLServer: Sendable {
    private let host: String
    private let port: Int
    private let token: String
    private let store: DTLStore
    private let pool: NIOThreadPool
    private let group: any EventLoopGroup
    private let logger: Logger
    private typealias Connections = [ObjectIdentifier: (channel: any Channel, handler: DTLPeerConnection)]
    /// The listener, and the open connections with their handlers.
    private let state = Mutex<(channel: (any Channel)?, connections: Connections)>((nil, [:]))
    private let logic: DTLPeerLogic
    private let tls: NIOSSLContext?

    /// A connection stops reading while this much of what arrived is not handled yet (bounded memory per owner).
    package static let queuedBytesMax = 64 << 20
    /// Reads of up to this much at once: a journal range of a large write arrives in a few reads.
    static let readBytesMax = 1 << 20
    /// Read buffers a connection keeps for reuse.
    static let readBuffersPooled: UInt = 16

    package init(
        host: String, port: Int, token: String, store: DTLStore, pool: NIOThreadPool, group: any EventLoopGroup,
        logger: Logger, tls: NIOSSLContext? = nil
    ) {
        self.tls = tls
        self.host = host
        self.port = port
        self.token = token
        self.store = store
        self.pool = pool
        self.group = group
        self.logger = logger
        logic = DTLPeerLogic(store: store, logger: logger)
    }

    package var localPort: Int? { state.withLock { $0.channel?.localAddress?.port } }

    package func start() async throws(VDError) {
        let listener: any Channel
        do {
            listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                // Up to this many reads per wake-up, and as many read buffers kept for reuse: a frame's payload is
                // kept as slices of the reads until the store wrote it (DTLFrameReader), so with NIO's default of 4
                // every read under load took a freshly allocated (and page-faulted) buffer.
                .childChannelOption(.maxMessagesPerRead, value: Self.readBuffersPooled)
                .childChannelOption(
                    .recvAllocator,
                    value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 64 << 10, maximum: Self.readBytesMax)
                )
                .childChannelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture { [self] in
                        if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                        try channel.addDTLCodec()
                        let handler = DTLPeerConnection(
                            token: token, session: logic.newConnection(), logic: logic, pool: pool, logger: logger)
                        try channel.pipeline.syncOperations.addHandler(handler)
                        let key = ObjectIdentifier(channel)
                        state.withLock { $0.connections[key] = (channel, handler) }
                        channel.closeFuture.whenComplete { [self] _ in
                            state.withLock { _ = $0.connections.removeValue(forKey: key) }
                        }
                    }
                }
                .bind(host: host, port: port).get()
        } catch {
            throw VDError(.io, "cannot listen for DTL peers on \(host):\(port): \(error)")
        }
        state.withLock { $0.channel = listener }
    }

    package func stop() async {
        let (channel, connections) = state.withLock { state in
            defer { state = (nil, [:]) }
            return (state.channel, Array(state.connections.values))
        }
        try? await channel?.close()
        for (connection, handler) in connections {
            try? await connection.close()
            await handler.stop()
        }
    }
}

/// One owner's (or taker's) connection at the peer, on its event loop: the first frame must be `hello` with the
/// cluster token. Frames are queued as they arrive and handled in order on the thread pool, every frame queued
/// meanwhile in the same job (one hop per burst, not per frame); the answers of a burst leave with one flush, and of
/// consecutive `received` answers only the last (each counts every append before it). Past
/// `DTLServer.queuedBytesMax` queued, the connection stops reading until the queue drains.
final class DTLPeerConnection: ChannelInboundHandler, Sendable {
    typealias InboundIn = DTLFrame
    typealias OutboundOut = DTLFrame

    private struct Queue {
        var frames: [DTLFrame] = []
        var bytes = 0
        var running = false
        var paused = false
        /// The server stops: frames still queued are refused, and `stop` waits for the job that handles them.
        var stopped = false
        var stopWaiters: [CheckedContinuation<Void, Never>] = []
        /// Appends handled so far (the value of a `received` answer).
        var appends: UInt64 = 0
    }

    private let token: String
    private let session: UInt64
    private let logic: DTLPeerLogic
    private let pool: NIOThreadPool
    private let logger: Logger
    /// Set (on the event loop) once the `hello` arrived.
    private let authenticated = Mutex(false)
    private let queue = Mutex(Queue())

    init(token: String, session: UInt64, logic: DTLPeerLogic, pool: NIOThreadPool, logger: Logger) {
        self.token = token
        self.session = session
        self.logic = logic
        self.pool = pool
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard authenticated.withLock({ $0 }) else {
            guard frame.kind == .hello, Secrets.equal(String(buffer: frame.payload), token) else {
                logger.warning("DTL connection refused: no hello with the cluster token")
                context.writeAndFlush(
                    wrapOutboundOut(
                        DTLPeerLogic.refusal(frame, VDError(.authentication, "a DTL connection starts with the token"))),
                    promise: nil)
                context.close(promise: nil)
                return
            }
            authenticated.withLock { $0 = true }
            return
        }
        let (start, pause) = queue.withLock { queue -> (Bool, Bool) in
            queue.frames.append(frame)
            queue.bytes += DTLFrame.headerBytes + frame.payloadParts.readableBytes
            let pause = !queue.paused && queue.bytes > DTLServer.queuedBytesMax
            if pause { queue.paused = true }
            defer { queue.running = true }
            return (!queue.running, pause)
        }
        let channel = context.channel
        if pause { try? channel.syncOptions?.setOption(.autoRead, value: false) }
        if start { pool.submit { [self] poolState in drain(channel, cancelled: poolState == .cancelled) } }
    }

    /// Once this returns, no frame of this connection touches the store any more.
    func stop() async {
        await withCheckedContinuation { continuation in
            let idle = queue.withLock { queue -> Bool in
                queue.stopped = true
                if queue.running { queue.stopWaiters.append(continuation) }
                return !queue.running
            }
            if idle { continuation.resume() }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("DTL connection ended: \(error)")
        context.close(promise: nil)
    }

    /// Handles queued frames until none is left (on the thread pool).
    private func drain(_ channel: any Channel, cancelled: Bool) {
        while true {
            let (frames, resume, stopped, waiters) = queue.withLock {
                queue -> ([DTLFrame], Bool, Bool, [CheckedContinuation<Void, Never>]) in
                let frames = queue.frames
                queue.frames = []
                queue.bytes = 0
                var waiters: [CheckedContinuation<Void, Never>] = []
                if frames.isEmpty {
                    queue.running = false
                    swap(&waiters, &queue.stopWaiters)
                }
                defer { queue.paused = false }
                return (frames, queue.paused, queue.stopped, waiters)
            }
            if resume {
                channel.eventLoop.execute { try? channel.syncOptions?.setOption(.autoRead, value: true) }
            }
            if frames.isEmpty {
                for waiter in waiters { waiter.resume() }
                return
            }
            var replies: [DTLFrame] = []
            for frame in frames {
                let appends = queue.withLock { queue -> UInt64 in
                    if frame.kind == .append { queue.appends += 1 }
                    return queue.appends
                }
                let answers =
                    cancelled || stopped
                    ? [DTLPeerLogic.refusal(frame, VDError(.shutdown, "the DTL peer is stopping"))]
                    : logic.handle(frame, connection: session, appends: appends)
                for answer in answers {
                    // A `received` counts every append before it: the next one replaces it.
                    if answer.kind == .received, let last = replies.last, last.kind == .received {
                        replies[replies.count - 1] = answer
                    } else {
                        replies.append(answer)
                    }
                }
            }
            guard !replies.isEmpty else { continue }
            channel.eventLoop.execute { [replies] in
                for reply in replies { channel.write(reply, promise: nil) }
                channel.flush()
            }
        }
    }
}

/// What a DTL peer answers, frame by frame, for the TCP server or a simulation's in-process link. Each owner
/// connection is a session: a `reset` makes it the volume's current one, and frames of an older session of the same
/// volume (a backlog still arriving after the owner reconnected) are refused, so they can never land after the reset.
/// `handle` does blocking file I/O: call it off the event loops.
package final class DTLPeerLogic: Sendable {
    private let store: DTLStore
    private let logger: Logger
    private let sessions = Mutex<(next: UInt64, current: [VolumeID: UInt64])>((0, [:]))

    package init(store: DTLStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    /// A new owner connection's session.
    package func newConnection() -> UInt64 {
        sessions.withLock { state in
            state.next += 1
            return state.next
        }
    }

    package static func refusal(_ frame: DTLFrame, _ error: VDError) -> DTLFrame {
        var message = ByteBufferAllocator().buffer(capacity: 0)
        message.writeString("\(error.code.rawValue): \(error.message)")
        return DTLFrame(
            kind: .refused, volumeID: frame.volumeID, generation: frame.generation, epoch: frame.epoch,
            value: frame.value, payload: message)
    }

    /// The answers to `frame`, the `appends`-th append of session `connection` (counting this one, if it is one).
    package func handle(_ frame: DTLFrame, connection: UInt64, appends: UInt64) -> [DTLFrame] {
        /// Refuses a frame of a connection a newer one of the same owner replaced.
        func checkCurrent(_ current: [VolumeID: UInt64]) throws(VDError) {
            if let newer = current[frame.volumeID], newer != connection {
                throw VDError(.busy, "volume \(frame.volumeID): a newer connection of its owner replaced this one")
            }
        }
        do throws(VDError) {
            switch frame.kind {
            case .append:
                let (offset, bytes) = try frame.appended()
                // Checked and written in one step with resets: an append of a replaced connection never lands after
                // the reset of the one that replaced it.
                try sessions.withLock { (sessions) throws(VDError) in
                    try checkCurrent(sessions.current)
                    try store.append(
                        volume: frame.volumeID, generation: frame.generation, epoch: frame.epoch,
                        sco: SCONumber(frame.value), offset: offset, bytes: bytes)
                }
                return [
                    DTLFrame(kind: .received, volumeID: frame.volumeID, generation: frame.generation, value: appends)
                ]
            case .reset:
                // Only a reset the store admits (not of a fenced generation) makes this connection the current one.
                try sessions.withLock { (sessions) throws(VDError) in
                    try store.reset(volume: frame.volumeID, generation: frame.generation)
                    sessions.current[frame.volumeID] = connection
                }
                return []
            case .sync:
                try checkCurrent(sessions.withLock { $0.current })
                try store.sync(volume: frame.volumeID, generation: frame.generation)
                return [
                    DTLFrame(kind: .synced, volumeID: frame.volumeID, generation: frame.generation, value: frame.value)
                ]
            case .trim:
                // A replaced connection's trim may still land after a reset: it only drops epochs the backend holds.
                try checkCurrent(sessions.withLock { $0.current })
                try store.trim(volume: frame.volumeID, generation: frame.generation, throughEpoch: frame.value)
                return []
            case .fetch:
                let journals = try store.journals(
                    volume: frame.volumeID, generation: frame.generation, afterEpoch: frame.value)
                return journals.map {
                    DTLFrame(
                        kind: .journal, volumeID: frame.volumeID, generation: frame.generation, epoch: $0.epoch,
                        value: $0.sco.rawValue, payload: $0.bytes)
                } + [
                    DTLFrame(
                        kind: .fetchDone, volumeID: frame.volumeID, generation: frame.generation,
                        value: UInt64(journals.count))
                ]
            default:
                throw VDError(.invalidArgument, "a DTL peer does not take \(frame.kind) frames")
            }
        } catch {
            logger.warning("DTL \(frame.kind) of volume \(frame.volumeID) refused: \(error.message)")
            return [Self.refusal(frame, error)]
        }
    }
}

/// Frames (or the connection's end) as they arrive, for one reader at a time.
package final class DTLInbox: Sendable {
    private struct State {
        var arrived: [Result<DTLFrame, VDError>] = []
        var waiter: CheckedContinuation<Result<DTLFrame, VDError>, Never>?
        var ended: VDError?
        var listener: (@Sendable (Result<DTLFrame, VDError>) -> Void)?
    }
    private let state = Mutex(State())

    package init() {}

    package func deliver(_ result: Result<DTLFrame, VDError>) {
        enum Target {
            case waiter(CheckedContinuation<Result<DTLFrame, VDError>, Never>)
            case listener(@Sendable (Result<DTLFrame, VDError>) -> Void)
        }
        let target = state.withLock { state -> Target? in
            if case .failure(let error) = result {
                guard state.ended == nil else { return nil }
                state.ended = error
            }
            if let listener = state.listener { return .listener(listener) }
            if let waiter = state.waiter {
                state.waiter = nil
                return .waiter(waiter)
            }
            state.arrived.append(result)
            return nil
        }
        switch target {
        case .waiter(let waiter): waiter.resume(returning: result)
        case .listener(let listener): listener(result)
        case nil: break
        }
    }

    /// From now on every frame (and the end) goes to `handler` as it arrives, on the deliverer's thread (an event
    /// loop: it must not block), instead of to `next`. Nothing may have arrived before.
    package func listen(_ handler: @escaping @Sendable (Result<DTLFrame, VDError>) -> Void) {
        let ended = state.withLock { state -> VDError? in
            precondition(state.arrived.isEmpty && state.waiter == nil, "a DTL inbox is listened to from its start")
            state.listener = handler
            return state.ended
        }
        if let ended { handler(.failure(ended)) }
    }

    package func next() async -> Result<DTLFrame, VDError> {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> Result<DTLFrame, VDError>? in
                if !state.arrived.isEmpty { return state.arrived.removeFirst() }
                if let ended = state.ended { return .failure(ended) }
                precondition(state.waiter == nil, "a DTL client is read by one caller at a time")
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}

/// Forwards a client connection's frames (and its end) to its inbox.
final class DTLClientHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = DTLFrame
    let inbox: DTLInbox

    init(_ inbox: DTLInbox) { self.inbox = inbox }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        inbox.deliver(.success(unwrapInboundIn(data)))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        inbox.deliver(.failure(VDError(.io, "the DTL peer connection failed: \(error)")))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        inbox.deliver(.failure(VDError(.io, "the DTL peer closed the connection")))
    }
}

/// One owner's (or taker's) connection to a DTL peer, used in order: over TCP (`DTLClient`) or, in a simulation, an
/// in-process link.
package protocol DTLConnection: Sendable {
    var volumeID: VolumeID { get }
    var generation: UInt64 { get }
    /// Sends `frame` without waiting; frames posted one after another leave in that order.
    func post(_ frame: DTLFrame)
    /// The next frame from the peer (one reader at a time); an error once the connection ended.
    func nextFrame() async throws(VDError) -> DTLFrame
    /// Instead of `nextFrame`: every frame (and the end) to `handler` as it arrives, on the connection's thread.
    func listen(_ handler: @escaping @Sendable (Result<DTLFrame, VDError>) -> Void)
    func close() async
}

extension DTLConnection {
    package func frame(_ kind: DTLFrameKind, value: UInt64 = 0) -> DTLFrame {
        DTLFrame(kind: kind, volumeID: volumeID, generation: generation, value: value)
    }

    package func appendFrame(epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer) -> DTLFrame {
        .append(volumeID: volumeID, generation: generation, epoch: epoch, sco: sco, offset: offset, bytes: bytes)
    }

    /// An append of `bytes` (its buffers not copied), whose CRC32C is `crc` when known.
    package func appendFrame(
        epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: DTLPayload, crc: UInt32?
    ) -> DTLFrame {
        .append(
            volumeID: volumeID, generation: generation, epoch: epoch, sco: sco, offset: offset, bytes: bytes, crc: crc)
    }

    /// The journals of every epoch after `epoch` the peer holds (for a taker: from then on the peer refuses the
    /// older generations).
    package func fetch(
        afterEpoch epoch: UInt64
    ) async throws(VDError) -> [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)] {
        post(frame(.fetch, value: epoch))
        var journals: [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)] = []
        while true {
            let frame = try await nextFrame()
            switch frame.kind {
            case .journal: journals.append((frame.epoch, SCONumber(frame.value), frame.payload))
            case .fetchDone:
                guard frame.value == UInt64(journals.count) else {
                    throw VDError(.corrupt, "the DTL peer sent \(journals.count) journals and counted \(frame.value)")
                }
                return journals
            case .refused: throw DTLClient.refusal(frame)
            default: throw VDError(.corrupt, "the DTL peer answered a fetch with \(frame.kind)")
            }
        }
    }
}

/// One connection to a DTL peer, used in order: appends go out at once; `sync` waits for the peer's `synced` and
/// fails with the first refusal the peer sent (after which the connection is not to be used); `fetch` collects
/// journals until `fetchDone`.
package final class DTLClient: DTLConnection {
    private let channel: any Channel
    private let inbox: DTLInbox
    package let volumeID: VolumeID
    package let generation: UInt64

    private init(channel: any Channel, inbox: DTLInbox, volumeID: VolumeID, generation: UInt64) {
        self.channel = channel
        self.inbox = inbox
        self.volumeID = volumeID
        self.generation = generation
    }

    package static func connect(
        host: String, port: Int, token: String, volumeID: VolumeID, generation: UInt64, group: any EventLoopGroup,
        tls: NIOSSLContext? = nil
    ) async throws(VDError) -> DTLClient {
        let inbox = DTLInbox()
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: group)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .connectTimeout(.seconds(5))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls {
                            try channel.pipeline.syncOperations.addHandler(
                                try NIOSSLClientHandler(context: tls, serverHostname: nil))
                        }
                        try channel.addDTLCodec()
                        try channel.pipeline.syncOperations.addHandler(DTLClientHandler(inbox))
                    }
                }
                .connect(host: host, port: port).get()
        } catch {
            throw VDError(.io, "cannot reach the DTL peer at \(host):\(port): \(error)")
        }
        let client = DTLClient(channel: channel, inbox: inbox, volumeID: volumeID, generation: generation)
        var hello = ByteBufferAllocator().buffer(capacity: token.utf8.count)
        hello.writeString(token)
        try await client.send(DTLFrame(kind: .hello, volumeID: volumeID, generation: generation, payload: hello))
        return client
    }

    private func send(_ frame: DTLFrame) async throws(VDError) {
        do {
            try await channel.writeAndFlush(frame).get()
        } catch {
            throw VDError(.io, "the DTL peer connection failed: \(error)")
        }
    }

    private func next() async throws(VDError) -> DTLFrame { try await inbox.next().get() }

    /// The next frame from the peer (for an owner's mirror, the only reader of its connection).
    package func nextFrame() async throws(VDError) -> DTLFrame { try await next() }

    package func listen(_ handler: @escaping @Sendable (Result<DTLFrame, VDError>) -> Void) { inbox.listen(handler) }

    /// Sends `frame` without waiting: frames posted one after another (by one caller at a time, in a
    /// happens-before order) leave in that order. A failure shows as the connection's end to `nextFrame`.
    package func post(_ frame: DTLFrame) {
        // Always through the loop's task queue (a write made on the loop itself would go out at once, ahead of writes
        // queued earlier from other threads).
        let channel = self.channel
        channel.eventLoop.execute { channel.writeAndFlush(frame, promise: nil) }
    }

    package static func refusal(_ frame: DTLFrame) -> VDError {
        VDError(.backend, "the DTL peer refused: " + String(buffer: frame.payload))
    }

    package func append(epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer) async throws(VDError) {
        try await send(
            .append(volumeID: volumeID, generation: generation, epoch: epoch, sco: sco, offset: offset, bytes: bytes))
    }

    /// Everything appended so far is durable on the peer (or the first refusal since the last sync).
    package func sync() async throws(VDError) {
        try await send(DTLFrame(kind: .sync, volumeID: volumeID, generation: generation))
        while true {
            let frame = try await next()
            switch frame.kind {
            case .synced: return
            case .received: continue
            // A refusal (of this sync or of an earlier append): the connection is not to be trusted any more.
            case .refused: throw Self.refusal(frame)
            default: throw VDError(.corrupt, "the DTL peer answered a sync with \(frame.kind)")
            }
        }
    }

    package func trim(throughEpoch epoch: UInt64) async throws(VDError) {
        try await send(DTLFrame(kind: .trim, volumeID: volumeID, generation: generation, value: epoch))
    }

    package func close() async {
        try? await channel.close()
    }
}
