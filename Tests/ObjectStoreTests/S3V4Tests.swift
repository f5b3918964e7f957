// What signature V4 adds, against real servers: create-only writes (If-None-Match) on Ceph RGW, a PUT whose reply was
// lost and whose retry meets its own object, a V4-only server (rclone serve s3) refusing V2 with a hint, a skewed
// clock, a wrong region, and HTTPS: an untrusted certificate is a clear error, a given CA or an explicit
// insecure_skip_verify works.

import Foundation
import NIOCore
import ObjectStore
import Testing
import VolumeCore
import VolumeTesting

@Suite("S3 signature V4", .disabled(if: S3TestEnvironment.isSkipped, "VD_SKIP_S3=1"))
struct S3V4Tests {
    @Test func createOnlyNeverOverwritesAnotherBody() async throws {
        let store = try await S3TestEnvironment.makeStore()
        defer { store.shutdown() }
        #expect(store.configuration.signature == .v4)
        let first = ByteBuffer(string: "the first body")
        try await store.put("vol1/sco/0000000000000001", data: first)
        let error = await vdError {
            try await store.put("vol1/sco/0000000000000001", data: ByteBuffer(string: "another body"))
        }
        #expect(error?.code == .alreadyExists, "\(String(describing: error))")
        #expect(error?.message.contains("vol1/sco/0000000000000001") == true)
        #expect(try await store.get("vol1/sco/0000000000000001") == first)
        // The same bytes again (an upload repeated after a crash) are fine.
        try await store.put("vol1/sco/0000000000000001", data: first)
        #expect(try await store.probeConditionalWrites())
        #expect(try await store.list(prefix: "vd-probe/").isEmpty)
    }

    /// RGW verifies the signed SHA256 payload hash, rclone does not (it accepts a wrong one): rclone's PUTs must then
    /// carry Content-MD5, which every store verifies.
    @Test func payloadIntegrityIsWhatTheStoreVerifies() async throws {
        let rgw = try await S3TestEnvironment.makeStore()
        defer { rgw.shutdown() }
        let rclone = try await S3TestEnvironment.makeRcloneStore()
        defer { rclone.shutdown() }
        #expect(try await rgw.probePayloadIntegrity().sha256Verified)
        let onRclone = try await rclone.probePayloadIntegrity()
        #expect(!onRclone.sha256Verified && onRclone.chosen == .contentMD5)
        #expect(try await rclone.list(prefix: "vd-probe/").isEmpty)
        let v2 = try await S3TestEnvironment.makeStore { $0.signature = .v2 }
        defer { v2.shutdown() }
        #expect(await v2.payloadIntegrity() == .contentMD5)
    }

    @Test func v2CannotAskForCreateOnly() async throws {
        let store = try await S3TestEnvironment.makeStore { $0.signature = .v2 }
        defer { store.shutdown() }
        #expect(try await store.probeConditionalWrites() == false)
    }

    @Test func aPutWhoseReplyWasLostSucceedsOnRetry() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(1 << 20, seed: 41)
            s3.proxy.inject(.dropResponse, count: 1, method: "PUT")
            // The first attempt lands but its reply is lost; the retry meets the object (412) and finds its own bytes.
            try await s3.store.put("lost-reply/object", data: data)
            #expect(s3.proxy.appliedFaults == [.dropResponse])
            #expect(try await s3.direct.get("lost-reply/object") == data)
            // Another body under that name after a lost reply is still refused.
            s3.proxy.inject(.dropResponse, count: 1, method: "PUT")
            let error = await vdError { try await s3.store.put("lost-reply/object", data: testBytes(4096, seed: 42)) }
            #expect(error?.code == .alreadyExists, "\(String(describing: error))")
            #expect(try await s3.direct.get("lost-reply/object") == data)
        }
    }

    @Test func aV4OnlyServerRefusesV2WithAHint() async throws {
        var configuration = try S3TestEnvironment.rcloneConfiguration()
        configuration.signature = .v2
        configuration.operationDeadlineSeconds = 10
        let store = try S3Store(configuration: configuration)
        defer { store.shutdown() }
        let start = ContinuousClock.now
        let error = await vdError { try await store.createBucketIfMissing() }
        #expect(error != nil && error?.code != .timeout, "\(String(describing: error))")
        #expect(error?.message.contains("signature=v4") == true, "\(String(describing: error))")
        #expect(seconds(since: start) < 5)
    }

    @Test func aSkewedClockIsAClearErrorAtOnce() async throws {
        let good = try await S3TestEnvironment.makeStore()
        defer { good.shutdown() }
        let skewed = try S3Store(
            configuration: good.configuration, secondsSince1970: { Int64(Date().timeIntervalSince1970) + 20 * 60 })
        defer { skewed.shutdown() }
        let start = ContinuousClock.now
        let error = await vdError { try await skewed.put("skew", data: ByteBuffer(string: "x")) }
        #expect(error?.code == .configuration, "\(String(describing: error))")
        #expect(error?.message.contains("clock") == true, "\(String(describing: error))")
        #expect(seconds(since: start) < 5)
    }

    /// Neither RGW nor rclone checks the region a V4 signature names (both accept any); AWS answers a wrong one with
    /// 400 AuthorizationHeaderMalformed, injected here as AWS words it.
    @Test func aWrongRegionIsAClearErrorAtOnce() async throws {
        try await withProxiedS3 { (s3: ProxiedS3) async throws in
            s3.proxy.inject(
                .httpError(status: 400, code: "AuthorizationHeaderMalformed"), count: 1, pathContains: "/region")
            let start = ContinuousClock.now
            let error = await vdError { try await s3.store.put("region", data: ByteBuffer(string: "x")) }
            #expect(error?.code == .configuration, "\(String(describing: error))")
            #expect(error?.message.contains("region=") == true, "\(String(describing: error))")
            #expect(
                s3.proxy.requestLines.filter { $0.contains("/region") }.count == 1, "retried: \(s3.proxy.requestLines)")
            #expect(seconds(since: start) < 5)
        }
    }

    @Test func wrongSecretOnBothServersSaysWhatToCheck() async throws {
        for configuration in [
            try S3TestEnvironment.configuration(), try S3TestEnvironment.rcloneConfiguration(),
        ] {
            let good = try S3Store(configuration: configuration)
            try await good.createBucketIfMissing()
            good.shutdown()
            var bad = configuration
            bad.secretAccessKey = S3Secret("not-the-secret-000000000000000000")
            let store = try S3Store(configuration: bad)
            let error = await vdError { try await store.verifyAccess() }
            store.shutdown()
            #expect(error?.code == .authentication, "\(configuration.endpoint): \(String(describing: error))")
            #expect(error?.message.contains("AWS_SECRET_ACCESS_KEY") == true, "\(String(describing: error))")
        }
    }

    @Test func rcloneHonoursTheContractOnV4() async throws {
        let store = try await S3TestEnvironment.makeRcloneStore()
        defer { store.shutdown() }
        let data = testBytes(3 << 20, seed: 7)
        try await store.put("vol/sco/1", data: data)
        #expect(try await store.get("vol/sco/1") == data)
        #expect(try await store.get("vol/sco/1", range: 5..<105) == data.getSlice(at: 5, length: 100)!)
        #expect(try await store.head("vol/sco/1")?.sizeBytes == UInt64(data.readableBytes))
        #expect(try await store.list(prefix: "vol/").map(\.name) == ["vol/sco/1"])
        try await store.delete("vol/sco/1")
        #expect(try await store.head("vol/sco/1") == nil)
    }

    // MARK: multipart uploads

    func smallParts(_ configuration: inout S3Configuration) {
        configuration.multipartThresholdBytes = 8 << 20
        configuration.multipartPartBytes = 5 << 20
        configuration.multipartConcurrency = 3
        // RGW on memstore may take over a second to start an upload or store a part (the proxied tests' 1 s stall
        // timeout would retry them and leave the first attempt's upload behind).
        configuration.stallTimeoutSeconds = 10
    }

    @Test func largeObjectsGoUpAsMultipartUploadsOnBothServers() async throws {
        let rgw = try await S3TestEnvironment.makeStore(smallParts)
        var rcloneConfiguration = try S3TestEnvironment.rcloneConfiguration()
        smallParts(&rcloneConfiguration)
        let rclone = try S3Store(configuration: rcloneConfiguration)
        try await rclone.createBucketIfMissing()
        for store in [rgw, rclone] {
            let data = testBytes(23 << 20, seed: 11)  // 5 parts, the last one short
            try await store.put("vol/sco/big", data: data)
            #expect(try await store.get("vol/sco/big") == data, "\(store.configuration.endpoint)")
            #expect(
                try await store.get("vol/sco/big", range: 6_000_000..<6_000_100) == data.getSlice(
                    at: 6_000_000, length: 100)!)
            #expect(try await store.head("vol/sco/big")?.sizeBytes == UInt64(data.readableBytes))
            #expect(try await store.abortMultipartUploads(prefix: "vol/") == 0, "an upload was left in progress")
            store.shutdown()
        }
    }

    @Test func aMultipartObjectIsCreateOnlyToo() async throws {
        let store = try await S3TestEnvironment.makeStore(smallParts)
        defer { store.shutdown() }
        let data = testBytes(12 << 20, seed: 12)
        try await store.put("vol/sco/big", data: data)
        // The same bytes again: fine. Other bytes: refused, and the upload aborted.
        try await store.put("vol/sco/big", data: data)
        let error = await vdError { try await store.put("vol/sco/big", data: testBytes(12 << 20, seed: 13)) }
        #expect(error?.code == .alreadyExists, "\(String(describing: error))")
        #expect(try await store.get("vol/sco/big") == data)
        #expect(try await store.abortMultipartUploads(prefix: "vol/") == 0)
    }

    @Test func aFailedPartAbortsTheUploadAndALostAbortIsSweptAtStart() async throws {
        let adjust: (inout S3Configuration) -> Void = { configuration in
            self.smallParts(&configuration)
            configuration.retry = S3RetryPolicy(baseDelaySeconds: 0.01, maxDelaySeconds: 0.05, attemptsMax: 3)
        }
        try await withProxiedS3(adjust) { (s3: ProxiedS3) async throws in
            // Part 2 fails every time: the put fails and its upload is aborted.
            s3.proxy.inject(.internalError, count: 3, method: "PUT", pathContains: "partNumber=2")
            let error = await vdError { try await s3.store.put("vol/sco/1", data: testBytes(12 << 20, seed: 1)) }
            #expect(error != nil)
            let left = try await s3.direct.abortMultipartUploads(prefix: "vol/")
            #expect(
                left == 0,
                "the failed upload was left (\(left)); \(s3.proxy.appliedFaults); \(String(describing: error))")
            #expect(try await s3.direct.head("vol/sco/1") == nil)
            // Now the abort is lost too (as if the process died): the next start's sweep clears the upload.
            s3.proxy.inject(.internalError, count: 3, method: "PUT", pathContains: "partNumber=2")
            s3.proxy.inject(.internalError, count: 3, method: "DELETE", pathContains: "uploadId=")
            _ = await vdError { try await s3.store.put("vol/sco/2", data: testBytes(12 << 20, seed: 2)) }
            #expect(try await s3.direct.abortMultipartUploads(prefix: "vol/") == 1)
            #expect(try await s3.direct.abortMultipartUploads(prefix: "vol/") == 0)
        }
    }

    @Test func aCompletionWhoseReplyWasLostSucceedsOnRetry() async throws {
        try await withProxiedS3({ smallParts(&$0) }) { s3 in
            let data = testBytes(11 << 20, seed: 21)
            s3.proxy.inject(.dropResponse, count: 1, method: "POST", pathContains: "uploadId=")
            try await s3.store.put("vol/sco/lost-completion", data: data)
            #expect(s3.proxy.appliedFaults == [.dropResponse])
            #expect(try await s3.direct.get("vol/sco/lost-completion") == data)
        }
    }

    // MARK: TLS

    /// A CA and a certificate for 127.0.0.1 signed by it, plus a self-signed one.
    func makeCertificates(in directory: String) throws {
        let script = """
            set -e
            cd '\(directory)'
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 -subj /CN=vd-s3-test-ca \
              -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null
            printf "subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth\\nbasicConstraints=CA:FALSE\\n" > server.ext
            openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem \
              -days 30 -extfile server.ext 2>/dev/null
            """
        let result = try ProcessRunner.run("/bin/bash", ["-c", script])
        try #require(result.succeeded, "\(result.error)")
    }

    @Test func httpsVerifiesTheCertificate() async throws {
        let directory = try TemporaryDirectory("vd-s3-tls")
        defer { directory.remove() }
        try makeCertificates(in: directory.path)
        let plain = try await S3TestEnvironment.makeStore()
        defer { plain.shutdown() }
        let front = try await S3FaultProxy.start(
            upstream: plain.configuration.endpoint,
            tls: (directory.path + "/server-cert.pem", directory.path + "/server-key.pem"))
        func store(_ adjust: (inout S3Configuration) -> Void) throws -> S3Store {
            var configuration = plain.configuration
            configuration.endpoint = front.endpoint
            configuration.scheme = .https
            configuration.operationDeadlineSeconds = 10
            adjust(&configuration)
            return try S3Store(configuration: configuration)
        }
        // The system's roots do not know the test CA: a clear error, not retried until the deadline.
        let untrusted = try store { _ in }
        let start = ContinuousClock.now
        let error = await vdError { try await untrusted.verifyAccess() }
        untrusted.shutdown()
        #expect(error?.code == .configuration, "\(String(describing: error))")
        #expect(error?.message.contains("ca_file") == true, "\(String(describing: error))")
        #expect(seconds(since: start) < 5)
        // With the CA named, everything works over TLS.
        let trusted = try store { $0.caFile = directory.path + "/ca-cert.pem" }
        try await trusted.verifyAccess()
        let data = testBytes(1 << 20, seed: 3)
        try await trusted.put("tls/object", data: data)
        #expect(try await trusted.get("tls/object") == data)
        trusted.shutdown()
        // Written out, verification can be turned off.
        let insecure = try store { $0.insecureSkipVerify = true }
        #expect(try await insecure.get("tls/object") == data)
        insecure.shutdown()
        // V2 (libs3 cannot verify) over https is refused unless insecure_skip_verify is written out.
        #expect(throws: VDError.self) { try store { $0.signature = .v2 } }
        await front.stop()
    }
}
