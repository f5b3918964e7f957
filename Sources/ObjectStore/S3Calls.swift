// The libs3 calls and their @convention(c) callbacks. The S3Request travels through libs3's `void *callbackData` as a
// retained Unmanaged reference: retained when the call is made, released in the complete callback, which libs3 makes
// exactly once per request (synchronously when it cannot even build the request, or from S3_runonce_request_context /
// S3_destroy_request_context on the loop thread). All strings handed to libs3 are only read during the call: libs3
// copies what it needs into its own request (URI, headers) before returning.
//
// Faults handled here: a body larger than the bound (aborted from the data callback), an error body libs3 parses into
// S3ErrorDetails (copied into Swift strings before the callback returns), a missing ETag or Content-Length.

import CLibS3
import NIOCore

enum S3Calls {
    /// Starts `request` in `context`. Loop thread only.
    static func submit(
        _ request: S3Request, target: S3Target, context: OpaquePointer, callbackData: UnsafeMutableRawPointer
    ) {
        let protocolValue = target.scheme == .https ? S3ProtocolHTTPS : S3ProtocolHTTP
        let style = target.uriStyle == .path ? S3UriStylePath : S3UriStyleVirtualHost
        let responseHandler = S3ResponseHandler(
            propertiesCallback: { properties, data in S3Calls.properties(properties, data) },
            completeCallback: { status, details, data in S3Calls.complete(status, details, data) })
        target.host.withCString { host in
            target.bucket.withCString { bucket in
                target.accessKeyID.withCString { accessKeyID in
                    target.secret.value.withCString { secret in
                        request.key.withCString { key in
                            var bucketContext = S3BucketContext(
                                hostName: host, bucketName: bucket, protocol: protocolValue, uriStyle: style,
                                accessKeyId: accessKeyID, secretAccessKey: secret)
                            switch request.operation {
                            case .put(let body, let md5, _, _):
                                withOptionalCString(md5) { md5 in
                                    var properties = S3PutProperties(
                                        contentType: nil, md5: md5, cacheControl: nil,
                                        contentDispositionFilename: nil, contentEncoding: nil, expires: -1,
                                        cannedAcl: S3CannedAclPrivate, metaDataCount: 0, metaData: nil)
                                    var handler = S3PutObjectHandler(
                                        responseHandler: responseHandler,
                                        putObjectDataCallback: { size, buffer, data in
                                            S3Calls.putData(size, buffer, data)
                                        })
                                    S3_put_object(
                                        &bucketContext, key, UInt64(body.readableBytes), &properties, context,
                                        &handler, callbackData)
                                }
                            case .get(let startByte, let byteCount):
                                var handler = S3GetObjectHandler(
                                    responseHandler: responseHandler,
                                    getObjectDataCallback: { size, buffer, data in S3Calls.getData(size, buffer, data) }
                                )
                                if byteCount > 0 {
                                    request.result.body = ByteBufferAllocator().buffer(capacity: Int(byteCount))
                                }
                                S3_get_object(
                                    &bucketContext, key, nil, startByte, byteCount, context, &handler, callbackData)
                            case .head:
                                var handler = responseHandler
                                S3_head_object(&bucketContext, key, context, &handler, callbackData)
                            case .delete:
                                var handler = responseHandler
                                S3_delete_object(&bucketContext, key, context, &handler, callbackData)
                            case .list(let prefix, let marker, let maxKeys, let delimiter):
                                var handler = S3ListBucketHandler(
                                    responseHandler: responseHandler,
                                    listBucketCallback: {
                                        truncated, next, count, contents, prefixCount, prefixes, data in
                                        S3Calls.listed(truncated, next, count, contents, prefixCount, prefixes, data)
                                    })
                                prefix.withCString { prefix in
                                    withOptionalCString(marker) { marker in
                                        withOptionalCString(delimiter) { delimiter in
                                            S3_list_bucket(
                                                &bucketContext, prefix.pointee == 0 ? nil : prefix, marker, delimiter,
                                                maxKeys, context, &handler, callbackData)
                                        }
                                    }
                                }
                            case .testBucket:
                                var handler = responseHandler
                                S3_test_bucket(
                                    protocolValue, style, accessKeyID, secret, host, bucket,
                                    Int32(request.locationBuffer.count), request.locationBuffer.baseAddress, context,
                                    &handler, callbackData)
                            case .createBucket:
                                var handler = responseHandler
                                S3_create_bucket(
                                    protocolValue, accessKeyID, secret, host, bucket, S3CannedAclPrivate, nil,
                                    context, &handler, callbackData)
                            case .createMultipart, .uploadPart, .completeMultipart, .abortMultipart, .listMultipart:
                                // S3Store sends these on signature V4 only.
                                request.result.errorMessage = "multipart uploads need signature v4"
                                S3Calls.complete(S3StatusErrorNotImplemented, nil, callbackData)
                            }
                        }
                    }
                }
            }
        }
    }

    private static func withOptionalCString<R>(_ string: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
        guard let string else { return body(nil) }
        return string.withCString { body($0) }
    }

    private static func request(_ data: UnsafeMutableRawPointer?) -> S3Request {
        Unmanaged<S3Request>.fromOpaque(data!).takeUnretainedValue()
    }

    private static func string(_ pointer: UnsafePointer<CChar>?) -> String? {
        guard let pointer else { return nil }
        return String(cString: pointer)
    }

    static func properties(
        _ properties: UnsafePointer<S3ResponseProperties>?, _ data: UnsafeMutableRawPointer?
    )
        -> S3Status
    {
        let request = request(data)
        request.progressed()
        guard let properties = properties?.pointee else { return S3StatusOK }
        request.result.contentLength = properties.contentLength
        request.result.eTag = string(properties.eTag)
        if case .get(_, let byteCount) = request.operation, byteCount == 0 {
            guard properties.contentLength <= request.bodySizeBytesMax else {
                request.result.abort = .tooLarge(bytes: properties.contentLength)
                return S3StatusAbortedByCallback
            }
            if request.result.body == nil {
                request.result.body = ByteBufferAllocator().buffer(capacity: Int(properties.contentLength))
            }
        }
        return S3StatusOK
    }

    static func complete(
        _ status: S3Status, _ details: UnsafePointer<S3ErrorDetails>?, _ data: UnsafeMutableRawPointer?
    ) {
        let request = Unmanaged<S3Request>.fromOpaque(data!).takeRetainedValue()
        request.result.status = status.rawValue
        request.result.statusName = string(S3_get_status_name(status)) ?? "status \(status.rawValue)"
        if let details = details?.pointee {
            request.result.errorMessage = string(details.message)
            request.result.errorResource = string(details.resource)
            request.result.errorFurtherDetails = string(details.furtherDetails)
        }
        request.finish()
    }

    static func putData(
        _ size: Int32, _ buffer: UnsafeMutablePointer<CChar>?, _ data: UnsafeMutableRawPointer?
    )
        -> Int32
    {
        let request = request(data)
        guard case .put(let body, _, _, _) = request.operation, let buffer, size > 0 else { return 0 }
        let count = min(Int(size), body.readableBytes - request.putOffset)
        guard count > 0 else { return 0 }
        body.withUnsafeReadableBytes { bytes in
            UnsafeMutableRawPointer(buffer).copyMemory(
                from: bytes.baseAddress! + request.putOffset, byteCount: count)
        }
        request.putOffset += count
        request.progressed()
        return Int32(count)
    }

    static func getData(_ size: Int32, _ buffer: UnsafePointer<CChar>?, _ data: UnsafeMutableRawPointer?) -> S3Status {
        let request = request(data)
        request.progressed()
        guard let buffer, size > 0 else { return S3StatusOK }
        let received = UInt64(request.result.body?.readableBytes ?? 0) + UInt64(size)
        let bound: UInt64
        if case .get(_, let byteCount) = request.operation, byteCount > 0 {
            bound = byteCount
        } else {
            bound = request.bodySizeBytesMax
        }
        guard received <= bound else {
            request.result.abort = .tooLarge(bytes: received)
            return S3StatusAbortedByCallback
        }
        if request.result.body == nil { request.result.body = ByteBufferAllocator().buffer(capacity: Int(size)) }
        request.result.body!.writeBytes(UnsafeRawBufferPointer(start: buffer, count: Int(size)))
        return S3StatusOK
    }

    static func listed(
        _ isTruncated: Int32, _ nextMarker: UnsafePointer<CChar>?, _ count: Int32,
        _ contents: UnsafePointer<S3ListBucketContent>?, _ prefixCount: Int32,
        _ prefixes: UnsafeMutablePointer<UnsafePointer<CChar>?>?, _ data: UnsafeMutableRawPointer?
    ) -> S3Status {
        let request = request(data)
        request.progressed()
        if let contents {
            for index in 0..<Int(max(count, 0)) {
                let entry = contents[index]
                guard let key = string(entry.key) else { continue }
                request.result.listed.append(ObjectInfo(name: key, sizeBytes: entry.size))
            }
        }
        if let prefixes {
            for index in 0..<Int(max(prefixCount, 0)) {
                if let prefix = string(prefixes[index]) { request.result.commonPrefixes.append(prefix) }
            }
        }
        request.result.isTruncated = isTruncated != 0
        if let marker = string(nextMarker), !marker.isEmpty { request.result.nextMarker = marker }
        return S3StatusOK
    }
}
