// The S3 backend: an ObjectStore over any S3-compatible endpoint, signed with AWS signature V4 (S3HTTPTransport, on
// AsyncHTTPClient with verified TLS) or V2 (libs3, every request run by one S3RequestLoop thread), and every operation
// retried here, the same way for both.
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
// - a PUT whose outcome is unknown is simply sent again: VolumeDriver never reuses an object name. On V4 every PUT
//   is create-only (If-None-Match: *): a 412 means the name exists, which is fine only when what is there is this
//   very body (our own earlier attempt whose reply was lost: same MD5 ETag and size); anything else is a typed
//   `.alreadyExists` error naming the object, never retried and never overwritten.
// - not retried: rejected credentials (`.authentication`, naming the access key ID, never the secret), a missing
//   object (`.notFound`), a missing bucket (`.configuration`: "create bucket X"), a range past the end
//   (`.outOfRange`).

import CLibS3
import Crypto
import Foundation
public import Logging
public import NIOCore
import Synchronization
public import VolumeCore

/// An `ObjectStore` on an S3-compatible bucket. Thread-safe; call `shutdown()` when done (also done on deinit).
public final class S3Store: ObjectStore {
    /// The configuration this store was opened with (its description never shows the secret key).
    public let configuration: S3Configuration
    private let loop: any S3Transport
    private let logger: Logger
    /// Cleared when the store answers 501 to If-None-Match (it cannot do create-only writes).
    private let sendsCreateOnly: Atomic<Bool>
    /// What the create-only probe found (nil: not asked yet).
    private let createOnlyConfirmed = Mutex<Bool?>(nil)
    /// How PUT bodies are protected (decided at the first PUT).
    private let integrity = Mutex<PayloadIntegrity?>(nil)

    /// Validates `configuration` and starts the request loop thread. Sends no request (see `verifyAccess()`).
    public convenience init(
        configuration: S3Configuration, logger: Logger = Logger(label: "vd.objectstore.s3")
    )
        throws(VDError)
    {
        try self.init(configuration: configuration, logger: logger, secondsSince1970: S3Store.systemSeconds)
    }

    static let systemSeconds: @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970) }

    /// `secondsSince1970` dates V4 signatures (tests skew it; V2 signs with libs3's own clock).
    package init(
        configuration: S3Configuration, logger: Logger = Logger(label: "vd.objectstore.s3"),
        secondsSince1970: @escaping @Sendable () -> Int64
    ) throws(VDError) {
        try configuration.validate()
        self.configuration = configuration
        self.logger = logger
        switch configuration.signature {
        case .v2:
            loop = try S3RequestLoop(
                target: S3Target(
                    host: configuration.endpoint, bucket: configuration.bucket,
                    accessKeyID: configuration.accessKeyID, secret: configuration.secretAccessKey,
                    scheme: configuration.scheme, uriStyle: configuration.uriStyle),
                inFlightMax: configuration.inFlightRequestsMax, queuedMax: configuration.queuedRequestsMax)
        case .v4:
            loop = try S3HTTPTransport(configuration: configuration, now: secondsSince1970)
        }
        sendsCreateOnly = Atomic(configuration.signature == .v4 && configuration.createOnly)
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
    /// V4 with `create_only` on, and the server refused a second create of a probe object (asked once; a server that
    /// ignores If-None-Match, like rclone's, stops being sent it).
    public func confirmsCreateOnly() async throws(VDError) -> Bool {
        guard sendsCreateOnly.load(ordering: .relaxed) else { return false }
        if let known = createOnlyConfirmed.withLock({ $0 }) { return known }
        let refused = try await probeConditionalWrites(
            name: "vd-probe/conditional-write-"
                + S3Encoding.hex(S3Encoding.md5(ByteBuffer(string: "\(UInt64.random(in: 0...UInt64.max))"))))
        if !refused {
            logger.warning(
                "\(self.description) ignores If-None-Match on PUT: objects are written without the create-only guard, and what needs it (ownership records) is refused"
            )
            sendsCreateOnly.store(false, ordering: .relaxed)
        }
        createOnlyConfirmed.withLock { $0 = refused }
        return refused
    }

    // MARK: operations

    public func put(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        guard UInt64(data.readableBytes) <= configuration.objectSizeBytesMax else {
            throw .invalidArgument(
                "object \(name) is \(data.readableBytes) bytes, more than the S3 store's bound of "
                    + "\(configuration.objectSizeBytesMax) bytes")
        }
        if configuration.signature == .v4 && UInt64(data.readableBytes) > configuration.multipartThresholdBytes {
            try await putMultipart(name, data: data)
            return
        }
        let integrity = await payloadIntegrity()
        let (md5, sha256) = integrity.headers(for: data)
        while true {
            let createOnly = sendsCreateOnly.load(ordering: .relaxed)
            let operation = S3Operation.put(body: data, md5Base64: md5, payloadSHA256: sha256, createOnly: createOnly)
            let outcome = try await perform("PUT", name, operation) {
                (result) -> Verdict<PutOutcome> in
                if result.isOK { return .success(.stored) }
                if result.abort == nil && result.s3Status == S3StatusErrorPreconditionFailed && createOnly {
                    return .success(.nameTaken)
                }
                if result.abort == nil && createOnly
                    && (result.s3Status == S3StatusErrorNotImplemented || result.httpStatus == 501)
                {
                    return .success(.conditionalUnsupported)
                }
                return self.failure(result, "PUT", name)
            }
            switch outcome {
            case .stored, .uploadGone:
                return
            case .conditionalUnsupported:
                if createOnlyConfirmed.withLock({ $0 }) == true {
                    // Records rely on the guard (compare-and-swap): never drop it silently once confirmed.
                    throw VDError(
                        .backend,
                        "\(description) answered 501 to If-None-Match on PUT \(name) after honouring it before (a mixed fleet behind one endpoint?)"
                    )
                }
                logger.warning(
                    "\(self.description) does not implement If-None-Match on PUT: objects are written without the create-only guard from now on"
                )
                sendsCreateOnly.store(false, ordering: .relaxed)
            case .nameTaken:
                // Our own earlier attempt may have landed with its reply lost: the same bytes are there.
                let existing = try await headDetails(name)
                let sameBody =
                    existing.map {
                        $0.sizeBytes == UInt64(data.readableBytes)
                            && $0.eTag.flatMap(S3Encoding.plainMD5ETag) == S3Encoding.hex(S3Encoding.md5(data))
                    } ?? false
                if sameBody { return }
                throw VDError(
                    .alreadyExists,
                    "object \(name) already exists in \(description) with other content (a create-only PUT was "
                        + "refused with 412): VolumeDriver never overwrites an object; another writer may be using "
                        + "this volume's prefix")
            }
        }
    }

    /// A PUT that replaces what is there (no If-None-Match): the scrub lease. Small objects only (one PUT).
    public func replace(_ name: String, data: ByteBuffer) async throws(VDError) {
        try ObjectName.validate(name)
        let integrity = await payloadIntegrity()
        let (md5, sha256) = integrity.headers(for: data)
        let operation = S3Operation.put(body: data, md5Base64: md5, payloadSHA256: sha256, createOnly: false)
        try await perform("PUT", name, operation) { (result) -> Verdict<Void> in
            result.isOK ? .success(()) : self.failure(result, "PUT", name)
        }
    }

    /// What protects a PUT body from corruption on the way up: the store must verify it.
    package enum PayloadIntegrity: String, Sendable {
        /// Content-MD5 (every S3 store verifies it; the only choice on V2).
        case contentMD5 = "Content-MD5"
        /// The signed V4 payload hash (x-amz-content-sha256): chosen when the store verifies it and SHA256 is the
        /// faster hash on this machine (SHA extensions make it about twice as fast as MD5).
        case signedSHA256 = "signed SHA256 payload hash"

        /// The Content-MD5 (base64) or the signed payload hash (hex) a PUT of `data` carries.
        package func headers(for data: ByteBuffer) -> (md5Base64: String?, payloadSHA256: String?) {
            switch self {
            case .contentMD5: (S3Encoding.base64(S3Encoding.md5(data)), nil)
            case .signedSHA256: (nil, data.withUnsafeReadableBytes { S3SignatureV4.sha256Hex($0) })
            }
        }
    }

    /// The integrity check PUTs use, decided once (`probePayloadIntegrity`). Content-MD5, always safe, while the
    /// probe cannot run (the store fails it: it is tried again at the next PUT).
    package func payloadIntegrity() async -> PayloadIntegrity {
        if let known = integrity.withLock({ $0 }) { return known }
        guard configuration.signature == .v4 else { return .contentMD5 }
        do throws(VDError) {
            let chosen = try await probePayloadIntegrity().chosen
            integrity.withLock { $0 = chosen }
            return chosen
        } catch {
            logger.debug("payload hash probe failed (\(error.message)); using Content-MD5 for now")
            return .contentMD5
        }
    }

    /// Whether the store rejects a body that does not match its signed SHA256 payload hash (a probe object with a
    /// wrong hash), and which check PUTs should use. V2 and stores that do not verify it use Content-MD5.
    package func probePayloadIntegrity() async throws(VDError) -> (sha256Verified: Bool, chosen: PayloadIntegrity) {
        guard configuration.signature == .v4 else { return (false, .contentMD5) }
        let name = "vd-probe/payload-hash"
        let body = ByteBuffer(string: "payload hash probe")
        let wrong = String(repeating: "0", count: 64)
        let verified = try await perform(
            "PUT", name, .put(body: body, md5Base64: nil, payloadSHA256: wrong, createOnly: false)
        ) { (result) -> Verdict<Bool> in
            if result.isOK { return .success(false) }
            if result.abort == nil
                && (result.errorCode == "XAmzContentSHA256Mismatch" || result.s3Status == S3StatusErrorBadDigest
                    || result.errorCode == "InvalidDigest")
            {
                return .success(true)
            }
            return self.failure(result, "PUT", name)
        }
        if !verified { try await delete(name) }
        let chosen: PayloadIntegrity = verified && Self.sha256IsFaster ? .signedSHA256 : .contentMD5
        logger.info(
            "\(self.description): PUT bodies are checked with \(chosen.rawValue) (signed SHA256 verified by the store: \(verified))"
        )
        return (verified, chosen)
    }

    /// SHA256 against MD5 over 4 MiB on this machine (once per process).
    static let sha256IsFaster: Bool = {
        var sample = ByteBuffer()
        sample.writeRepeatingByte(0x5a, count: 4 << 20)
        func seconds(_ body: () -> Void) -> UInt64 {
            let start = monotonicNanoseconds()
            body()
            return monotonicNanoseconds() - start
        }
        let md5 = seconds { _ = S3Encoding.md5(sample) }
        let sha = seconds { _ = sample.withUnsafeReadableBytes { S3SignatureV4.sha256Hex($0) } }
        return sha < md5
    }()

    private enum PutOutcome: Sendable {
        case stored
        case nameTaken
        case conditionalUnsupported
        /// A completion retried after its first attempt landed: the upload is gone.
        case uploadGone
    }

    /// A large object as a multipart upload (V4): parts of `multipartPartBytes` with Content-MD5 each,
    /// `multipartConcurrency` at a time, then a create-only completion. Any failure aborts the upload (nothing is
    /// left behind but what a crash leaves, which `abortMultipartUploads` clears at the next start).
    private func putMultipart(_ name: String, data: ByteBuffer) async throws(VDError) {
        let partBytes = Int(configuration.multipartPartBytes)
        let count = (data.readableBytes + partBytes - 1) / partBytes
        func part(_ index: Int) -> ByteBuffer {
            data.getSlice(
                at: data.readerIndex + index * partBytes, length: min(partBytes, data.readableBytes - index * partBytes)
            )!
        }
        let digests = (0..<count).map { S3Encoding.md5(part($0)) }
        // The ETag S3 gives a multipart object: MD5 of the parts' MD5s, then "-" and the part count.
        let expectedETag = S3Encoding.hex(S3Encoding.md5(ByteBuffer(bytes: digests.flatMap { $0 }))) + "-\(count)"
        func isOurs(_ existing: (sizeBytes: UInt64, eTag: String?)?) -> Bool {
            existing.map {
                $0.sizeBytes == UInt64(data.readableBytes)
                    && $0.eTag.map { $0.replacingOccurrences(of: "\"", with: "") } == expectedETag
            } ?? false
        }
        let createOnly = sendsCreateOnly.load(ordering: .relaxed)
        if createOnly, let existing = try await headDetails(name) {
            // Ceph RGW does not honour If-None-Match on a multipart completion: never start over an existing name.
            if isOurs(existing) { return }
            throw VDError(
                .alreadyExists,
                "object \(name) already exists in \(description) with other content: VolumeDriver never overwrites "
                    + "an object")
        }
        let uploadID = try await perform("CREATE MULTIPART UPLOAD", name, .createMultipart) {
            (result) -> Verdict<String> in
            if result.isOK {
                guard let id = result.uploadID, !id.isEmpty else { return .retry("no UploadId in the response") }
                return .success(id)
            }
            return self.failure(result, "CREATE MULTIPART UPLOAD", name)
        }
        do throws(VDError) {
            let eTags = await withTaskGroup(of: (Int, Result<String, VDError>).self) {
                group -> [Result<String, VDError>] in
                var results = [Result<String, VDError>](
                    repeating: .failure(VDError(.backend, "part not uploaded")), count: count)
                var failed = false
                for index in 0..<count {
                    if index >= configuration.multipartConcurrency, let (done, result) = await group.next() {
                        results[done] = result
                        if case .failure = result { failed = true }
                    }
                    if failed { break }
                    let body = part(index)
                    let digest = digests[index]
                    group.addTask {
                        do throws(VDError) {
                            return (index, .success(try await self.uploadPart(name, uploadID, index + 1, body, digest)))
                        } catch {
                            return (index, .failure(error))
                        }
                    }
                }
                for await (done, result) in group { results[done] = result }
                return results
            }
            var manifest = "<CompleteMultipartUpload>"
            for (index, eTag) in eTags.enumerated() {
                manifest += "<Part><PartNumber>\(index + 1)</PartNumber><ETag>\(try eTag.get())</ETag></Part>"
            }
            manifest += "</CompleteMultipartUpload>"
            let operation = S3Operation.completeMultipart(
                uploadID: uploadID, body: ByteBuffer(string: manifest), createOnly: createOnly)
            let outcome = try await perform("COMPLETE MULTIPART UPLOAD", name, operation) {
                (result) -> Verdict<PutOutcome> in
                if result.isOK { return .success(.stored) }
                if result.abort == nil && createOnly && result.s3Status == S3StatusErrorPreconditionFailed {
                    return .success(.nameTaken)
                }
                if result.abort == nil && result.errorCode == "NoSuchUpload" { return .success(.uploadGone) }
                return self.failure(result, "COMPLETE MULTIPART UPLOAD", name)
            }
            switch outcome {
            case .stored, .conditionalUnsupported:
                return
            case .nameTaken, .uploadGone:
                // Our own completion may have landed with its reply lost: then the object is exactly these parts.
                if isOurs(try await headDetails(name)) { return }
                if outcome == .uploadGone {
                    throw VDError(
                        .backend,
                        "S3 multipart upload of \(name) in \(description) vanished before it completed "
                            + "(NoSuchUpload) and the object is not there")
                }
                throw VDError(
                    .alreadyExists,
                    "object \(name) already exists in \(description) with other content (a create-only multipart "
                        + "completion was refused with 412): VolumeDriver never overwrites an object")
            }
        } catch {
            await abortUpload(name, uploadID)
            throw error
        }
    }

    private func uploadPart(
        _ name: String, _ uploadID: String, _ number: Int, _ part: ByteBuffer, _ digest: [UInt8]
    ) async throws(VDError) -> String {
        let operation = S3Operation.uploadPart(
            body: part, md5Base64: S3Encoding.base64(digest), partNumber: number, uploadID: uploadID)
        let eTag = try await perform("UPLOAD PART \(number) of", name, operation) { (result) -> Verdict<String> in
            if result.isOK { return .success(result.eTag ?? "\"\(S3Encoding.hex(digest))\"") }
            return self.failure(result, "UPLOAD PART \(number) of", name)
        }
        return eTag
    }

    private func abortUpload(_ name: String, _ uploadID: String) async {
        logger.debug("aborting multipart upload \(uploadID) of \(name)")
        do throws(VDError) {
            try await perform("ABORT MULTIPART UPLOAD", name, .abortMultipart(uploadID: uploadID)) {
                (result) -> Verdict<Void> in
                if result.isOK || result.errorCode == "NoSuchUpload" { return .success(()) }
                return self.failure(result, "ABORT MULTIPART UPLOAD", name)
            }
        } catch {
            logger.warning("could not abort multipart upload \(uploadID) of \(name): \(error.message)")
        }
    }

    /// Aborts every multipart upload in progress under `prefix` (V4; none exist on V2): run when nothing of this
    /// prefix is being uploaded (at `vd serve` start, for the volumes it serves), it clears what a crash left.
    /// Returns how many were aborted.
    public func abortMultipartUploads(prefix: String) async throws(VDError) -> Int {
        guard configuration.signature == .v4 else { return 0 }
        var aborted = 0
        var keyMarker: String?
        var uploadIDMarker: String?
        while true {
            let page = try await perform(
                "LIST MULTIPART UPLOADS", "prefix \(prefix)",
                .listMultipart(prefix: prefix, keyMarker: keyMarker, uploadIDMarker: uploadIDMarker)
            ) { (result) -> Verdict<S3AttemptResult> in
                result.isOK ? .success(result) : self.failure(result, "LIST MULTIPART UPLOADS", "prefix \(prefix)")
            }
            for upload in page.uploads where upload.key.hasPrefix(prefix) {
                logger.info(
                    "aborting a multipart upload left in progress: \(upload.key), upload \(upload.uploadID), started \(upload.initiated)"
                )
                await abortUpload(upload.key, upload.uploadID)
                aborted += 1
            }
            guard page.isTruncated, let next = page.nextKeyMarker,
                next != keyMarker || page.nextUploadIDMarker != uploadIDMarker
            else { break }
            keyMarker = next
            uploadIDMarker = page.nextUploadIDMarker
        }
        return aborted
    }

    /// HEAD with the ETag (nil: no such object).
    private func headDetails(_ name: String) async throws(VDError) -> (sizeBytes: UInt64, eTag: String?)? {
        try await perform("HEAD", name, .head) { (result) -> Verdict<(sizeBytes: UInt64, eTag: String?)?> in
            if result.isOK { return .success((result.contentLength ?? 0, result.eTag)) }
            if result.abort == nil
                && (result.s3Status == S3StatusHttpErrorNotFound || result.s3Status == S3StatusErrorNoSuchKey)
            {
                return .success(nil)
            }
            return self.failure(result, "HEAD", name)
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
                "range \(range.lowerBound)..<\(range.upperBound) is past the end of \(name)\(sizeText) in \(description)"
            )
        }
    }

    private enum RangeOutcome: Sendable {
        case bytes(ByteBuffer)
        case pastEnd(size: UInt64?)
    }

    public func head(_ name: String) async throws(VDError) -> ObjectInfo? {
        try ObjectName.validate(name)
        return try await headDetails(name).map { ObjectInfo(name: name, sizeBytes: $0.sizeBytes) }
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

    public func listChildren(of prefix: String) async throws(VDError) -> [String] {
        precondition(prefix.isEmpty || prefix.hasSuffix("/"), "listChildren takes a prefix ending with /")
        var children = Set<String>()
        var marker: String?
        let what = prefix.isEmpty ? "(top level)" : "prefix \(prefix)"
        while true {
            let operation = S3Operation.list(
                prefix: prefix, marker: marker, maxKeys: Self.listPageKeysMax, delimiter: "/")
            let page = try await perform("LIST", what, operation) { (result) -> Verdict<S3AttemptResult> in
                result.isOK ? .success(result) : self.failure(result, "LIST", what)
            }
            for name in page.commonPrefixes + page.listed.map(\.name) where name.hasPrefix(prefix) {
                if let first = name.dropFirst(prefix.count).split(separator: "/").first {
                    children.insert(String(first))
                }
            }
            guard page.isTruncated else { break }
            let last = max(page.listed.last?.name ?? "", page.commonPrefixes.max() ?? "")
            guard let next = page.nextMarker ?? (last.isEmpty ? nil : last), next > (marker ?? "") else {
                throw VDError(
                    .backend,
                    "S3 LIST of \(what) in \(description): the server said the listing is truncated but gave no marker past '\(marker ?? "")'"
                )
            }
            marker = next
        }
        return children.sorted()
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

    /// Whether the store refuses to overwrite on a create-only PUT (If-None-Match: *): writes a probe object under
    /// `name`, tries to create it again with other bytes, and deletes it. False on V2 (libs3 cannot ask), when the
    /// store answered 501, or when it overwrote the probe.
    public func probeConditionalWrites(name: String = "vd-probe/conditional-write") async throws(VDError) -> Bool {
        guard sendsCreateOnly.load(ordering: .relaxed) else { return false }
        var first = ByteBuffer()
        first.writeString("first \(UInt64.random(in: 0...UInt64.max))")
        var second = ByteBuffer()
        second.writeString("second \(UInt64.random(in: 0...UInt64.max))")
        try await delete(name)
        try await put(name, data: first)
        var refused = false
        do {
            try await put(name, data: second)
        } catch  where error.code == .alreadyExists {
            refused = true
        }
        try await delete(name)
        return refused
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
        case .put, .get, .head, .delete, .createMultipart, .uploadPart, .completeMultipart, .abortMultipart:
            key = object
        case .list, .testBucket, .createBucket, .listMultipart: key = ""
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
        let otherSignature = configuration.signature == .v4 ? "v2" : "v4"
        switch result.errorCode ?? "" {
        case "AuthorizationHeaderMalformed", "InvalidRegion", "IllegalLocationConstraintException":
            return .fail(
                VDError(
                    .configuration,
                    "the S3 endpoint \(endpoint) refused \(verb) \(object) signed for region "
                        + "\(configuration.region) (\(detail)): set region= in the backend URL to the bucket's region"))
        case "PreconditionFailed":
            return .fail(
                VDError(
                    .alreadyExists,
                    "S3 \(verb) of \(object) in \(description): the object already exists (\(detail))"))
        default:
            break
        }
        if configuration.signature == .v2, let message = result.errorMessage?.lowercased(),
            ["unsupported algorithm", "aws4-hmac-sha256", "signature version", "authorization mechanism"]
                .contains(where: { message.contains($0) })
        {
            // A V4-only store refusing libs3's V2 signature (AWS: InvalidRequest "use AWS4-HMAC-SHA256"; rclone:
            // UnsupportedAlgorithm): libs3 reports such codes as unknown errors, the message tells.
            return .fail(
                VDError(
                    .configuration,
                    "the S3 endpoint \(endpoint) does not accept signature v2 (\(detail)): use signature=v4 in the "
                        + "backend URL"))
        }
        switch status {
        case S3StatusServerFailedVerification where detail.contains("WRONG_VERSION_NUMBER"):
            return .fail(
                VDError(
                    .configuration,
                    "\(endpoint) does not answer TLS (\(detail)): if it serves plain HTTP, write scheme=http in the "
                        + "backend URL"))
        case S3StatusServerFailedVerification:
            return .fail(
                VDError(
                    .configuration,
                    "the TLS certificate of \(endpoint) does not verify (\(detail)): give the CA that signed it with "
                        + "ca_file=/path/ca.pem in the backend URL, or (test set-ups only) insecure_skip_verify=true"))
        case S3StatusHttpErrorBadRequest where configuration.signature == .v2 || result.errorCode == nil:
            return .fail(
                VDError(
                    .configuration,
                    "the S3 endpoint \(endpoint) refused \(verb) \(object) as a bad request (\(detail)); if the store "
                        + "does not accept signature \(configuration.signature.rawValue), try signature="
                        + "\(otherSignature) in the backend URL"))
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
                    "the S3 endpoint \(endpoint) rejected the signature \(configuration.signature.rawValue) of access "
                        + "key ID \(accessKey) on \(verb) \(object) (\(detail)): the secret access key does not "
                        + "belong to this access key ID (check AWS_SECRET_ACCESS_KEY), or the store does not accept "
                        + "signature \(configuration.signature.rawValue) (try signature=\(otherSignature))"))
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
        case S3StatusErrorRequestTimeTooSkewed where configuration.signature == .v4:
            return .fail(
                VDError(
                    .configuration,
                    "the S3 endpoint \(endpoint) rejected \(verb) \(object) because this machine's clock differs too "
                        + "much from the server's (\(detail)); synchronise the clock (NTP)"))
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
        (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
            || (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "f"))
            || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "F"))
    }
}
