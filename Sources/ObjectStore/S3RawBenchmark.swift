// The baseline for tools/bench/s3-upload: plain libs3 S3_put_object with no store around it, sequential (blocking
// calls, no request context) and concurrent (one request context, K requests in flight, driven by S3_runonce on the
// calling thread). It lives here because ObjectStore is the only target that may import CLibS3. Not used by the
// product; blocking by design (run it on a thread of its own, never on an event loop).

import CLibS3
package import NIOCore
package import VolumeCore

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif

/// Raw libs3 upload throughput, for comparison with S3Store.
package enum S3RawPutBenchmark {
    private final class Upload {
        let body: UnsafeRawBufferPointer
        var offset = 0
        var status = S3StatusOK
        var done = false
        init(body: UnsafeRawBufferPointer) { self.body = body }
    }

    /// How the raw uploads carry Content-MD5.
    package enum ContentMD5: Sendable {
        /// No Content-MD5 header.
        case none
        /// The header, computed once before timing starts.
        case precomputed
        /// The header, computed for every object inside the timed run (on the submitting thread), like S3Store.
        case perObject
    }

    /// Uploads `names.count` copies of `body` with `concurrency` requests in flight (1 = blocking calls, one after
    /// another) and returns the seconds it took. Throws `.backend` naming the first failed object.
    package static func run(
        configuration: S3Configuration, names: [String], body: ByteBuffer, concurrency: Int, contentMD5: ContentMD5
    ) throws(VDError) -> Double {
        try configuration.validate()
        try S3RequestLoop.initializeLibrary()
        let precomputed = contentMD5 == .none ? nil : S3Encoding.base64(S3Encoding.md5(body))
        func md5() -> String? { contentMD5 == .perObject ? S3Encoding.base64(S3Encoding.md5(body)) : precomputed }
        let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(body.readableBytes, 1), alignment: 16)
        defer { storage.deallocate() }
        body.withUnsafeReadableBytes { storage.copyMemory(from: $0) }
        let raw = UnsafeRawBufferPointer(rebasing: storage[0..<body.readableBytes])
        do {
            let start = monotonicNanoseconds()
            if concurrency <= 1 {
                for name in names {
                    let upload = Upload(body: raw)
                    put(name, upload, configuration: configuration, md5: md5(), context: nil)
                    guard upload.status == S3StatusOK else { throw failure(name, upload.status) }
                }
            } else {
                var context: OpaquePointer?
                guard S3_create_request_context(&context) == S3StatusOK, let context else {
                    throw VDError(.backend, "libs3 could not create a request context")
                }
                defer { S3_destroy_request_context(context) }
                var inFlight: [(String, Upload)] = []
                var next = 0
                while next < names.count || !inFlight.isEmpty {
                    while inFlight.count < concurrency && next < names.count {
                        let upload = Upload(body: raw)
                        put(names[next], upload, configuration: configuration, md5: md5(), context: context)
                        inFlight.append((names[next], upload))
                        next += 1
                    }
                    var readSet = fd_set()
                    var writeSet = fd_set()
                    var exceptSet = fd_set()
                    var maxFD: Int32 = -1
                    _ = S3_get_request_context_fdsets(context, &readSet, &writeSet, &exceptSet, &maxFD)
                    if maxFD >= 0 {
                        let timeout = S3_get_request_context_timeout(context)
                        let milliseconds = timeout < 0 ? 100 : min(timeout, 100)
                        var interval = timeval(tv_sec: 0, tv_usec: Int(milliseconds) * 1000)
                        _ = select(maxFD + 1, &readSet, &writeSet, &exceptSet, &interval)
                    }
                    var remaining: Int32 = 0
                    _ = S3_runonce_request_context(context, &remaining)
                    for (name, upload) in inFlight where upload.done && upload.status != S3StatusOK {
                        throw failure(name, upload.status)
                    }
                    inFlight.removeAll { $0.1.done }
                }
            }
            return Double(monotonicNanoseconds() - start) / 1e9
        }
    }

    private static func failure(_ name: String, _ status: S3Status) -> VDError {
        VDError(.backend, "raw libs3 PUT of \(name) failed: \(String(cString: S3_get_status_name(status)))")
    }

    private static func put(
        _ name: String, _ upload: Upload, configuration: S3Configuration, md5: String?, context: OpaquePointer?
    ) {
        let data = Unmanaged.passRetained(upload).toOpaque()
        var handler = S3PutObjectHandler(
            responseHandler: S3ResponseHandler(
                propertiesCallback: { _, _ in S3StatusOK },
                completeCallback: { status, _, data in
                    let upload = Unmanaged<Upload>.fromOpaque(data!).takeRetainedValue()
                    upload.status = status
                    upload.done = true
                }),
            putObjectDataCallback: { size, buffer, data in
                let upload = Unmanaged<Upload>.fromOpaque(data!).takeUnretainedValue()
                let count = min(Int(size), upload.body.count - upload.offset)
                guard count > 0, let buffer else { return 0 }
                UnsafeMutableRawPointer(buffer).copyMemory(
                    from: upload.body.baseAddress! + upload.offset, byteCount: count)
                upload.offset += count
                return Int32(count)
            })
        configuration.endpoint.withCString { host in
            configuration.bucket.withCString { bucket in
                configuration.accessKeyID.withCString { accessKey in
                    configuration.secretAccessKey.value.withCString { secret in
                        var bucketContext = S3BucketContext(
                            hostName: host, bucketName: bucket,
                            protocol: configuration.scheme == .https ? S3ProtocolHTTPS : S3ProtocolHTTP,
                            uriStyle: configuration.uriStyle == .path ? S3UriStylePath : S3UriStyleVirtualHost,
                            accessKeyId: accessKey, secretAccessKey: secret)
                        func send(_ md5: UnsafePointer<CChar>?) {
                            var properties = S3PutProperties(
                                contentType: nil, md5: md5, cacheControl: nil, contentDispositionFilename: nil,
                                contentEncoding: nil, expires: -1, cannedAcl: S3CannedAclPrivate, metaDataCount: 0,
                                metaData: nil)
                            S3_put_object(
                                &bucketContext, name, UInt64(upload.body.count), &properties, context, &handler, data)
                        }
                        if let md5 { md5.withCString { send($0) } } else { send(nil) }
                    }
                }
            }
        }
    }
}

/// The V4 transport alone (AsyncHTTPClient + signing, no S3Store retries, Content-MD5 computed once beforehand): the
/// "raw transport" S3Store's V4 uploads are compared with in `vd-bench-s3`.
package enum S3RawV4PutBenchmark {
    /// Seconds to PUT `body` under every name in `names`, `concurrency` at a time, with Content-MD5 computed once;
    /// with `checkPerPut`, each PUT computes and sends that check itself (as S3Store does), so the hashing and the
    /// store's verification are in the comparison too.
    package static func run(
        configuration: S3Configuration, names: [String], body: ByteBuffer, concurrency: Int,
        checkPerPut: S3Store.PayloadIntegrity? = nil
    ) async throws(VDError) -> Double {
        var v4 = configuration
        v4.signature = .v4
        try v4.validate()
        let configuration = v4
        let transport = try S3HTTPTransport(configuration: configuration, now: S3Store.systemSeconds)
        defer { transport.shutdown() }
        let md5 = S3Encoding.base64(S3Encoding.md5(body))
        let start = monotonicNanoseconds()
        let failure = await withTaskGroup(of: String?.self) { group -> String? in
            var failure: String?
            for (index, name) in names.enumerated() {
                if index >= concurrency, let result = await group.next(), let result { failure = failure ?? result }
                group.addTask {
                    let (contentMD5, sha256) = checkPerPut?.headers(for: body) ?? (md5, nil)
                    let request = S3Request(
                        operation: .put(body: body, md5Base64: contentMD5, payloadSHA256: sha256, createOnly: false),
                        key: name,
                        timeoutSeconds: configuration.requestTimeoutSeconds,
                        stallTimeoutSeconds: configuration.stallTimeoutSeconds,
                        bodySizeBytesMax: configuration.objectSizeBytesMax)
                    let result = await transport.perform(request)
                    return result.isOK ? nil : "PUT \(name): \(result.statusName) \(result.errorMessage ?? "")"
                }
            }
            for await result in group { if let result { failure = failure ?? result } }
            return failure
        }
        if let failure { throw VDError(.backend, "raw V4 benchmark: \(failure)") }
        return Double(monotonicNanoseconds() - start) / 1e9
    }
}
