// NBDServer
// The NBD server: listens on a Unix socket (the default) and optionally on TCP (loopback unless configured
// otherwise), runs one NBDConnectionHandler per client, keeps a registry of connections so the embedding program can
// count and disconnect the clients of an export, and stops cleanly.
//
// Faults it must survive: a stale socket file from a crashed server (removed) versus a live one (refused with
// `.busy`), more clients than allowed (refused at accept), clients that misbehave in any way (only their connection
// ends), device commands still running when clients vanish or the server stops (waited for within a grace period).

public import Logging
public import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
public import VolumeCore

/// How the NBD server listens and what it allows each connection.
public struct NBDServerConfiguration: Sendable, Hashable {
    /// Path of the Unix socket to listen on (clients: `nbd+unix:///EXPORT?socket=PATH`). Nil for none.
    public var unixSocketPath: String?
    /// Address the TCP listener binds to; loopback by default (NBD has no authentication without TLS).
    public var tcpHost: String
    /// TCP port to listen on; nil for no TCP listener, 0 for any free port (see `NBDServer.boundAddresses`).
    public var tcpPort: Int?
    /// Connections served at once; more are closed as soon as they are accepted.
    public var maxConnections: Int
    /// Requests of one connection running at once; beyond it the server stops reading that connection.
    public var maxInFlightRequestsPerConnection: Int
    /// Payload bytes (WRITE data held plus READ data expected) of one connection in flight at once; beyond it the
    /// server stops reading that connection. A single larger request is still served when nothing else is in flight.
    /// Memory per connection stays below about this plus one maximum payload plus one read cycle (a few MiB).
    public var maxInFlightBytesPerConnection: Int
    /// Largest READ / WRITE payload advertised (each device may lower it).
    public var maximumPayloadBytes: UInt32
    /// A client that has not entered transmission after this long is disconnected; 0 for no limit.
    public var handshakeTimeoutSeconds: Double
    /// A client with nothing in flight that sends nothing for this long is disconnected; 0 for no limit.
    public var idleTimeoutSeconds: Double
    /// How long `stop()` and `disconnectClients(export:)` let requests in flight finish before closing anyway.
    public var shutdownGracePeriodSeconds: Double
    /// Where device commands run (see `NBDDeviceExecution`).
    public var deviceExecution: NBDDeviceExecution
    /// TLS (NBD_OPT_STARTTLS) with X.509 certificates; nil for none. A TCP listener beyond loopback needs it.
    public var tls: NBDTLSConfiguration?

    /// A configuration; every parameter is described on the property of the same name. Check it with `validate()`
    /// (`NBDServer.start()` does).
    public init(
        unixSocketPath: String? = nil, tcpHost: String = "127.0.0.1", tcpPort: Int? = nil, maxConnections: Int = 256,
        maxInFlightRequestsPerConnection: Int = 64, maxInFlightBytesPerConnection: Int = 64 << 20,
        maximumPayloadBytes: UInt32 = Limits.requestBytesMax, handshakeTimeoutSeconds: Double = 30,
        idleTimeoutSeconds: Double = 0, shutdownGracePeriodSeconds: Double = 10,
        deviceExecution: NBDDeviceExecution = .default, tls: NBDTLSConfiguration? = nil
    ) {
        self.tls = tls
        self.unixSocketPath = unixSocketPath
        self.tcpHost = tcpHost
        self.tcpPort = tcpPort
        self.maxConnections = maxConnections
        self.maxInFlightRequestsPerConnection = maxInFlightRequestsPerConnection
        self.maxInFlightBytesPerConnection = maxInFlightBytesPerConnection
        self.maximumPayloadBytes = maximumPayloadBytes
        self.handshakeTimeoutSeconds = handshakeTimeoutSeconds
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.shutdownGracePeriodSeconds = shutdownGracePeriodSeconds
        self.deviceExecution = deviceExecution
    }

    /// Whether `host` names the loopback interface.
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host.hasPrefix("127.")
    }

    /// Smallest `maximumPayloadBytes` accepted: the spec wants at least 1 MiB where the export is that large.
    public static let maximumPayloadBytesMin: UInt32 = 1 << 20

    /// Throws `.configuration` naming the first bad setting.
    public func validate() throws(VDError) {
        func bad(_ message: String) -> VDError { VDError(.configuration, "NBD server: \(message)") }
        guard unixSocketPath != nil || tcpPort != nil else {
            throw bad("set a Unix socket path or a TCP port to listen on")
        }
        if let path = unixSocketPath {
            guard !path.isEmpty else { throw bad("the Unix socket path is empty") }
            guard path.utf8.count < UnixSocketFile.pathBytesMax else {
                throw bad("the Unix socket path '\(path)' is longer than \(UnixSocketFile.pathBytesMax - 1) bytes")
            }
        }
        if let port = tcpPort {
            guard (0...65535).contains(port) else { throw bad("TCP port \(port) is not in 0...65535") }
            guard !tcpHost.isEmpty else { throw bad("the TCP host is empty") }
        }
        if tcpPort != nil, !Self.isLoopback(tcpHost) {
            guard let tls, tls.requiredOnTCP else {
                throw bad(
                    "a TCP listener on \(tcpHost) (beyond loopback) would expose volumes without authentication: configure TLS ([nbd.tls] certificate and key) and keep it required on TCP"
                )
            }
        }
        guard maxConnections >= 1 else { throw bad("maxConnections must be at least 1") }
        guard maxInFlightRequestsPerConnection >= 1 else {
            throw bad("maxInFlightRequestsPerConnection must be at least 1")
        }
        guard maxInFlightBytesPerConnection >= 1 else { throw bad("maxInFlightBytesPerConnection must be at least 1") }
        guard maximumPayloadBytes >= Self.maximumPayloadBytesMin, maximumPayloadBytes <= Limits.requestBytesMax else {
            throw bad(
                "maximumPayloadBytes must be within \(Self.maximumPayloadBytesMin)...\(Limits.requestBytesMax)")
        }
        for (name, value) in [
            ("handshakeTimeoutSeconds", handshakeTimeoutSeconds), ("idleTimeoutSeconds", idleTimeoutSeconds),
            ("shutdownGracePeriodSeconds", shutdownGracePeriodSeconds),
        ] {
            guard value.isFinite, value >= 0, value <= 86400 * 365 else {
                throw bad("\(name) must be within 0...1 year")
            }
        }
    }
}

/// TLS settings of the NBD server: PEM files for the server's certificate chain and key, and optionally a CA whose
/// certificates clients must present (mutual TLS). Clients: `qemu-img ... --object tls-creds-x509,...` or
/// `nbdinfo 'nbds+unix://...?tls-certificates=DIR'`.
public struct NBDTLSConfiguration: Sendable, Hashable {
    public var certificateChainPath: String
    public var privateKeyPath: String
    /// When set, clients must present a certificate signed by this CA.
    public var clientCAPath: String?
    /// TLS is required on the Unix socket (else optional there: clients choose).
    public var requiredOnUnixSocket: Bool
    /// TLS is required on TCP listeners (the default; a listener beyond loopback refuses to start without it).
    public var requiredOnTCP: Bool

    public init(
        certificateChainPath: String, privateKeyPath: String, clientCAPath: String? = nil,
        requiredOnUnixSocket: Bool = false, requiredOnTCP: Bool = true
    ) {
        self.certificateChainPath = certificateChainPath
        self.privateKeyPath = privateKeyPath
        self.clientCAPath = clientCAPath
        self.requiredOnUnixSocket = requiredOnUnixSocket
        self.requiredOnTCP = requiredOnTCP
    }

    /// Loads the files into a server TLS context; `.configuration` naming the file that does not load.
    func makeContext() throws(VDError) -> NIOSSLContext {
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(certificateChainPath).map { NIOSSLCertificateSource.certificate($0) }
            guard !chain.isEmpty else { throw VDError(.configuration, "\(certificateChainPath) holds no certificate") }
            let key = try NIOSSLPrivateKey(file: privateKeyPath, format: .pem)
            var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
            tls.minimumTLSVersion = .tlsv12
            if let clientCAPath {
                tls.certificateVerification = .noHostnameVerification
                tls.trustRoots = .file(clientCAPath)
            } else {
                tls.certificateVerification = .none
            }
            return try NIOSSLContext(configuration: tls)
        } catch let error as VDError {
            throw error
        } catch {
            throw VDError(
                .configuration,
                "NBD TLS: cannot load the certificate \(certificateChainPath), key \(privateKeyPath)\(clientCAPath.map { " or client CA \($0)" } ?? ""): \(error)")
        }
    }
}

/// An address the server listens on.
public enum NBDListenAddress: Sendable, Hashable, CustomStringConvertible {
    /// A Unix domain socket at `path`.
    case unix(path: String)
    /// A TCP listener (`port` is the port actually bound).
    case tcp(host: String, port: Int)

    /// The NBD URI of `export` at this address (export names are used as they are, not percent-encoded).
    public func uri(export: String) -> String {
        switch self {
        case .unix(let path): return "nbd+unix:///\(export)?socket=\(path)"
        case .tcp(let host, let port):
            let bracketed = host.contains(":") ? "[\(host)]" : host
            return "nbd://\(bracketed):\(port)/\(export)"
        }
    }

    /// `unix:PATH` or `HOST:PORT`, for logs and `vd serve` output.
    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }
}

/// Serves `BlockDevice`s over the NBD protocol.
///
/// ```swift
/// let server = NBDServer(configuration: .init(unixSocketPath: "/run/vd/nbd.sock"), exports: provider,
///                        eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger)
/// try await server.start()
/// // qemu-img info nbd+unix:///VOLUME?socket=/run/vd/nbd.sock
/// await server.stop()
/// ```
public final class NBDServer: Sendable {
    private enum Lifecycle {
        case idle
        case starting
        case running(listeners: [any Channel], addresses: [NBDListenAddress])
        case stopping
        case stopped
    }

    private let configuration: NBDServerConfiguration
    private let exports: any NBDExportProvider
    private let eventLoopGroup: any EventLoopGroup
    private let logger: Logger
    private let lifecycle = Mutex(Lifecycle.idle)
    private let registry: NBDConnectionRegistry
    private let liveHandlers = LiveCounter()

    /// - Parameters:
    ///   - configuration: listeners and per-connection bounds; checked by `start()`.
    ///   - exports: looked up at every handshake.
    ///   - eventLoopGroup: the loops connections run on (the caller owns it and shuts it down after `stop()`).
    ///   - logger: connection open/close at info, protocol violations at notice, per-request detail at debug.
    public init(
        configuration: NBDServerConfiguration, exports: any NBDExportProvider, eventLoopGroup: any EventLoopGroup,
        logger: Logger
    ) {
        self.configuration = configuration
        self.exports = exports
        self.eventLoopGroup = eventLoopGroup
        self.logger = logger
        self.registry = NBDConnectionRegistry(maxConnections: configuration.maxConnections)
    }

    /// Binds the configured listeners and starts accepting clients.
    ///
    /// A Unix socket file left behind by a server that is gone is removed; if another server is listening on it,
    /// this throws `.busy` naming the path. A path that exists and is not a socket is never removed
    /// (`.alreadyExists`). Throws `.configuration` for a bad configuration and `.busy` / `.io` when binding fails.
    public func start() async throws(VDError) {
        try configuration.validate()
        try lifecycle.withLock { (state: inout Lifecycle) throws(VDError) in
            guard case .idle = state else { throw VDError(.busy, "the NBD server was already started") }
            state = .starting
        }
        var listeners: [any Channel] = []
        var addresses: [NBDListenAddress] = []
        do {
            let tlsContext = try configuration.tls?.makeContext()
            if let path = configuration.unixSocketPath {
                try UnixSocketFile.removeIfStale(path)
                let required = configuration.tls?.requiredOnUnixSocket ?? false
                let channel = try await bind("Unix socket '\(path)'") {
                    try await self.bootstrap(tls: tlsContext, tlsRequired: required).bind(unixDomainSocketPath: path).get()
                }
                listeners.append(channel)
                addresses.append(.unix(path: path))
            }
            if let port = configuration.tcpPort {
                let host = configuration.tcpHost
                let required = configuration.tls?.requiredOnTCP ?? false
                let channel = try await bind("TCP \(host):\(port)") {
                    try await self.bootstrap(tls: tlsContext, tlsRequired: required).bind(host: host, port: port).get()
                }
                listeners.append(channel)
                addresses.append(.tcp(host: host, port: channel.localAddress?.port ?? port))
            }
        } catch {
            for channel in listeners { try? await channel.close() }
            if let path = configuration.unixSocketPath, !listeners.isEmpty { UnixSocketFile.remove(path) }
            lifecycle.withLock { $0 = .idle }
            throw error
        }
        lifecycle.withLock { $0 = .running(listeners: listeners, addresses: addresses) }
        logger.info(
            "NBD server listening",
            metadata: ["nbd.addresses": "\(addresses.map(\.description).joined(separator: ", "))"])
    }

    private func bind(
        _ what: String, _ body: () async throws -> any Channel
    ) async throws(VDError) -> any Channel {
        do {
            return try await body()
        } catch let error as IOError where error.errnoCode == EADDRINUSE {
            throw VDError(.busy, "NBD server: cannot listen on \(what): the address is in use", errno: error.errnoCode)
        } catch let error as IOError {
            throw VDError(.io, "NBD server: cannot listen on \(what): \(error)", errno: error.errnoCode)
        } catch {
            throw VDError(.io, "NBD server: cannot listen on \(what): \(error)")
        }
    }

    private func bootstrap(tls: NIOSSLContext?, tlsRequired: Bool) -> ServerBootstrap {
        var settings = NBDConnectionSettings(
            stateMachine: NBDServerConnectionStateMachine.Configuration(
                maximumPayloadBytes: configuration.maximumPayloadBytes,
                maxInFlightRequests: configuration.maxInFlightRequestsPerConnection,
                maxInFlightBytes: configuration.maxInFlightBytesPerConnection, tlsAvailable: tls != nil,
                tlsRequired: tlsRequired),
            handshakeTimeout: Self.timeAmount(seconds: configuration.handshakeTimeoutSeconds),
            idleTimeout: Self.timeAmount(seconds: configuration.idleTimeoutSeconds),
            shutdownGracePeriod: Self.timeAmount(seconds: configuration.shutdownGracePeriodSeconds) ?? .zero,
            deviceExecution: configuration.deviceExecution)
        settings.tls = tls
        settings.liveHandlers = liveHandlers
        let connectionSettings = settings
        let registry = self.registry
        let exports = self.exports
        let logger = self.logger
        let maxConnections = configuration.maxConnections
        return ServerBootstrap(group: eventLoopGroup)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // Reads of up to 1 MiB take large WRITE payloads in few system calls; the adaptive allocator keeps
            // buffers small for small requests.
            .childChannelOption(
                .recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20)
            )
            .childChannelInitializer { channel in
                guard let id = registry.reserve() else {
                    logger.warning(
                        "NBD connection refused: \(maxConnections) connections are already open",
                        metadata: ["nbd.peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
                    return channel.close()
                }
                let handler = NBDConnectionHandler(
                    id: id, eventLoop: channel.eventLoop, settings: connectionSettings, exports: exports, observer: registry,
                    logger: logger, allocator: channel.allocator)
                guard
                    registry.attach(
                        id, channel: channel, handler: NIOLoopBound(handler, eventLoop: channel.eventLoop),
                        quiesced: handler.quiesced)
                else {
                    // The server began stopping between accept and here.
                    handler.abandon()
                    return channel.close()
                }
                do {
                    try channel.pipeline.syncOperations.addHandler(handler)
                } catch {
                    handler.abandon()
                    return channel.eventLoop.makeFailedFuture(error)
                }
                return channel.eventLoop.makeSucceededVoidFuture()
            }
    }

    private static func timeAmount(seconds: Double) -> TimeAmount? {
        guard seconds > 0 else { return nil }
        return .nanoseconds(Int64(seconds * 1e9))
    }

    /// Where the server listens (empty unless running). TCP port 0 is reported as the port actually bound.
    public var boundAddresses: [NBDListenAddress] {
        lifecycle.withLock {
            if case .running(_, let addresses) = $0 { return addresses }
            return []
        }
    }

    /// Stops listening, lets the requests in flight finish (up to the grace period; new requests get
    /// NBD_ESHUTDOWN), closes every connection and removes the Unix socket file. Idempotent.
    public func stop() async {
        // A start() under way finishes first (it takes no longer than binding).
        while lifecycle.withLock({ if case .starting = $0 { return true } else { return false } }) {
            try? await Task.sleep(for: .milliseconds(10))
        }
        let listeners: [any Channel]? = lifecycle.withLock {
            switch $0 {
            case .running(let listeners, _):
                $0 = .stopping
                return listeners
            case .idle:
                $0 = .stopped
                return nil
            case .starting, .stopping, .stopped:
                return nil
            }
        }
        guard let listeners else { return }
        for channel in listeners { try? await channel.close() }
        if let path = configuration.unixSocketPath { UnixSocketFile.remove(path) }
        registry.stopAccepting()
        let count = await disconnect(registry.entries(export: nil))
        lifecycle.withLock { $0 = .stopped }
        logger.info("NBD server stopped", metadata: ["nbd.closedConnections": "\(count)"])
    }

    /// Connections that entered transmission on `export` and are not yet fully gone (closed with no device
    /// command still running). Use it to refuse operations that need an export without clients.
    public func connectionCount(export: String) -> Int {
        registry.count(export: export)
    }

    /// All connections, in any phase, not yet fully gone.
    public var connectionCount: Int { registry.count(export: nil) }

    /// Connection handlers of this server not yet freed (0 once every connection has closed and quiesced, unless
    /// something leaks them).
    package var liveHandlerCount: Int { liveHandlers.count }

    /// Disconnects every client of `export`: requests in flight finish (up to the grace period; new ones get
    /// NBD_ESHUTDOWN), then the connections close. Returns when none of them touches the device any more, or when
    /// the grace period is over. Make the provider return nil for the export first, or clients may reconnect.
    /// Returns the number of connections that were disconnected.
    @discardableResult
    public func disconnectClients(export: String) async -> Int {
        await disconnect(registry.entries(export: export))
    }

    private func disconnect(_ entries: [NBDConnectionRegistry.Entry]) async -> Int {
        guard !entries.isEmpty else { return 0 }
        for entry in entries {
            entry.channel.eventLoop.execute { entry.handler.value.shutdown() }
        }
        let grace = configuration.shutdownGracePeriodSeconds
        let deadline = ContinuousClock.now + .seconds(grace) + .milliseconds(500)
        for entry in entries {
            let remaining = deadline - ContinuousClock.now
            let done = await Self.wait(for: entry.quiesced, timeout: max(remaining, .milliseconds(1)))
            if !done {
                logger.warning(
                    "NBD connection still has device commands running after the grace period",
                    metadata: ["nbd.connection": "\(entry.id)"])
                entry.channel.eventLoop.execute { entry.handler.value.forceClose() }
            }
        }
        return entries.count
    }

    /// Waits for `future` up to `timeout`; false on timeout.
    private static func wait(for future: EventLoopFuture<Void>, timeout: Duration) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                _ = try? await future.get()
                return true
            }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return false
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
    }
}

/// The server's view of its connections. Thread-safe; the handlers report into it from their event loops.
final class NBDConnectionRegistry: NBDConnectionObserver {
    struct Entry: Sendable {
        let id: Int
        let channel: any Channel
        let handler: NIOLoopBound<NBDConnectionHandler>
        let quiesced: EventLoopFuture<Void>
        var exportName: String?
    }

    private struct State {
        var nextID = 1
        var reserved: Set<Int> = []
        var entries: [Int: Entry] = [:]
        var accepting = true
    }

    private let maxConnections: Int
    private let state = Mutex(State())

    init(maxConnections: Int) {
        self.maxConnections = maxConnections
    }

    /// Takes a connection slot and returns the connection's id; nil if the server is full or stopping.
    func reserve() -> Int? {
        state.withLock {
            guard $0.accepting, $0.reserved.count < maxConnections else { return nil }
            let id = $0.nextID
            $0.nextID += 1
            $0.reserved.insert(id)
            return id
        }
    }

    /// Records a reserved connection's channel and handler; false (slot released) if the server is stopping.
    func attach(
        _ id: Int, channel: any Channel, handler: NIOLoopBound<NBDConnectionHandler>, quiesced: EventLoopFuture<Void>
    ) -> Bool {
        state.withLock {
            guard $0.accepting else {
                $0.reserved.remove(id)
                return false
            }
            $0.entries[id] = Entry(id: id, channel: channel, handler: handler, quiesced: quiesced, exportName: nil)
            return true
        }
    }

    func stopAccepting() {
        state.withLock { $0.accepting = false }
    }

    func connection(_ id: Int, enteredTransmissionWith exportName: String) {
        state.withLock { $0.entries[id]?.exportName = exportName }
    }

    func connectionQuiesced(_ id: Int) {
        state.withLock {
            $0.entries[id] = nil
            $0.reserved.remove(id)
        }
    }

    /// Connections on `export` (every connection if nil).
    func count(export: String?) -> Int {
        state.withLock { state in
            guard let export else { return state.entries.count }
            return state.entries.values.count { $0.exportName == export }
        }
    }

    func entries(export: String?) -> [Entry] {
        state.withLock { state in
            state.entries.values.filter { export == nil || $0.exportName == export }.sorted { $0.id < $1.id }
        }
    }
}
