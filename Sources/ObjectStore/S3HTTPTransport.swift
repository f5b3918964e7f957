// The signature V4 transport: S3 requests over AsyncHTTPClient (SwiftNIO, TLS by swift-nio-ssl with certificate
// verification), signed by S3SignatureV4. It answers the same `S3Request`s as the libs3 loop (which stays the V2
// transport) with the same `S3AttemptResult`s, S3 error codes mapped to libs3's statuses, so S3Store's retries,
// deadlines and integrity checks apply to both unchanged. One attempt here is one HTTP request.
//
// Why AsyncHTTPClient and not libcurl's CURLOPT_AWS_SIGV4 (both were candidates): it runs on the NIO event loops the
// process already has (no second request thread, no select() ceiling of 1024 descriptors), verifies TLS with the
// system's roots or a given CA file through swift-nio-ssl (already a dependency for NBD over TLS), and sends any
// header (If-None-Match, checksums) while libcurl 7.88's signer has known query-string canonicalisation gaps that
// multipart uploads (`?uploads`, `?partNumber=&uploadId=`) would hit. Measured figures are in docs/performance.md.
//
// Faults: a request that runs past its timeout (deadline) or moves no byte for the stall timeout (read timeout) is
// ended and reported as such; a body cut short is reported as a truncated body (bodyLengthMismatch); a response
// larger than the bound is refused; a certificate that does not verify is a clear, unretried error; a shutdown
// fails queued and in-flight requests with `.shutdown`. At most `inFlightMax` requests run, at most `queuedMax` wait.

import AsyncHTTPClient
import CLibS3
import Collections
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization
import VolumeCore

/// Sends `S3Request`s; the V2 (libs3) and V4 transports both implement it.
protocol S3Transport: Sendable {
    func perform(_ request: S3Request) async -> S3AttemptResult
    func shutdown()
}

extension S3RequestLoop: S3Transport {}

final class S3HTTPTransport: S3Transport {
    private let configuration: S3Configuration
    private let client: HTTPClient
    private let gate: S3RequestGate
    private let isShutDown = Atomic<Bool>(false)
    /// Seconds since 1970 (UTC) for the signatures' dates: injected so tests can skew the clock.
    private let now: @Sendable () -> Int64

    init(configuration: S3Configuration, now: @escaping @Sendable () -> Int64) throws(VDError) {
        self.configuration = configuration
        self.now = now
        var tls = TLSConfiguration.makeClientConfiguration()
        if configuration.insecureSkipVerify {
            tls.certificateVerification = .none
        } else if let caFile = configuration.caFile {
            guard FileManager.default.isReadableFile(atPath: caFile) else {
                throw VDError(.configuration, "S3 configuration: ca_file \(caFile) does not exist or is not readable")
            }
            tls.trustRoots = .file(caFile)
        }
        var httpConfiguration = HTTPClient.Configuration(
            tlsConfiguration: tls, redirectConfiguration: .disallow,
            timeout: HTTPClient.Configuration.Timeout(
                connect: .milliseconds(Int64(min(configuration.stallTimeoutSeconds, 10) * 1000)),
                read: .milliseconds(Int64(configuration.stallTimeoutSeconds * 1000)),
                write: .milliseconds(Int64(configuration.stallTimeoutSeconds * 1000))),
            connectionPool: HTTPClient.Configuration.ConnectionPool(
                idleTimeout: .seconds(30),
                concurrentHTTP1ConnectionsPerHostSoftLimit: configuration.inFlightRequestsMax),
            decompression: .disabled)
        httpConfiguration.httpVersion = .http1Only
        // A refused connection is one failed attempt (S3Store retries with backoff), not retried inside the client.
        httpConfiguration.connectionPool.retryConnectionEstablishment = false
        client = HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: httpConfiguration)
        gate = S3RequestGate(inFlightMax: configuration.inFlightRequestsMax, queuedMax: configuration.queuedRequestsMax)
    }

    deinit {
        shutdown()
    }

    func shutdown() {
        guard !isShutDown.exchange(true, ordering: .acquiringAndReleasing) else { return }
        gate.shutdown()
        let client = self.client
        // Never block here (this may run on an event loop): in-flight requests fail, then the client closes.
        Task { try? await client.shutdown() }
    }

    func perform(_ request: S3Request) async -> S3AttemptResult {
        var result = S3AttemptResult()
        if isShutDown.load(ordering: .acquiring) {
            result.abort = .shutdown
            return result
        }
        if let refusal = await gate.enter() {
            result.abort = refusal
            return result
        }
        defer { gate.leave() }
        do {
            return try await send(request)
        } catch {
            return outcome(of: error, request: request)
        }
    }

    // MARK: building and sending

    private func send(_ request: S3Request) async throws -> S3AttemptResult {
        let built = build(request)
        var httpRequest = HTTPClientRequest(url: built.url)
        httpRequest.method = built.method
        for (name, value) in built.headers { httpRequest.headers.add(name: name, value: value) }
        if let body = built.body { httpRequest.body = .bytes(body) }
        let timeout = TimeAmount.nanoseconds(Int64(request.timeoutNanoseconds))
        let response = try await client.execute(httpRequest, timeout: timeout)
        var result = S3AttemptResult()
        result.httpStatus = Int(response.status.code)
        result.contentLength = response.headers.first(name: "content-length").flatMap { UInt64($0) }
        result.eTag = response.headers.first(name: "etag")
        let limit = Int(min(request.bodySizeBytesMax, UInt64(Int32.max))) + 64 * 1024
        let body: ByteBuffer
        do {
            body = try await response.body.collect(upTo: limit)
        } catch is NIOTooManyBytesError {
            result.abort = .tooLarge(bytes: result.contentLength ?? UInt64(limit))
            return result
        }
        var ok = (200..<300).contains(response.status.code)
        if ok, case .completeMultipart = request.operation, XMLText.first("Code", in: String(buffer: body)) != nil {
            // S3 may answer a completion with 200 and then an error in the body (it failed after the reply began).
            ok = false
        }
        if ok {
            result.status = S3StatusOK.rawValue
            result.statusName = "OK"
            switch request.operation {
            case .get:
                result.body = body
            case .list:
                parseListing(body, into: &result)
            case .createMultipart:
                result.uploadID = XMLText.first("UploadId", in: String(buffer: body))
            case .completeMultipart:
                result.eTag = XMLText.first("ETag", in: String(buffer: body)) ?? result.eTag
            case .listMultipart:
                let text = String(buffer: body)
                for entry in XMLText.all("Upload", in: text) {
                    guard let key = XMLText.first("Key", in: entry), let id = XMLText.first("UploadId", in: entry)
                    else { continue }
                    result.uploads.append(
                        S3MultipartUpload(
                            key: key, uploadID: id, initiated: XMLText.first("Initiated", in: entry) ?? ""))
                }
                result.isTruncated = XMLText.first("IsTruncated", in: text) == "true"
                result.nextKeyMarker = XMLText.first("NextKeyMarker", in: text)
                result.nextUploadIDMarker = XMLText.first("NextUploadIdMarker", in: text)
            default:
                break
            }
        } else {
            Self.interpretError(status: Int(response.status.code), body: body, into: &result)
        }
        return result
    }

    private struct Built {
        var method: HTTPMethod
        var url: String
        var headers: [(String, String)]
        var body: ByteBuffer?
    }

    private func build(_ request: S3Request) -> Built {
        let bucket = configuration.bucket
        let host: String
        var path: String
        switch configuration.uriStyle {
        case .path:
            host = configuration.endpoint
            path = "/" + bucket
        case .virtualHost:
            host = bucket + "." + configuration.endpoint
            path = ""
        }
        var method = HTTPMethod.GET
        var query: [(String, String)] = []
        var headers: [(String, String)] = [("host", host)]
        var body: ByteBuffer?
        var payloadHash = S3SignatureV4.emptyPayloadHash
        switch request.operation {
        case .put(let data, let md5, let sha256, let createOnly):
            method = .PUT
            path += "/" + request.key
            // Content-Length is set by AsyncHTTPClient from the body (and not signed: it is not required).
            if let md5 { headers.append(("content-md5", md5)) }
            if createOnly { headers.append(("if-none-match", "*")) }
            body = data
            payloadHash = sha256 ?? S3SignatureV4.unsignedPayload
        case .get(let start, let count):
            path += "/" + request.key
            if count > 0 { headers.append(("range", "bytes=\(start)-\(start + count - 1)")) }
        case .head:
            method = .HEAD
            path += "/" + request.key
        case .delete:
            method = .DELETE
            path += "/" + request.key
        case .list(let prefix, let marker, let maxKeys, let delimiter):
            path += "/"
            query.append(("max-keys", String(maxKeys)))
            if let delimiter { query.append(("delimiter", delimiter)) }
            if !prefix.isEmpty { query.append(("prefix", prefix)) }
            if let marker { query.append(("marker", marker)) }
        case .testBucket:
            path += "/"
            query.append(("max-keys", "1"))
        case .createMultipart:
            method = .POST
            path += "/" + request.key
            query.append(("uploads", ""))
        case .uploadPart(let data, let md5, let number, let uploadID):
            method = .PUT
            path += "/" + request.key
            query.append(("partNumber", String(number)))
            query.append(("uploadId", uploadID))
            headers.append(("content-md5", md5))
            body = data
            payloadHash = S3SignatureV4.unsignedPayload
        case .completeMultipart(let uploadID, let xml, let createOnly):
            method = .POST
            path += "/" + request.key
            query.append(("uploadId", uploadID))
            if createOnly { headers.append(("if-none-match", "*")) }
            payloadHash = xml.withUnsafeReadableBytes { S3SignatureV4.sha256Hex($0) }
            body = xml
        case .abortMultipart(let uploadID):
            method = .DELETE
            path += "/" + request.key
            query.append(("uploadId", uploadID))
        case .listMultipart(let prefix, let keyMarker, let uploadIDMarker):
            path += "/"
            query.append(("uploads", ""))
            if !prefix.isEmpty { query.append(("prefix", prefix)) }
            if let keyMarker { query.append(("key-marker", keyMarker)) }
            if let uploadIDMarker { query.append(("upload-id-marker", uploadIDMarker)) }
        case .createBucket:
            method = .PUT
            path += "/"
            if configuration.region != "us-east-1" {
                let xml =
                    "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
                    + "<LocationConstraint>\(configuration.region)</LocationConstraint></CreateBucketConfiguration>"
                var buffer = ByteBuffer()
                buffer.writeString(xml)
                payloadHash = buffer.withUnsafeReadableBytes { S3SignatureV4.sha256Hex($0) }
                body = buffer
            }
        }
        let encodedPath = S3SignatureV4.encodePath(path.isEmpty ? "/" : path)
        let seconds = now()
        let signed = S3SignatureV4.sign(
            S3SignatureV4.Request(
                method: method.rawValue, encodedPath: encodedPath, query: query, headers: headers,
                payloadHash: payloadHash),
            time: S3SignatureV4.Time(secondsSince1970: seconds), region: configuration.region,
            accessKeyID: configuration.accessKeyID, secret: configuration.secretAccessKey)
        let queryText = S3SignatureV4.canonicalQueryString(query)
        let url =
            "\(configuration.scheme.rawValue)://\(host)\(encodedPath)" + (queryText.isEmpty ? "" : "?" + queryText)
        // AsyncHTTPClient sets Host itself (the same value).
        return Built(method: method, url: url, headers: headers.filter { $0.0 != "host" } + signed, body: body)
    }

    // MARK: interpreting

    /// Maps an error response (S3's XML `<Error><Code>…`, or only the HTTP status for HEAD) to libs3's statuses.
    static func interpretError(status: Int, body: ByteBuffer, into result: inout S3AttemptResult) {
        let text = String(buffer: body)
        let code = XMLText.first("Code", in: text)
        result.errorCode = code
        result.errorMessage = XMLText.first("Message", in: text)
        let mapped: S3Status
        if let code, let known = errorCodes[code] {
            mapped = known
        } else {
            switch status {
            case 400: mapped = S3StatusHttpErrorBadRequest
            case 403: mapped = S3StatusHttpErrorForbidden
            case 404: mapped = code == nil ? S3StatusHttpErrorNotFound : S3StatusErrorUnknown
            case 409: mapped = S3StatusHttpErrorConflict
            case 412: mapped = S3StatusErrorPreconditionFailed
            case 500: mapped = S3StatusErrorInternalError
            case 503: mapped = S3StatusErrorSlowDown
            case 301, 302, 307, 308: mapped = S3StatusErrorPermanentRedirect
            case 500...599: mapped = S3StatusErrorUnknown
            default: mapped = S3StatusHttpErrorUnknown
            }
        }
        result.status = mapped.rawValue
        result.statusName = code ?? "HTTP \(status)"
    }

    private static let errorCodes: [String: S3Status] = [
        "AccessDenied": S3StatusErrorAccessDenied,
        "AccountProblem": S3StatusErrorAccountProblem,
        "BadDigest": S3StatusErrorBadDigest,
        "XAmzContentSHA256Mismatch": S3StatusErrorBadDigest,
        "BucketAlreadyExists": S3StatusErrorBucketAlreadyExists,
        "BucketAlreadyOwnedByYou": S3StatusErrorBucketAlreadyOwnedByYou,
        "EntityTooLarge": S3StatusErrorEntityTooLarge,
        "ExpiredToken": S3StatusErrorExpiredToken,
        "IncompleteBody": S3StatusErrorIncompleteBody,
        "InternalError": S3StatusErrorInternalError,
        "InvalidAccessKeyId": S3StatusErrorInvalidAccessKeyId,
        "InvalidArgument": S3StatusErrorInvalidArgument,
        "InvalidDigest": S3StatusErrorInvalidDigest,
        "InvalidRange": S3StatusErrorInvalidRange,
        "InvalidToken": S3StatusErrorInvalidToken,
        "MalformedXML": S3StatusErrorMalformedXML,
        "NoSuchBucket": S3StatusErrorNoSuchBucket,
        "NoSuchKey": S3StatusErrorNoSuchKey,
        "NotImplemented": S3StatusErrorNotImplemented,
        "PermanentRedirect": S3StatusErrorPermanentRedirect,
        "PreconditionFailed": S3StatusErrorPreconditionFailed,
        "RequestTimeTooSkewed": S3StatusErrorRequestTimeTooSkewed,
        "RequestTimeout": S3StatusErrorRequestTimeout,
        "ServiceUnavailable": S3StatusErrorSlowDown,
        "SignatureDoesNotMatch": S3StatusErrorSignatureDoesNotMatch,
        "SlowDown": S3StatusErrorSlowDown,
        "TemporaryRedirect": S3StatusErrorTemporaryRedirect,
    ]

    private func parseListing(_ body: ByteBuffer, into result: inout S3AttemptResult) {
        let text = String(buffer: body)
        for entry in XMLText.all("Contents", in: text) {
            guard let key = XMLText.first("Key", in: entry) else { continue }
            let size = XMLText.first("Size", in: entry).flatMap { UInt64($0) } ?? 0
            result.listed.append(ObjectInfo(name: key, sizeBytes: size))
        }
        for entry in XMLText.all("CommonPrefixes", in: text) {
            if let prefix = XMLText.first("Prefix", in: entry) { result.commonPrefixes.append(prefix) }
        }
        result.isTruncated = XMLText.first("IsTruncated", in: text) == "true"
        result.nextMarker = XMLText.first("NextMarker", in: text)
    }

    /// A request that ended without a response: timeouts, a lost connection, TLS, cancellation, shutdown.
    private func outcome(of error: any Error, request: S3Request) -> S3AttemptResult {
        var result = S3AttemptResult()
        let timeoutSeconds = Double(request.timeoutNanoseconds) / 1e9
        let stallSeconds = Double(request.stallTimeoutNanoseconds) / 1e9
        if let clientError = error as? HTTPClientError {
            switch clientError {
            case .deadlineExceeded:
                result.abort = .timedOut(seconds: timeoutSeconds)
                return result
            case .readTimeout, .writeTimeout:
                result.abort = .stalled(seconds: stallSeconds)
                return result
            case .cancelled, .alreadyShutdown:
                result.abort = isShutDown.load(ordering: .acquiring) ? .shutdown : .cancelled
                return result
            case .bodyLengthMismatch, .remoteConnectionClosed:
                result.status = S3StatusInterrupted.rawValue
                result.statusName = "connection closed before the response was complete"
                return result
            case .connectTimeout:
                result.status = S3StatusFailedToConnect.rawValue
                result.statusName = "connect timed out"
                return result
            default:
                break
            }
        }
        if error is CancellationError {
            result.abort = isShutDown.load(ordering: .acquiring) ? .shutdown : .cancelled
            return result
        }
        let text = String(describing: error)
        if error is NIOSSLError || error is BoringSSLError || text.contains("CERTIFICATE_VERIFY_FAILED") {
            result.status = S3StatusServerFailedVerification.rawValue
            result.statusName = "TLS handshake failed"
            result.errorMessage = text
            return result
        }
        if isShutDown.load(ordering: .acquiring) {
            result.abort = .shutdown
            return result
        }
        result.status = S3StatusConnectionFailed.rawValue
        result.statusName = "connection failed"
        result.errorMessage = text
        return result
    }
}

/// Bounds requests: at most `inFlightMax` run, at most `queuedMax` wait (in arrival order).
final class S3RequestGate: Sendable {
    private struct State {
        var inFlight = 0
        var waiters = Deque<CheckedContinuation<S3AbortReason?, Never>>()
        var isShutDown = false
    }

    private let state = Mutex(State())
    private let inFlightMax: Int
    private let queuedMax: Int

    init(inFlightMax: Int, queuedMax: Int) {
        self.inFlightMax = inFlightMax
        self.queuedMax = queuedMax
    }

    /// nil: the caller may run (and must `leave()`); otherwise why it may not.
    func enter() async -> S3AbortReason? {
        await withCheckedContinuation { continuation in
            let immediate = state.withLock { state -> S3AbortReason?? in
                if state.isShutDown { return .some(.shutdown) }
                if state.inFlight < inFlightMax {
                    state.inFlight += 1
                    return .some(nil)
                }
                if state.waiters.count >= queuedMax { return .some(.queueFull(limit: queuedMax)) }
                state.waiters.append(continuation)
                return .none
            }
            if let immediate { continuation.resume(returning: immediate) }
        }
    }

    func leave() {
        let next = state.withLock { state -> CheckedContinuation<S3AbortReason?, Never>? in
            if let next = state.waiters.popFirst() { return next }
            state.inFlight -= 1
            return nil
        }
        next?.resume(returning: nil)
    }

    func shutdown() {
        let waiters = state.withLock { state -> Deque<CheckedContinuation<S3AbortReason?, Never>> in
            state.isShutDown = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(returning: .shutdown) }
    }
}

/// Reads the few elements S3's XML responses carry (error codes, listings) without a DOM.
enum XMLText {
    /// The text of the first `<name>…</name>` in `text`, entities decoded.
    static func first(_ name: String, in text: String) -> String? {
        guard let open = text.range(of: "<\(name)>"),
            let close = text.range(of: "</\(name)>", range: open.upperBound..<text.endIndex)
        else { return nil }
        return decode(String(text[open.upperBound..<close.lowerBound]))
    }

    /// The inner text of every `<name>…</name>`, in order.
    static func all(_ name: String, in text: String) -> [String] {
        var out: [String] = []
        var cursor = text.startIndex
        while let open = text.range(of: "<\(name)>", range: cursor..<text.endIndex),
            let close = text.range(of: "</\(name)>", range: open.upperBound..<text.endIndex)
        {
            out.append(String(text[open.upperBound..<close.lowerBound]))
            cursor = close.upperBound
        }
        return out
    }

    static func decode(_ text: String) -> String {
        guard text.contains("&") else { return text }
        return text.replacingOccurrences(of: "&lt;", with: "<").replacingOccurrences(of: "&gt;", with: ">")
            .replacingOccurrences(of: "&quot;", with: "\"").replacingOccurrences(of: "&apos;", with: "'")
            .replacingOccurrences(of: "&#34;", with: "\"").replacingOccurrences(of: "&amp;", with: "&")
    }
}
