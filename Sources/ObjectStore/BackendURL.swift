// Backend URLs as operators write them in configuration and on the command line:
//   file:///var/lib/vd/objects                                       a local directory
//   s3://BUCKET?endpoint=HOST:PORT&scheme=https&region=R&signature=v4&style=path   an S3-compatible bucket
// S3 parameters: endpoint (required), scheme (https, default, or http), region (us-east-1), signature (v4, default,
// or v2), style (path, default, or virtual-host), ca_file (a PEM CA for https), insecure_skip_verify (false),
// create_only (true: If-None-Match on every object created).
// Credentials never appear in the URL: they come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (an injectable
// environment, so tests need not touch the process's). Every malformed URL is rejected with a message that says what
// to write instead; nothing here sends a request.

public import VolumeCore

/// Which backend to open, and how.
public enum BackendSpec: Sendable, Hashable, CustomStringConvertible {
    case local(directory: String)
    case s3(S3Configuration)

    public var description: String {
        switch self {
        case .local(let directory): "local directory \(directory)"
        case .s3(let configuration): configuration.description
        }
    }

    /// Parses a backend URL. `environment` supplies AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for `s3://` URLs.
    public static func parse(_ url: String, environment: [String: String]) throws(VDError) -> BackendSpec {
        func bad(_ message: String) -> VDError {
            VDError(.configuration, "backend URL '\(url)': \(message)")
        }
        let examples = "use file:///DIRECTORY or s3://BUCKET?endpoint=HOST:PORT&scheme=https&region=us-east-1"
        guard let schemeEnd = url.range(of: "://") else { throw bad("no scheme; \(examples)") }
        let scheme = url[..<schemeEnd.lowerBound].lowercased()
        let rest = url[schemeEnd.upperBound...]
        switch scheme {
        case "file":
            guard rest.hasPrefix("/") else {
                throw bad("a file URL needs an absolute path (three slashes: file:///DIRECTORY)")
            }
            guard !rest.contains("?"), !rest.contains("#") else {
                throw bad("a file URL takes no query or fragment")
            }
            var directory = String(rest)
            while directory.count > 1 && directory.hasSuffix("/") { directory.removeLast() }
            return .local(directory: try percentDecoded(directory, url: url))
        case "s3":
            return .s3(try parseS3(rest, url: url, environment: environment, bad: bad))
        default:
            throw bad("unknown scheme '\(scheme)'; \(examples)")
        }
    }

    private static func parseS3(
        _ rest: Substring, url: String, environment: [String: String], bad: (String) -> VDError
    ) throws(VDError) -> S3Configuration {
        let bucketPart: Substring
        let query: Substring
        if let mark = rest.firstIndex(of: "?") {
            bucketPart = rest[..<mark]
            query = rest[rest.index(after: mark)...]
        } else {
            bucketPart = rest
            query = ""
        }
        var bucket = bucketPart
        if bucket.hasSuffix("/") { bucket = bucket.dropLast() }
        guard !bucket.isEmpty else { throw bad("no bucket; write s3://BUCKET?endpoint=HOST:PORT") }
        guard !bucket.contains("/") else {
            throw bad("'\(bucket)' is not a bucket name (a path inside the bucket is not supported)")
        }
        guard !bucket.contains("@") else {
            throw bad("credentials do not belong in the URL; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        }
        var endpoint: String?
        var scheme = S3Configuration.Scheme.https
        var style = S3Configuration.URIStyle.path
        var signature = S3Configuration.Signature.v4
        var region = "us-east-1"
        var caFile: String?
        var insecureSkipVerify = false
        var createOnly = true
        func flag(_ name: String, _ value: String) throws(VDError) -> Bool {
            switch value.lowercased() {
            case "true", "1", "yes": return true
            case "false", "0", "no": return false
            default: throw bad("\(name) must be true or false, not '\(value)'")
            }
        }
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let name = String(parts[0])
            let value = parts.count > 1 ? try percentDecoded(String(parts[1]), url: url) : ""
            switch name {
            case "endpoint":
                endpoint = value
            case "scheme":
                guard let parsed = S3Configuration.Scheme(rawValue: value.lowercased()) else {
                    throw bad("scheme must be http or https, not '\(value)'")
                }
                scheme = parsed
            case "style":
                switch value.lowercased() {
                case "path": style = .path
                case "virtual-host", "virtualhost", "virtual", "host": style = .virtualHost
                default: throw bad("style must be path or virtual-host, not '\(value)'")
                }
            case "signature":
                guard let parsed = S3Configuration.Signature(rawValue: value.lowercased()) else {
                    throw bad("signature must be v4 or v2, not '\(value)'")
                }
                signature = parsed
            case "region":
                region = value
            case "ca_file":
                guard value.hasPrefix("/") else { throw bad("ca_file must be an absolute path, not '\(value)'") }
                caFile = value
            case "insecure_skip_verify":
                insecureSkipVerify = try flag(name, value)
            case "create_only":
                createOnly = try flag(name, value)
            default:
                throw bad(
                    "unknown parameter '\(name)' (known: endpoint, scheme, region, signature, style, ca_file, "
                        + "insecure_skip_verify, create_only)")
            }
        }
        guard let endpoint, !endpoint.isEmpty else {
            throw bad("no endpoint; add ?endpoint=HOST:PORT (for example endpoint=127.0.0.1:7480)")
        }
        if let colon = endpoint.lastIndex(of: ":") {
            let host = endpoint[..<colon]
            let port = endpoint[endpoint.index(after: colon)...]
            guard !host.isEmpty else { throw bad("the endpoint '\(endpoint)' has no host") }
            guard let number = UInt16(port), number > 0 else {
                throw bad("the endpoint '\(endpoint)' has a bad port '\(port)'; use a number in 1-65535")
            }
        }
        guard let accessKey = environment["AWS_ACCESS_KEY_ID"], !accessKey.isEmpty else {
            throw VDError(
                .configuration, "backend URL '\(url)': no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        }
        guard let secret = environment["AWS_SECRET_ACCESS_KEY"], !secret.isEmpty else {
            throw VDError(
                .configuration,
                "backend URL '\(url)': AWS_SECRET_ACCESS_KEY is not set (for access key ID \(accessKey))")
        }
        let configuration = S3Configuration(
            endpoint: endpoint, bucket: String(bucket), uriStyle: style, scheme: scheme, accessKeyID: accessKey,
            secretAccessKey: S3Secret(secret), signature: signature, region: region, caFile: caFile,
            insecureSkipVerify: insecureSkipVerify, createOnly: createOnly)
        do {
            try configuration.validate()
        } catch {
            throw VDError(.configuration, "backend URL '\(url)': \(error.message)")
        }
        return configuration
    }

    private static func percentDecoded(_ text: String, url: String) throws(VDError) -> String {
        guard text.contains("%") else { return text }
        var bytes: [UInt8] = []
        var iterator = Array(text.utf8)[...]
        while let byte = iterator.popFirst() {
            if byte == UInt8(ascii: "%") {
                guard iterator.count >= 2,
                    let value = UInt8(String(decoding: iterator.prefix(2), as: UTF8.self), radix: 16)
                else {
                    throw VDError(.configuration, "backend URL '\(url)': bad percent escape in '\(text)'")
                }
                bytes.append(value)
                iterator = iterator.dropFirst(2)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Opens the store a spec describes. Sends no request: call `verifyAccess()` on the result to check it works.
public func makeObjectStore(_ spec: BackendSpec) throws(VDError) -> any ObjectStore {
    switch spec {
    case .local(let directory): try LocalDirectoryStore(root: directory)
    case .s3(let configuration): try S3Store(configuration: configuration)
    }
}
