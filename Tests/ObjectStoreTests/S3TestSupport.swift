// Where the S3 tests find their server: VD_TEST_S3_ENDPOINT, VD_TEST_S3_ACCESS_KEY, VD_TEST_S3_SECRET_KEY and
// VD_TEST_S3_BUCKET (a bucket-name prefix), as written by `tools/s3/rgw.sh start DIR` (or exported by
// `tools/s3/with-rgw.sh CMD`). Missing variables fail the S3 tests with instructions, unless VD_SKIP_S3=1 says to skip
// them on purpose. Every store made here gets its own new bucket, so tests running in parallel never see each other.

import Foundation
import NIOCore
import ObjectStore
import Testing
import VolumeCore

enum S3TestEnvironment {
    static let instructions =
        "the S3 tests need a server: run them as `tools/s3/with-rgw.sh swift test --filter ObjectStoreTests`, or "
        + "`tools/s3/rgw.sh start DIR && source DIR/env` first (VD_TEST_S3_ENDPOINT etc.); "
        + "set VD_SKIP_S3=1 to skip them on purpose"

    static var isSkipped: Bool { ProcessInfo.processInfo.environment["VD_SKIP_S3"] == "1" }

    struct Server {
        var endpoint: String
        var accessKey: String
        var secretKey: String
        var bucketPrefix: String
    }

    static var server: Server? {
        let environment = ProcessInfo.processInfo.environment
        guard let endpoint = environment["VD_TEST_S3_ENDPOINT"], !endpoint.isEmpty,
            let accessKey = environment["VD_TEST_S3_ACCESS_KEY"], !accessKey.isEmpty,
            let secretKey = environment["VD_TEST_S3_SECRET_KEY"], !secretKey.isEmpty
        else { return nil }
        let prefix = environment["VD_TEST_S3_BUCKET"].flatMap { $0.isEmpty ? nil : $0 } ?? "vd-test"
        return Server(endpoint: endpoint, accessKey: accessKey, secretKey: secretKey, bucketPrefix: prefix)
    }

    /// The server, or an error (failing the test) saying how to start one.
    static func requireServer() throws -> Server {
        guard let server else { throw VDError(.configuration, instructions) }
        return server
    }

    static func uniqueBucket(_ prefix: String) -> String {
        "\(prefix)-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
    }

    /// A configuration for the test server; `adjust` may change the bounds or point it elsewhere.
    static func configuration(
        bucket: String? = nil, endpoint: String? = nil, _ adjust: (inout S3Configuration) -> Void = { _ in }
    ) throws -> S3Configuration {
        let server = try requireServer()
        var configuration = S3Configuration(
            endpoint: endpoint ?? server.endpoint, bucket: bucket ?? uniqueBucket(server.bucketPrefix),
            uriStyle: .path, scheme: .http, accessKeyID: server.accessKey,
            secretAccessKey: S3Secret(server.secretKey), requestTimeoutSeconds: 60, stallTimeoutSeconds: 10,
            operationDeadlineSeconds: 90)
        adjust(&configuration)
        return configuration
    }

    /// The second server (rclone serve s3, V4 only), from VD_TEST_S3_RCLONE_* (tools/s3/rclone.sh).
    static func rcloneConfiguration() throws -> S3Configuration {
        let environment = ProcessInfo.processInfo.environment
        guard let endpoint = environment["VD_TEST_S3_RCLONE_ENDPOINT"], !endpoint.isEmpty,
            let accessKey = environment["VD_TEST_S3_RCLONE_ACCESS_KEY"],
            let secretKey = environment["VD_TEST_S3_RCLONE_SECRET_KEY"]
        else {
            throw VDError(
                .configuration,
                "the rclone S3 server is not running: run the tests through tools/s3/with-rgw.sh (it starts RGW and "
                    + "rclone serve s3) or tools/test.sh")
        }
        return S3Configuration(
            endpoint: endpoint, bucket: uniqueBucket("vd-rclone"), uriStyle: .path, scheme: .http,
            accessKeyID: accessKey, secretAccessKey: S3Secret(secretKey), requestTimeoutSeconds: 60,
            stallTimeoutSeconds: 10, operationDeadlineSeconds: 90)
    }

    static func makeRcloneStore() async throws -> S3Store {
        let store = try S3Store(configuration: try rcloneConfiguration())
        try await store.createBucketIfMissing()
        return store
    }

    /// A store on a new, empty bucket of the test server.
    static func makeStore(_ adjust: (inout S3Configuration) -> Void = { _ in }) async throws -> S3Store {
        let store = try S3Store(configuration: try configuration(adjust))
        try await store.createBucketIfMissing()
        return store
    }
}

/// Deterministic test data: `count` bytes from `seed`. A 64 KiB pseudo-random block, repeated, with each block's
/// first 16 bytes replaced by its index and the seed (so misplaced blocks are caught), fast even in debug builds.
func testBytes(_ count: Int, seed: UInt64) -> ByteBuffer {
    let blockBytes = 65_536
    var block = [UInt8](repeating: 0, count: blockBytes)
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    block.withUnsafeMutableBytes { raw in
        let words = raw.bindMemory(to: UInt64.self)
        for index in words.indices {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            words[index] = state
        }
    }
    var buffer = ByteBufferAllocator().buffer(capacity: count)
    var blockIndex: UInt64 = 0
    while buffer.readableBytes < count {
        let take = min(blockBytes, count - buffer.readableBytes)
        withUnsafeBytes(of: blockIndex.littleEndian) { block.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: seed.littleEndian) { block.replaceSubrange(8..<16, with: $0) }
        buffer.writeBytes(block[0..<take])
        blockIndex += 1
    }
    return buffer
}

/// Runs `body` and returns the VDError it threw (nil if none).
func vdError(_ body: () async throws -> Void) async -> VDError? {
    do {
        try await body()
        return nil
    } catch let error as VDError {
        return error
    } catch {
        return VDError(.io, "unexpected non-VDError: \(error)")
    }
}

func seconds(since start: ContinuousClock.Instant) -> Double {
    let elapsed = ContinuousClock.now - start
    return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
}
