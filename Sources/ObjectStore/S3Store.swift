// The S3 backend: an ObjectStore over any S3-compatible endpoint through libs3 (AWS signature V2), with every HTTP
// request run by one S3RequestLoop thread and every operation retried here.
//
// Faults it must survive, and how:
// - connection refused/reset, timeouts, stalls, HTTP 500, 503 SlowDown, garbled error bodies: retried with
//   exponential backoff and full jitter, bounded by `retry.attemptsMax` and `operationDeadlineSeconds`; then the
//   operation fails with `.timeout` (when the last failure was one) or `.backend`, naming the object and the failure.
// - truncated bodies: libs3 reports a body cut short by the server as success, so every GET counts its bytes against
//   the response's Content-Length and the requested range, and retries when short; it never returns short data.
// - a body corrupted on the way up: every PUT carries Content-MD5, so the server rejects it (BadDigest) and it is
//   retried. On the way down a whole-object GET is checked against the ETag when that is a plain MD5; range GETs
//   cannot be checked here (callers verify their CRCs).
// - a PUT whose outcome is unknown is simply sent again: VolumeDriver never reuses an object name.
// - not retried: rejected credentials (`.authentication`, naming the access key ID, never the secret), a missing
//   object (`.notFound`), a missing bucket (`.configuration`: "create bucket X"), a range past the end
//   (`.outOfRange`).

public import Logging
public import NIOCore
public import VolumeCore
import CLibS3
import Crypto

/// An `ObjectStore` on an S3-compatible bucket. Thread-safe; call `shutdown()` when done (also done on deinit).
public final class S3Store: ObjectStore {
    /// The configuration this store was opened with (its description never shows the secret key).
    public let configuration: S3Configuration
    private let loop: S3RequestLoop
    private let logger: Logger

    /// Validates `configuration` and starts the request loop thread. Sends no request (see `verifyAccess()`).
    public init(configuration: S3Configuration, logger: Logger = Logger(label: "vd.objectstore.s3")) throws(VDError) {
        try configuration.validate()
        self.configuration = configuration
        self.logger = logger
        loop = try S3RequestLoop(
            target: S3Target(
                host: configuration.endpoint, bucket: configuration.bucket,
                accessKeyID: configuration.accessKeyID, secret: configuration.secretAccessKey,
                scheme: configuration.scheme, uriStyle: configuration.uriStyle),
            inFlightMax: configuration.inFlightRequestsMax, queuedMax: configuration.queuedRequestsMax)
    }

    deinit {
        loop.shutdown()
    }

    /// Aborts queued and in-flight requests (they fail with `.shutdown`), closes every connection and joins the loop
    /// thread. Idempotent; operations started afterwards fail with `.shutdown`.
    public func shutdown() {
        loop.shutdown()
    }

    public var description: String { configuration.description }

    // MARK: operations

    public func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        guard UInt64(data.readableBytes) <= configuration.objectSizeBytesMax else {
            throw .invalidArgument(
                "object \(name) is \(data.readableBytes) bytes, more than the S3 store's bound of "
                    + "\(configuration.objectSizeBytesMax) bytes")
        }
        let md5 = S3Encoding.base64(S3Encoding.md5(data))
        try await perform("PUT", name, .put(body: data, md5Base64: md5)) { (result) -> Verdict<Void> in
            result.isOK ? .success(()) : self.failure(result, "PUT", name)
        }
    }

    public func get(_ name: String) async throws(VDError) -> ByteBuffer {
        try ObjectName.validate(name)
        let verifiesMD5 = configuration.verifiesWholeObjectMD5
        return try await perform("GET", name, .get(startByte: 0, byteCount: 0)) { (result) -> Verdict<ByteBuffer> in
            guard result.isOK else { return self.failure(result, "GET", name) }
            let body = result.body ?? ByteBuffer()
            if let expected = result.contentLength, UInt64(body.readableBytes) != expected {
                return .retry("truncated body: received \(body.readableBytes) of \(expected) bytes")
            }
            if verifiesMD5, let eTag = result.eTag.flatMap(S3Encoding.plainMD5ETag) {
                let actual = S3Encoding.hex(S3Encoding.md5(body))
                if actual != eTag {
                    return .retry("body does not match its ETag (MD5 \(actual), ETag \(eTag)): corrupted in transit")
                }
            }
            return .success(body)
        }
    }

    public func get(_ name: String, range: Range<UInt64>) async throws(VDError) -> ByteBuffer {
        try ObjectName.validate(name)
        if range.isEmpty {
            // An empty range cannot be expressed as an HTTP Range; the object must still exist and be long enough.
            guard let info = try await head(name) else {
                throw .notFound("object \(name) does not exist in \(description)")
            }
            try ObjectName.checkRange(range, size: info.sizeBytes, name: name)
            return ByteBuffer()
        }
        let count = UInt64(range.count)
        let operation = S3Operation.get(startByte: range.lowerBound, byteCount: count)
        let outcome = try await perform("GET", name, operation) { (result) -> Verdict<RangeOutcome> in
            if result.s3Status == S3StatusErrorInvalidRange { return .success(.pastEnd(size: nil)) }
            guard result.isOK else { return self.failure(result, "GET", name) }
            let body = result.body ?? ByteBuffer()
            let received = UInt64(body.readableBytes)
            if received == count { return .success(.bytes(body)) }
            if let length = result.contentLength, received == length, received < count {
                // A complete response that is shorter than asked: the object ends inside the range.
                return .success(.pastEnd(size: range.lowerBound + received))
            }
            return .retry("truncated body: received \(received) of \(result.contentLength ?? count) bytes")
        }
        switch outcome {
        case .bytes(let body):
            return body
        case .pastEnd(let size):
            let known: UInt64?
            if let size { known = size } else { known = try? await head(name)?.sizeBytes }
            let sizeText = known.map { " (\($0) bytes)" } ?? ""
            throw .outOfRange(
                "range \(range.lowerBound)..<\(range.upperBound) is past the end of \(name)\(sizeText) in \(description)")
        }
    }

    private enum RangeOutcome: Sendable {
        case bytes(ByteBuffer)
        case pastEnd(size: UInt64?)
    }

    public func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try ObjectName.validate(name)
        return try await perform("HEAD", name, .head) { (result) -> Verdict<ObjectInfo?> in
            if result.isOK { return .success(ObjectInfo(name: name, sizeBytes: result.contentLength ?? 0)) }
            if result.abort == nil
                && (result.s3Status == S3StatusHttpErrorNotFound || result.s3Status == S3StatusErrorNoSuchKey)
            {
                return .success(nil)
            }
            return self.failure(result, "HEAD", name)
        }
    }

    /// Largest page asked of the server (S3 returns at most 1000 keys per LIST).
    public static let listPageKeysMax: Int32 = 1000

    public func list(prefix: String) async throws(VDError) -> [ObjectInfo] {
        var results: [ObjectInfo] = []
        var marker: String?
        while true {
            let operation = S3Operation.list(prefix: prefix, marker: marker, maxKeys: Self.listPageKeysMax)
            let what = prefix.isEmpty ? "(all)" : "prefix \(prefix)"
            let page = try await perform("LIST", what, operation) { (result) -> Verdict<S3AttemptResult> in
                result.isOK ? .success(result) : self.failure(result, "LIST", what)
            }
            results.append(contentsOf: page.listed)
            guard page.isTruncated else { break }
            guard let next = page.nextMarker ?? page.listed.last?.name, next > (marker ?? "") else {
                throw VDError(
                    .backend,
                    "S3 LIST of \(what) in \(description): the server said the listing is truncated but gave no "
                        + "marker past '\(marker ?? "")'")
            }
            marker = next
        }
        results.sort { $0.name < $1.name }
        return results
    }

    public func delete(_ name: String) async throws(VDError) {
        try ObjectName.validate(name)
        try await perform("DELETE", name, .delete) { (result) -> Verdict<Void> in
            if result.isOK { return .success(()) }
            if result.abort == nil
                && (result.s3Status == S3StatusErrorNoSuchKey || result.s3Status == S3StatusHttpErrorNotFound)
            {
                return .success(())
            }
            return self.failure(result, "DELETE", name)
        }
    }

    public func verifyAccess() async throws(VDError) {
        let bucket = configuration.bucket
        try await perform("GET location of", "bucket \(bucket)", .testBucket) { (result) -> Verdict<Void> in
            if result.isOK { return .success(()) }
            if result.abort == nil && result.s3Status == S3StatusHttpErrorNotFound {
                return .fail(self.missingBucket())
            }
            return self.failure(result, "GET location of", "bucket \(bucket)")
        }
    }

    /// Creates the bucket; an existing bucket of the same owner is fine. For tests and first-time setup.
    public func createBucketIfMissing() async throws(VDError) {
        let bucket = configuration.bucket
        try await perform("CREATE", "bucket \(bucket)", .createBucket) { (result) -> Verdict<Void> in
            if result.isOK || result.s3Status == S3StatusErrorBucketAlreadyOwnedByYou { return .success(()) }
            if result.s3Status == S3StatusErrorBucketAlreadyExists {
                return .fail(
                    VDError(
                        .configuration,
                        "bucket \(bucket) at \(self.configuration.endpoint) belongs to another account; choose "
                            + "another bucket name"))
            }
            return self.failure(result, "CREATE", "bucket \(bucket)")
        }
    }

    // MARK: retries

    private enum Verdict<T> {
        case success(T)
        case retry(String)
        case fail(VDError)
    }

    /// Runs attempts of `operation` until `interpret` accepts or rejects one, or the retry bounds run out.
    private func perform<T>(
        _ verb: String, _ object: String, _ operation: S3Operation,
        interpret: (S3AttemptResult) -> Verdict<T>
    ) async throws(VDError) -> T {
        let configuration = self.configuration
        let startNanoseconds = monotonicNanoseconds()
        let deadlineNanoseconds = startNanoseconds + UInt64(configuration.operationDeadlineSeconds * 1e9)
        var random = SystemRandomNumberGenerator()
        var attempt = 0
        var lastFailure = ""
        var lastWasTimeout = false
        let key: String
        switch operation {
        case .put, .get, .head, .delete: key = object
        case .list, .testBucket, .createBucket: key = ""
        }
        while true {
            attempt += 1
            let now = monotonicNanoseconds()
            let remainingSeconds = Double(deadlineNanoseconds &- now) / 1e9
            if now >= deadlineNanoseconds {
                throw exhausted(verb, object, attempt - 1, startNanoseconds, lastFailure, lastWasTimeout)
            }
            let request = S3Request(
                operation: operation, key: key,
                timeoutSeconds: min(configuration.requestTimeoutSeconds, remainingSeconds),
                stallTimeoutSeconds: configuration.stallTimeoutSeconds,
                bodySizeBytesMax: configuration.objectSizeBytesMax)
            let result = await loop.perform(request)
            let verdict: Verdict<T>
            switch result.abort {
            case .timedOut(let seconds):
                verdict = .retry("no complete response within the request timeout of \(seconds) s")
            case .stalled(let seconds):
                verdict = .retry("the transfer stalled (no byte moved for \(seconds) s)")
            case .cancelled:
                throw VDError(.shutdown, "S3 \(verb) of \(object) in \(description) was cancelled")
            case .shutdown:
                throw VDError(.shutdown, "the S3 store \(description) is shut down (\(verb) of \(object))")
            case .queueFull(let limit):
                throw VDError(
                    .busy, "S3 \(verb) of \(object): \(limit) requests are already waiting for \(description)")
            case .tooLarge(let bytes):
                verdict = .fail(
                    VDError(
                        .backend,
                        "S3 \(verb) of \(object) in \(description): the response (\(bytes) bytes) is larger than "
                            + "expected (bound \(configuration.objectSizeBytesMax) bytes)"))
            case nil:
                verdict = interpret(result)
            }
            switch verdict {
            case .success(let value):
                if attempt > 1 {
                    logger.debug(
                        "S3 operation succeeded after retries",
                        metadata: ["operation": "\(verb)", "object": "\(object)", "attempts": "\(attempt)"])
                }
                return value
            case .fail(let error):
                throw error
            case .retry(let reason):
                lastFailure = reason
                if case .timedOut = result.abort {
                    lastWasTimeout = true
                } else if case .stalled = result.abort {
                    lastWasTimeout = true
                } else {
                    lastWasTimeout = false
                }
                logger.debug(
                    "S3 request failed, retrying",
                    metadata: [
                        "operation": "\(verb)", "object": "\(object)", "attempt": "\(attempt)", "reason": "\(reason)",
                    ])
                guard attempt < configuration.retry.attemptsMax else {
                    throw exhausted(verb, object, attempt, startNanoseconds, lastFailure, lastWasTimeout)
                }
                let delay = configuration.retry.delaySeconds(afterAttempt: attempt, using: &random)
                let delayNanoseconds = UInt64(delay * 1e9)
                if monotonicNanoseconds() + delayNanoseconds >= deadlineNanoseconds {
                    throw exhausted(verb, object, attempt, startNanoseconds, lastFailure, lastWasTimeout)
                }
                do {
                    try await Task.sleep(nanoseconds: delayNanoseconds)
                } catch {
                    throw VDError(.shutdown, "S3 \(verb) of \(object) in \(description) was cancelled")
                }
            }
        }
    }

    private func exhausted(
        _ verb: String, _ object: String, _ attempts: Int, _ startNanoseconds: UInt64, _ lastFailure: String,
        _ lastWasTimeout: Bool
    ) -> VDError {
        let elapsed = Double(monotonicNanoseconds() - startNanoseconds) / 1e9
        let seconds = "\(Double(Int(elapsed * 10)) / 10)"
        return VDError(
            lastWasTimeout ? .timeout : .backend,
            "S3 \(verb) of \(object) in \(description) failed after \(attempts) attempt\(attempts == 1 ? "" : "s") "
                + "in \(seconds) s (bounds: \(configuration.retry.attemptsMax) attempts, "
                + "\(configuration.operationDeadlineSeconds) s); last failure: \(lastFailure)")
    }

    private func missingBucket() -> VDError {
        VDError(
            .configuration,
            "bucket \(configuration.bucket) does not exist at \(configuration.scheme.rawValue)://"
                + "\(configuration.endpoint): create bucket \(configuration.bucket) (for example `s3cmd mb "
                + "s3://\(configuration.bucket)`) or fix the bucket name in the backend URL")
    }

    /// Classifies a failed attempt: retry transient failures, map the rest to the error the caller should see.
    private func failure<T>(_ result: S3AttemptResult, _ verb: String, _ object: String) -> Verdict<T> {
        let status = result.s3Status
        var detail = result.statusName
        if let message = result.errorMessage, !message.isEmpty { detail += ": \(message)" }
        let endpoint = configuration.endpoint
        let accessKey = configuration.accessKeyID
        switch status {
        case S3StatusFailedToConnect, S3StatusConnectionFailed:
            return .retry("cannot connect to \(endpoint) or the connection failed (\(detail))")
        case S3StatusNameLookupError:
            return .retry("cannot resolve the host of \(endpoint) (\(detail))")
        case S3StatusInternalError, S3StatusInterrupted:
            return .retry("the connection to \(endpoint) failed or was reset (\(detail))")
        case S3StatusXmlParseFailure:
            return .retry("unreadable error response from \(endpoint) (\(detail))")
        case S3StatusErrorInternalError:
            return .retry("server error, HTTP 500 (\(detail))")
        case S3StatusErrorSlowDown:
            return .retry("the server asks to slow down, HTTP 503 (\(detail))")
        case S3StatusErrorRequestTimeout, S3StatusErrorIncompleteBody, S3StatusErrorOperationAborted,
            S3StatusHttpErrorUnknown, S3StatusErrorUnknown, S3StatusHttpErrorConflict:
            return .retry("transient server failure (\(detail))")
        case S3StatusErrorBadDigest, S3StatusErrorInvalidDigest:
            return .retry("the server received a body that does not match its Content-MD5 (\(detail))")
        case S3StatusErrorSignatureDoesNotMatch:
            return .fail(
                VDError(
                    .authentication,
                    "the S3 endpoint \(endpoint) rejected the signature of access key ID \(accessKey) on \(verb) "
                        + "\(object) (\(detail)): the secret access key does not belong to this access key ID; "
                        + "check AWS_SECRET_ACCESS_KEY"))
        case S3StatusErrorInvalidAccessKeyId:
            return .fail(
                VDError(
                    .authentication,
                    "the S3 endpoint \(endpoint) does not know access key ID \(accessKey) (\(detail)); "
                        + "check AWS_ACCESS_KEY_ID"))
        case S3StatusErrorAccessDenied, S3StatusHttpErrorForbidden, S3StatusErrorAccountProblem,
            S3StatusErrorExpiredToken, S3StatusErrorInvalidToken, S3StatusErrorNotSignedUp,
            S3StatusErrorInvalidSecurity, S3StatusErrorMissingSecurityHeader, S3StatusErrorCredentialsNotSupported:
            return .fail(
                VDError(
                    .authentication,
                    "the S3 endpoint \(endpoint) refused \(verb) \(object) in bucket \(configuration.bucket) for "
                        + "access key ID \(accessKey) (\(detail)); check the credentials and the bucket's "
                        + "permissions"))
        case S3StatusErrorRequestTimeTooSkewed:
            // Retried: libs3 formats each request's date with gmtime(), which is not thread-safe, so concurrent
            // requests now and then send a garbled date that the server reads as skew. A real skew fails every
            // attempt and ends with this message.
            return .retry(
                "the S3 endpoint \(endpoint) rejected \(verb) \(object) because this machine's clock differs too "
                    + "much from the server's (\(detail)); synchronise the clock")
        case S3StatusErrorNoSuchBucket:
            return .fail(missingBucket())
        case S3StatusErrorNoSuchKey, S3StatusHttpErrorNotFound:
            return .fail(.notFound("object \(object) does not exist in \(description)"))
        case S3StatusErrorInvalidRange:
            return .fail(.outOfRange("S3 \(verb) of \(object): the range is past the end of the object (\(detail))"))
        case S3StatusErrorPermanentRedirect, S3StatusErrorTemporaryRedirect, S3StatusHttpErrorMovedTemporarily,
            S3StatusErrorRedirect:
            return .fail(
                VDError(
                    .configuration,
                    "the S3 endpoint \(endpoint) redirects \(verb) \(object) (\(detail)): the bucket lives at another "
                        + "endpoint or needs the other URI style (style=path or style=virtual-host)"))
        default:
            return .fail(
                VDError(.backend, "S3 \(verb) of \(object) in \(description) was refused: \(detail)"))
        }
    }
}

/// Encodings S3 needs: base64 for Content-MD5, hex for ETags.
package enum S3Encoding {
    private static let base64Alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let hexDigits = Array("0123456789abcdef".utf8)

    package static func md5(_ buffer: ByteBuffer) -> [UInt8] {
        var hasher = Insecure.MD5()
        buffer.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) }
        return Array(hasher.finalize())
    }

    static func base64(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var index = 0
        while index < bytes.count {
            let b0 = UInt32(bytes[index])
            let b1 = index + 1 < bytes.count ? UInt32(bytes[index + 1]) : 0
            let b2 = index + 2 < bytes.count ? UInt32(bytes[index + 2]) : 0
            let triple = b0 << 16 | b1 << 8 | b2
            out.append(base64Alphabet[Int(triple >> 18 & 63)])
            out.append(base64Alphabet[Int(triple >> 12 & 63)])
            out.append(index + 1 < bytes.count ? base64Alphabet[Int(triple >> 6 & 63)] : UInt8(ascii: "="))
            out.append(index + 2 < bytes.count ? base64Alphabet[Int(triple & 63)] : UInt8(ascii: "="))
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func hex(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(hexDigits[Int(byte >> 4)])
            out.append(hexDigits[Int(byte & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The lower-case MD5 hex of an ETag that is a plain MD5 (`"0123…"`); nil for multipart or other ETags.
    static func plainMD5ETag(_ eTag: String) -> String? {
        var text = Substring(eTag)
        if text.hasPrefix("\"") && text.hasSuffix("\"") && text.count >= 2 { text = text.dropFirst().dropLast() }
        guard text.utf8.count == 32, text.utf8.allSatisfy({ isHexDigit($0) }) else { return nil }
        return text.lowercased()
    }

    private static func isHexDigit(_ byte: UInt8) -> Bool {
        (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "f"))
            || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "F"))
    }
}
