// Configuration of the S3 backend: where the bucket is, how to sign, and the bounds on time, concurrency and retries.
// Validated once at start-up (`validate()`), so a bad value fails loudly before any request is sent. The secret key is
// wrapped in `S3Secret`, whose description, debug description and mirror never show it: printing, logging or
// dumping a configuration cannot leak it.

public import VolumeCore

/// A secret access key. Its text is only handed to libs3 to sign requests; every printed form is redacted.
public struct S3Secret: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    let value: String

    public init(_ value: String) { self.value = value }

    public var isEmpty: Bool { value.isEmpty }
    public var description: String { "<redacted>" }
    public var debugDescription: String { "<redacted>" }
    public var customMirror: Mirror { Mirror(self, children: [:]) }
}

/// How requests are retried: exponential backoff with full jitter, bounded by a count and by the operation deadline.
public struct S3RetryPolicy: Sendable, Hashable {
    /// The first backoff is drawn uniformly from `0...baseDelaySeconds`; each retry doubles the upper bound.
    public var baseDelaySeconds: Double
    /// The upper bound of a single backoff.
    public var maxDelaySeconds: Double
    /// Attempts per operation (the first one included). Together with the deadline this bounds every retry loop.
    public var attemptsMax: Int

    public init(baseDelaySeconds: Double = 0.05, maxDelaySeconds: Double = 2, attemptsMax: Int = 10) {
        self.baseDelaySeconds = baseDelaySeconds
        self.maxDelaySeconds = maxDelaySeconds
        self.attemptsMax = attemptsMax
    }

    /// The backoff before attempt `attempt + 1` (attempt counts from 1), full jitter: uniform in `0...cap`.
    public func delaySeconds(afterAttempt attempt: Int, using random: inout some RandomNumberGenerator) -> Double {
        let exponent = Double(min(max(attempt - 1, 0), 30))
        let cap = min(maxDelaySeconds, baseDelaySeconds * pow2(exponent))
        guard cap > 0 else { return 0 }
        return Double.random(in: 0...cap, using: &random)
    }

    private func pow2(_ exponent: Double) -> Double {
        var result = 1.0
        var left = Int(exponent)
        while left > 0 {
            result *= 2
            left -= 1
        }
        return result
    }
}

/// Everything `S3Store` needs to reach one bucket. Credentials are never part of `description`.
public struct S3Configuration: Sendable, Hashable, CustomStringConvertible {
    /// Addressing of the bucket in URLs: `http://HOST/BUCKET/KEY` (path) or `http://BUCKET.HOST/KEY` (virtual host).
    public enum URIStyle: String, Sendable, Hashable, CaseIterable {
        case path
        case virtualHost = "virtual-host"
    }

    /// Transport. With signature V4, `https` verifies the server's certificate (system roots, or `caFile`); libs3
    /// (signature V2) cannot verify certificates, so V2 over https needs `insecureSkipVerify` written out.
    public enum Scheme: String, Sendable, Hashable, CaseIterable {
        case http
        case https
    }

    /// How requests are signed: AWS signature V4 (every current store; AsyncHTTPClient) or V2 (older stores; libs3).
    public enum Signature: String, Sendable, Hashable, CaseIterable {
        case v4
        case v2
    }

    /// `HOST:PORT` (or `HOST`) of the S3 endpoint.
    public var endpoint: String
    public var bucket: String
    public var uriStyle: URIStyle
    public var scheme: Scheme
    public var accessKeyID: String
    public var secretAccessKey: S3Secret
    public var signature: Signature
    /// The region V4 signatures name (RGW, MinIO and most single-site stores accept `us-east-1`).
    public var region: String
    /// PEM file of the CA that signs the server's certificate (instead of the system's roots). V4 only.
    public var caFile: String?
    /// Accept any certificate over https: only when written out, for test set-ups.
    public var insecureSkipVerify: Bool
    /// Create every object with `If-None-Match: *`, so an existing name is never overwritten (V4 only; a store that
    /// does not implement it answers 501 and the store then stops asking).
    public var createOnly: Bool
    /// V4: objects larger than this go up as multipart uploads (parts of `multipartPartBytes`, `multipartConcurrency`
    /// at a time; a failed upload is aborted). The default keeps 64 MiB SCOs (the default size) single PUTs.
    public var multipartThresholdBytes: UInt64 = 64 << 20
    public var multipartPartBytes: UInt64 = 16 << 20
    public var multipartConcurrency: Int = 4

    /// Longest time one HTTP request may take, start to end (a 64 MiB transfer must fit in it).
    public var requestTimeoutSeconds: Double
    /// Longest time a request may go without moving a byte in either direction before it is aborted and retried.
    public var stallTimeoutSeconds: Double
    /// Longest time one store operation (all its attempts and backoffs) may take before it fails.
    public var operationDeadlineSeconds: Double
    /// HTTP requests in flight at once; further requests wait in a queue.
    public var inFlightRequestsMax: Int
    /// Requests that may wait for a free in-flight slot; beyond this, operations fail with `.busy` at once.
    public var queuedRequestsMax: Int
    /// Largest object `get` accepts (bounds the memory of one response).
    public var objectSizeBytesMax: UInt64
    /// Whole-object GETs are checked against the ETag when it is a plain MD5 (single-part upload); a mismatch is
    /// retried like a truncated body.
    public var verifiesWholeObjectMD5: Bool
    public var retry: S3RetryPolicy

    public init(
        endpoint: String,
        bucket: String,
        uriStyle: URIStyle = .path,
        scheme: Scheme = .http,
        accessKeyID: String,
        secretAccessKey: S3Secret,
        signature: Signature = .v4,
        region: String = "us-east-1",
        caFile: String? = nil,
        insecureSkipVerify: Bool = false,
        createOnly: Bool = true,
        requestTimeoutSeconds: Double = 120,
        stallTimeoutSeconds: Double = 15,
        operationDeadlineSeconds: Double = 300,
        inFlightRequestsMax: Int = 16,
        queuedRequestsMax: Int = 4096,
        objectSizeBytesMax: UInt64 = Limits.scoSizeBytesMax,
        verifiesWholeObjectMD5: Bool = true,
        retry: S3RetryPolicy = S3RetryPolicy()
    ) {
        self.endpoint = endpoint
        self.bucket = bucket
        self.uriStyle = uriStyle
        self.scheme = scheme
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.signature = signature
        self.region = region
        self.caFile = caFile
        self.insecureSkipVerify = insecureSkipVerify
        self.createOnly = createOnly
        self.requestTimeoutSeconds = requestTimeoutSeconds
        self.stallTimeoutSeconds = stallTimeoutSeconds
        self.operationDeadlineSeconds = operationDeadlineSeconds
        self.inFlightRequestsMax = inFlightRequestsMax
        self.queuedRequestsMax = queuedRequestsMax
        self.objectSizeBytesMax = objectSizeBytesMax
        self.verifiesWholeObjectMD5 = verifiesWholeObjectMD5
        self.retry = retry
    }

    /// `s3://BUCKET at http://HOST:PORT (path style, access key AKID)`: for logs and messages.
    public var description: String {
        "s3://\(bucket) at \(scheme.rawValue)://\(endpoint) (\(uriStyle.rawValue) style, signature "
            + "\(signature.rawValue)\(signature == .v4 ? ", region \(region)" : ""), access key \(accessKeyID))"
    }

    /// The largest number of in-flight requests accepted (each is one TCP connection and one select() descriptor).
    public static let inFlightRequestsMaxLimit = 256
    /// The largest waiting-queue length accepted.
    public static let queuedRequestsMaxLimit = 1 << 20

    /// Throws `.configuration` naming the first bad field.
    public func validate() throws(VDError) {
        func bad(_ message: String) -> VDError { VDError(.configuration, "S3 configuration: \(message)") }
        guard !endpoint.isEmpty else { throw bad("the endpoint is empty; give HOST:PORT") }
        if let colon = endpoint.lastIndex(of: ":") {
            let host = endpoint[..<colon]
            let port = endpoint[endpoint.index(after: colon)...]
            guard !host.isEmpty else { throw bad("the endpoint '\(endpoint)' has no host") }
            guard let number = UInt16(port), number > 0 else {
                throw bad("the endpoint '\(endpoint)' has a bad port '\(port)' (1-65535)")
            }
        }
        guard endpoint.utf8.count <= 255, !endpoint.contains("/") else {
            throw bad("the endpoint '\(endpoint)' must be HOST or HOST:PORT (no scheme, no path)")
        }
        try Self.validateBucketName(bucket, style: uriStyle)
        guard !accessKeyID.isEmpty else { throw bad("the access key ID is empty (set AWS_ACCESS_KEY_ID)") }
        guard !secretAccessKey.isEmpty else {
            throw bad("the secret access key for access key \(accessKeyID) is empty (set AWS_SECRET_ACCESS_KEY)")
        }
        guard !region.isEmpty, region.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "/") }) else {
            throw bad("the region '\(region)' must be a name like us-east-1")
        }
        if signature == .v2 && scheme == .https && !insecureSkipVerify {
            throw bad(
                "signature v2 goes through libs3, which cannot verify the server's certificate over https: use "
                    + "signature=v4 (verified TLS), or write insecure_skip_verify=true to accept an unverified "
                    + "connection")
        }
        if signature == .v2 && caFile != nil {
            throw bad("ca_file needs signature=v4 (libs3, used for v2, cannot verify certificates)")
        }
        guard multipartPartBytes >= 5 << 20, multipartPartBytes <= 5 << 30 else {
            throw bad("multipartPartBytes must be in 5 MiB...5 GiB (S3's bounds on a part)")
        }
        guard multipartThresholdBytes >= multipartPartBytes else {
            throw bad("multipartThresholdBytes must be at least multipartPartBytes")
        }
        guard (1...64).contains(multipartConcurrency) else { throw bad("multipartConcurrency must be in 1...64") }
        guard requestTimeoutSeconds > 0, requestTimeoutSeconds.isFinite else {
            throw bad("requestTimeoutSeconds must be positive")
        }
        guard stallTimeoutSeconds > 0, stallTimeoutSeconds.isFinite else {
            throw bad("stallTimeoutSeconds must be positive")
        }
        guard operationDeadlineSeconds > 0, operationDeadlineSeconds.isFinite else {
            throw bad("operationDeadlineSeconds must be positive")
        }
        guard (1...Self.inFlightRequestsMaxLimit).contains(inFlightRequestsMax) else {
            throw bad("inFlightRequestsMax must be in 1...\(Self.inFlightRequestsMaxLimit), not \(inFlightRequestsMax)")
        }
        guard (1...Self.queuedRequestsMaxLimit).contains(queuedRequestsMax) else {
            throw bad("queuedRequestsMax must be in 1...\(Self.queuedRequestsMaxLimit), not \(queuedRequestsMax)")
        }
        guard objectSizeBytesMax > 0, objectSizeBytesMax <= UInt64(Int32.max) * 2 else {
            throw bad("objectSizeBytesMax must be in 1...4 GiB")
        }
        guard retry.attemptsMax >= 1, retry.attemptsMax <= 1000 else {
            throw bad("retry.attemptsMax must be in 1...1000, not \(retry.attemptsMax)")
        }
        guard retry.baseDelaySeconds >= 0, retry.maxDelaySeconds >= retry.baseDelaySeconds,
            retry.maxDelaySeconds.isFinite
        else {
            throw bad("retry delays must satisfy 0 <= baseDelaySeconds <= maxDelaySeconds")
        }
    }

    /// S3 bucket naming rules (3-63 characters of lower-case letters, digits, '.' and '-'); path style also
    /// accepts upper case and '_' like libs3 does.
    public static func validateBucketName(_ bucket: String, style: URIStyle) throws(VDError) {
        let what = "the bucket name '\(bucket)'"
        guard (3...63).contains(bucket.utf8.count) else {
            throw VDError(.configuration, "S3 configuration: \(what) must be 3 to 63 characters long")
        }
        for byte in bucket.utf8 {
            let lowerOrDigit =
                (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                || byte == UInt8(ascii: "-") || byte == UInt8(ascii: ".")
            let pathOnly =
                (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z")) || byte == UInt8(ascii: "_")
            guard lowerOrDigit || (style == .path && pathOnly) else {
                throw VDError(
                    .configuration,
                    "S3 configuration: \(what) may contain only lower-case letters, digits, '.' and '-'")
            }
        }
    }
}
