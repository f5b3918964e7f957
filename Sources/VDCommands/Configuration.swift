// The vd configuration: a TOML file (documented example in conf/vd.toml), overridden by command-line options.
// Every setting has a default, so no file is needed. Unknown keys are errors (a typo must not silently fall back
// to a default), and every value is checked before anything starts.

import FlashIO
import Foundation
package import ManagementAPI
package import NBDServer
import TOMLKit
package import VolumeCore
package import VolumeRouter

/// The settings in effect, after defaults, the file and the command line.
package struct VDConfiguration: Sendable {
    package var dataDirectory: String
    /// `--router HOST:PORT`: the CLI talks to that router's cluster API (never set from the file).
    package var remoteRouter: String?
    package var flashDirectory: String?
    package var logLevel: String = "info"
    package var nbdSocketPath: String?
    package var nbdTCPHost: String = "127.0.0.1"
    package var nbdTCPPort: Int?
    package var nbdMaxConnections = 256
    package var nbdMaxInFlightPerConnection = 64
    /// NBD TLS (X.509): certificate chain, key, optional client CA, whether required on the Unix socket.
    package var nbdTLS: NBDTLSConfiguration?
    /// Exports served read-only (volume names).
    package var readOnlyExports: Set<String> = []
    package var clusterSizeBytes: UInt32 = Limits.clusterSizeBytesDefault
    package var volumeOptions = VolumeOptions()
    package var cacheCapacityBytes: UInt64 = 16 << 30
    package var directIO = true
    package var ioThreads = 4
    package var drainTimeoutSeconds: Double = 120
    /// Backend name -> URL (`file:///DIR`, `s3://BUCKET?endpoint=HOST:PORT`).
    package var backends: [String: String] = [:]
    /// Backend name -> whether SCOs are compressed on upload (default: yes for s3, no for a local directory).
    package var backendCompression: [String: Bool] = [:]
    package var defaultBackend = "local"
    /// Where `vd serve` serves GET /metrics over TCP for Prometheus (none by default; the management socket's
    /// /metrics is always there).
    package var metricsHost: String = "127.0.0.1"
    package var metricsPort: Int?
    /// `[cluster] node`: this router shares its backends with others and serves each volume under an owner lease.
    package var clusterNode: String?
    package var clusterLeaseSeconds: Double = 20
    /// `[cluster] listen`: HOST:PORT of the cluster API (other routers and remote CLIs; token required).
    package var clusterListen: String?
    /// `[cluster] tls_certificate`, `tls_key`, `tls_ca`: TLS on the cluster API (served with the certificate;
    /// routers and CLIs verify it against the CA, and with a CA the server requires client certificates).
    package var clusterTLS = ClusterTLS()
    /// Whether connections to other routers' cluster APIs use TLS (a CA to verify them is configured).
    package var clusterClientUsesTLS: Bool { clusterTLS.caPath != nil }
    /// `[dtl] listen`: HOST:PORT of this router's DTL peer service (other routers mirror their volumes to it).
    package var dtlListen: String?
    /// `[dtl] directory`: where the peer service keeps the journals it mirrors (default DATA/dtl).
    package var dtlDirectory: String?
    /// `[dtl] max_per_volume`: most bytes the peer service keeps for one volume (a full peer is a degraded peer).
    package var dtlBytesPerVolumeMax: UInt64 = 4 << 30
    /// `[dtl] timeout_seconds`: a peer that does not answer within this is treated as lost (the volume degrades).
    package var dtlTimeoutSeconds: Double = 5
    package var effectiveDTLDirectory: String { dtlDirectory ?? dataDirectory + "/dtl" }

    package init(dataDirectory: String) {
        self.dataDirectory = dataDirectory
    }

    /// Where `vd serve` listens by default: DATA/nbd.sock.
    package var effectiveSocketPath: String { nbdSocketPath ?? dataDirectory + "/nbd.sock" }
    package var effectiveFlashDirectory: String { flashDirectory ?? dataDirectory + "/flash" }

    /// The built-in backend: a local directory store under the data directory.
    package var embeddedBackendURL: String { "file://" + dataDirectory + "/backend" }

    package var backendURLs: [String: String] {
        var all = backends
        if all["local"] == nil { all["local"] = embeddedBackendURL }
        return all
    }

    package var routerConfiguration: RouterConfiguration {
        var router = RouterConfiguration(dataDirectory: dataDirectory)
        router.flashDirectory = effectiveFlashDirectory
        router.volumeOptions = volumeOptions
        router.cacheCapacityBytes = cacheCapacityBytes
        router.directIO = directIO
        router.ioThreads = ioThreads
        router.ownership = clusterNode.map { OwnershipSettings(node: $0, leaseSeconds: clusterLeaseSeconds) }
        return router
    }

    /// The default data directory: $VD_DATA_DIR, else /var/lib/vd for root, else ~/.local/share/vd.
    package static var defaultDataDirectory: String {
        let environment = ProcessInfo.processInfo.environment
        if let dir = environment["VD_DATA_DIR"], !dir.isEmpty { return dir }
        if getuid() == 0 { return "/var/lib/vd" }
        return (environment["HOME"] ?? "/tmp") + "/.local/share/vd"
    }

    package func validate() throws(VDError) {
        try routerConfiguration.validate()
        if let node = clusterNode {
            guard VolumeName(rawValue: node) != nil else {
                throw VDError(.configuration, "cluster node '\(node)' must be letters, digits, '.', '_' or '-'")
            }
            guard (3...3600).contains(clusterLeaseSeconds) else {
                throw VDError(.configuration, "cluster lease_seconds must be 3 to 3600")
            }
        }
        guard backendURLs[defaultBackend] != nil else {
            throw VDError(
                .configuration,
                "default_backend '\(defaultBackend)' is not configured; known backends: \(backendURLs.keys.sorted().joined(separator: ", "))"
            )
        }
        guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(logLevel) else {
            throw VDError(
                .configuration,
                "log_level '\(logLevel)' must be one of trace, debug, info, notice, warning, error, critical")
        }
        guard drainTimeoutSeconds >= 0 else {
            throw VDError(.configuration, "shutdown drain_timeout_seconds must be >= 0")
        }
        guard nbdMaxConnections >= 1, nbdMaxInFlightPerConnection >= 1 else {
            throw VDError(.configuration, "nbd max_connections and max_in_flight must be at least 1")
        }
    }
}

/// The TOML file's shape (snake_case keys, every key optional).
struct ConfigFile: Decodable {
    struct NBD: Decodable {
        struct TLS: Decodable {
            var certificate: String
            var key: String
            var client_ca: String?
            var required_on_unix_socket: Bool?
        }
        var socket: String?
        var tcp: String?
        var max_connections: Int?
        var max_in_flight: Int?
        var read_only: [String]?
        var tls: TLS?
    }
    struct VolumeSection: Decodable { var cluster_size: SizeValue? }
    struct SCOSection: Decodable { var size: SizeValue? }
    struct Upload: Decodable {
        var max_pending: SizeValue?
        var max_age_seconds: NumberValue?
        var concurrency: Int?
        var retry_delay_seconds: NumberValue?
        var retry_delay_max_seconds: NumberValue?
    }
    struct Cache: Decodable {
        var size: SizeValue?
        var direct_io: Bool?
        var detect_zeroes: Bool?
        var zero_ahead: Bool?
    }
    struct MapSection: Decodable { var cache_entries: Int? }
    struct ScrubSection: Decodable {
        var poll_seconds: NumberValue?
        var delete_grace_seconds: NumberValue?
    }
    struct Shutdown: Decodable { var drain_timeout_seconds: NumberValue? }
    struct MetricsSection: Decodable { var listen: String? }
    struct ClusterSection: Decodable {
        var node: String?
        var listen: String?
        var lease_seconds: NumberValue?
        var tls_certificate: String?
        var tls_key: String?
        var tls_ca: String?
    }
    struct DTLSection: Decodable {
        var listen: String?
        var directory: String?
        var max_per_volume: SizeValue?
        var timeout_seconds: NumberValue?
    }
    struct Backend: Decodable {
        /// Required, except for "local" (the embedded store, DATA_DIR/backend unless given).
        var url: String?
        var compression: Bool?
    }

    var data_dir: String?
    var flash_dir: String?
    var log_level: String?
    var io_threads: Int?
    var default_backend: String?
    var nbd: NBD?
    var volume: VolumeSection?
    var sco: SCOSection?
    var upload: Upload?
    var cache: Cache?
    var map: MapSection?
    var scrub: ScrubSection?
    var shutdown: Shutdown?
    var metrics: MetricsSection?
    var cluster: ClusterSection?
    var dtl: DTLSection?
    var backends: [String: Backend]?
}

/// A number written as an integer or a float (TOML distinguishes them; users should not have to).
struct NumberValue: Decodable {
    var value: Double
    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let integer = try? container.decode(Int.self) {
            value = Double(integer)
        } else {
            value = try container.decode(Double.self)
        }
    }
}

/// A size written as a string with a suffix ("64M") or as a plain integer of bytes.
struct SizeValue: Decodable {
    var bytes: UInt64
    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let number = try? container.decode(Int.self) {
            guard number >= 0 else { throw VDError(.configuration, "a size cannot be negative (\(number))") }
            bytes = UInt64(number)
        } else {
            bytes = try ByteSize.parse(try container.decode(String.self))
        }
    }
}

extension VDConfiguration {
    /// Loads the file at `path` (if any) over the defaults.
    package static func load(path: String?) throws(VDError) -> VDConfiguration {
        var configuration = VDConfiguration(dataDirectory: defaultDataDirectory)
        guard let path else { return configuration }
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw VDError(.configuration, "cannot read the configuration file \(path): \(error.localizedDescription)")
        }
        let file: ConfigFile
        do {
            var decoder = TOMLDecoder()
            decoder.strictDecoding = true
            file = try decoder.decode(ConfigFile.self, from: text)
        } catch let error as VDError {
            throw VDError(.configuration, "\(path): \(error.message)")
        } catch let error as UnexpectedKeysError {
            let keys = error.keys.map { key, path in (path.map(\.stringValue) + [key]).joined(separator: ".") }.sorted()
            throw VDError(.configuration, "\(path): unknown setting(s): \(keys.joined(separator: ", "))")
        } catch let DecodingError.typeMismatch(_, context) {
            throw VDError(
                .configuration, "\(path): \(Self.keyPath(context)) has the wrong type: \(context.debugDescription)")
        } catch let DecodingError.keyNotFound(_, context) {
            throw VDError(
                .configuration,
                "\(path): \(Self.keyPath(context)) has the wrong type or is missing: \(context.debugDescription)")
        } catch let DecodingError.dataCorrupted(context) {
            throw VDError(.configuration, "\(path): \(Self.keyPath(context)): \(context.debugDescription)")
        } catch {
            throw VDError(.configuration, "\(path): \(error)")
        }
        try configuration.apply(file, path: path)
        return configuration
    }

    static func keyPath(_ context: DecodingError.Context) -> String {
        context.codingPath.map(\.stringValue).joined(separator: ".")
    }

    mutating func apply(_ file: ConfigFile, path: String) throws(VDError) {
        if let dir = file.data_dir { dataDirectory = dir }
        if let node = file.cluster?.node { clusterNode = node }
        if let listen = file.cluster?.listen { clusterListen = listen }
        if let seconds = file.cluster?.lease_seconds?.value { clusterLeaseSeconds = seconds }
        if let cluster = file.cluster {
            if let path = cluster.tls_certificate { clusterTLS.certificatePath = path }
            if let path = cluster.tls_key { clusterTLS.keyPath = path }
            if let path = cluster.tls_ca { clusterTLS.caPath = path }
            if (clusterTLS.certificatePath == nil) != (clusterTLS.keyPath == nil) {
                throw VDError(.configuration, "\(path): [cluster] tls_certificate and tls_key go together")
            }
        }
        if let dtl = file.dtl {
            if let listen = dtl.listen { dtlListen = listen }
            if let directory = dtl.directory { dtlDirectory = directory }
            if let size = dtl.max_per_volume { dtlBytesPerVolumeMax = size.bytes }
            if let seconds = dtl.timeout_seconds?.value {
                guard seconds >= 0.5 && seconds <= 600 else {
                    throw VDError(.configuration, "\(path): [dtl] timeout_seconds must be 0.5 to 600")
                }
                dtlTimeoutSeconds = seconds
            }
        }
        if let listen = file.metrics?.listen {
            let (host, port) = try Self.parseHostPort(listen)
            metricsHost = host
            metricsPort = port
        }
        if let dir = file.flash_dir { flashDirectory = dir }
        if let level = file.log_level { logLevel = level }
        if let threads = file.io_threads { ioThreads = threads }
        if let nbd = file.nbd {
            if let socket = nbd.socket { nbdSocketPath = socket }
            if let tcp = nbd.tcp {
                let (host, port) = try Self.parseHostPort(tcp)
                nbdTCPHost = host
                nbdTCPPort = port
            }
            if let n = nbd.max_connections { nbdMaxConnections = n }
            if let n = nbd.max_in_flight { nbdMaxInFlightPerConnection = n }
            if let names = nbd.read_only { readOnlyExports = Set(names) }
            if let tls = nbd.tls {
                nbdTLS = NBDTLSConfiguration(
                    certificateChainPath: tls.certificate, privateKeyPath: tls.key, clientCAPath: tls.client_ca,
                    requiredOnUnixSocket: tls.required_on_unix_socket ?? false, requiredOnTCP: true)
            }
        }
        if let size = file.volume?.cluster_size {
            guard size.bytes <= UInt64(UInt32.max) else {
                throw VDError(.configuration, "\(path): cluster_size is too large")
            }
            clusterSizeBytes = UInt32(size.bytes)
        }
        if let size = file.sco?.size { volumeOptions.scoSizeBytes = size.bytes }
        if let upload = file.upload {
            if let v = upload.max_pending { volumeOptions.uploadPendingBytesMax = v.bytes }
            if let v = upload.max_age_seconds { volumeOptions.uploadAgeSecondsMax = v.value }
            if let v = upload.concurrency { volumeOptions.uploadConcurrency = v }
            if let v = upload.retry_delay_seconds { volumeOptions.uploadRetryDelaySeconds = v.value }
            if let v = upload.retry_delay_max_seconds { volumeOptions.uploadRetryDelaySecondsMax = v.value }
        }
        if let cache = file.cache {
            if let v = cache.size { cacheCapacityBytes = v.bytes }
            if let v = cache.direct_io { directIO = v }
            if let v = cache.detect_zeroes { volumeOptions.detectZeroes = v }
            if let v = cache.zero_ahead { volumeOptions.zeroAhead = v }
        }
        if let entries = file.map?.cache_entries { volumeOptions.mapCacheEntries = entries }
        if let v = file.scrub?.poll_seconds { volumeOptions.scrubPollSeconds = v.value }
        if let v = file.scrub?.delete_grace_seconds { volumeOptions.scrubDeleteGraceSeconds = v.value }
        if let timeout = file.shutdown?.drain_timeout_seconds { drainTimeoutSeconds = timeout.value }
        if let backends = file.backends {
            for (name, backend) in backends {
                guard !name.contains("://"), !name.isEmpty else {
                    throw VDError(.configuration, "\(path): backend name '\(name)' may not contain '://'")
                }
                if let url = backend.url {
                    self.backends[name] = url
                } else if name != "local" {
                    throw VDError(
                        .configuration,
                        "\(path): backends.\(name) needs a url (s3://BUCKET?endpoint=... or file:///DIR)")
                }
                if let compression = backend.compression { backendCompression[name] = compression }
            }
        }
        if let name = file.default_backend { defaultBackend = name }
    }

    /// "HOST:PORT" or "[V6]:PORT".
    package static func parseHostPort(_ text: String) throws(VDError) -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65535).contains(port)
        else { throw VDError(.configuration, "'\(text)' is not HOST:PORT") }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw VDError(.configuration, "'\(text)' has no host") }
        return (host, port)
    }
}
