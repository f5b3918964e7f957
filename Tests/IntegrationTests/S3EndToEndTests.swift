// Volumes on real S3-compatible servers (Ceph RGW with signatures V4 and V2, and rclone serve s3 with V4, started by
// tools/s3/with-rgw.sh): data moves to S3 while fio writes, the local flash is lost, the volume is attached on a fresh
// data directory and rebuilt from S3 alone, and fio verifies every write while qemu-img compares it with a reference
// copy. Then the same through a proxy that
// injects S3 failures: the volume keeps taking writes and loses nothing acknowledged.

import Foundation
import NIOCore
import ObjectStore
import Testing
import VolumeCore
import VolumeTesting

struct S3Server {
    var endpoint: String
    var accessKey: String
    var secretKey: String
    var bucketPrefix: String
    var signature = S3Configuration.Signature.v4

    /// Which server and signature an end-to-end run uses.
    enum Kind: String, CaseIterable, CustomTestStringConvertible, Sendable {
        /// Ceph RGW, signature V4 (the default).
        case rgw
        /// Ceph RGW, signature V2 (libs3).
        case rgwV2
        /// rclone serve s3, V4 only.
        case rclone
        var testDescription: String { rawValue }
    }

    static func require(_ kind: Kind) throws -> S3Server {
        switch kind {
        case .rgw:
            return try require()
        case .rgwV2:
            var server = try require()
            server.signature = .v2
            return server
        case .rclone:
            let environment = ProcessInfo.processInfo.environment
            guard let endpoint = environment["VD_TEST_S3_RCLONE_ENDPOINT"],
                let accessKey = environment["VD_TEST_S3_RCLONE_ACCESS_KEY"],
                let secretKey = environment["VD_TEST_S3_RCLONE_SECRET_KEY"]
            else {
                throw TestToolError(
                    message:
                        "the rclone S3 server is not running: run the tests through tools/test.sh (or tools/s3/with-rgw.sh)"
                )
            }
            return S3Server(endpoint: endpoint, accessKey: accessKey, secretKey: secretKey, bucketPrefix: "vd-rclone")
        }
    }

    static var isSkipped: Bool { ProcessInfo.processInfo.environment["VD_SKIP_S3"] == "1" }

    static func require() throws -> S3Server {
        let environment = ProcessInfo.processInfo.environment
        guard let endpoint = environment["VD_TEST_S3_ENDPOINT"], let accessKey = environment["VD_TEST_S3_ACCESS_KEY"],
            let secretKey = environment["VD_TEST_S3_SECRET_KEY"]
        else {
            throw TestToolError(
                message:
                    "these tests need an S3 server: run them through tools/test.sh (or tools/s3/with-rgw.sh swift test); VD_SKIP_S3=1 skips them"
            )
        }
        return S3Server(
            endpoint: endpoint, accessKey: accessKey, secretKey: secretKey,
            bucketPrefix: environment["VD_TEST_S3_BUCKET"] ?? "vd-test")
    }

    var vdEnvironment: [String: String] { ["AWS_ACCESS_KEY_ID": accessKey, "AWS_SECRET_ACCESS_KEY": secretKey] }

    /// A new bucket, created through S3Store.
    func makeBucket() async throws -> String {
        let bucket = "\(bucketPrefix)-it-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
        let store = try S3Store(
            configuration: S3Configuration(
                endpoint: endpoint, bucket: bucket, uriStyle: .path, scheme: .http, accessKeyID: accessKey,
                secretAccessKey: S3Secret(secretKey), signature: signature))
        try await store.createBucketIfMissing()
        store.shutdown()
        return bucket
    }

    func url(bucket: String, endpoint: String? = nil) -> String {
        "s3://\(bucket)?endpoint=\(endpoint ?? self.endpoint)&scheme=http&signature=\(signature.rawValue)"
    }
}

@Suite(.serialized, .disabled(if: S3Server.isSkipped, "VD_SKIP_S3=1")) struct S3EndToEndTests {
    func config(in directory: String, backendURL: String) throws -> String {
        let path = directory + "/vd.toml"
        try """
        default_backend = "s3"
        [sco]
        size = "1M"
        [upload]
        max_age_seconds = 1
        max_pending = "64M"
        [cache]
        size = "256M"
        [backends.s3]
        url = "\(backendURL)"
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func fio(_ uri: String, verifyOnly: Bool, directory: String) throws -> ProcessResult {
        var arguments = [
            "--name=s3", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bssplit=4k/50:64k/30:1m/20",
            "--size=48M", "--io_size=32M", "--iodepth=16", "--verify=crc32c", "--randseed=5",
        ]
        arguments +=
            verifyOnly
            ? ["--verify_only", "--verify_state_load=1", "--verify_fatal=1"]
            : ["--do_verify=0", "--verify_state_save=1"]
        return try ProcessRunner.run("fio", arguments, currentDirectory: directory)
    }

    @Test(arguments: S3Server.Kind.allCases)
    func writeLoseFlashAttachElsewhereVerify(kind: S3Server.Kind) async throws {
        let s3 = try S3Server.require(kind)
        let bucket = try await s3.makeBucket()
        let directory = try TemporaryDirectory("vd-s3")
        defer { directory.remove() }
        let config = try self.config(in: directory.path, backendURL: s3.url(bucket: bucket))
        let first = try VDServer(
            dataDirectory: directory.path + "/node1", extraArguments: ["--config", config],
            environment: s3.vdEnvironment)
        let created = try first.cli(["volume", "create", "vol1", "--size", "64M", "--config", config])
        #expect(created.succeeded, "\(created.error)")
        try first.start()
        let written = try fio(first.uri("vol1"), verifyOnly: false, directory: directory.path)
        #expect(written.succeeded, "\(written.output)\(written.error)")
        let reference = directory.path + "/reference.raw"
        #expect(
            try ProcessRunner.run("qemu-img", ["convert", "-f", "raw", "-O", "raw", first.uri("vol1"), reference])
                .succeeded)
        // SIGTERM: everything goes to S3, exit 0.
        #expect(try first.stop() == 0, "\(first.output)")
        // Node 1's disk is gone. Node 2 attaches the volume from S3 alone.
        try FileManager.default.removeItem(atPath: directory.path + "/node1")
        let second = try VDServer(
            dataDirectory: directory.path + "/node2", extraArguments: ["--config", config],
            environment: s3.vdEnvironment)
        let attached = try second.cli(["volume", "attach", "vol1", "--config", config])
        #expect(attached.succeeded, "\(attached.output)\(attached.error)")
        #expect(attached.output.contains("attached volume vol1"))
        try second.start()
        defer { _ = try? second.stop() }
        let verified = try fio(second.uri("vol1"), verifyOnly: true, directory: directory.path)
        #expect(verified.succeeded, "\(verified.output)\(verified.error)")
        let compare = try ProcessRunner.run(
            "qemu-img", ["compare", "-f", "raw", "-F", "raw", reference, second.uri("vol1")])
        #expect(compare.succeeded, "\(compare.output)\(compare.error)")
    }

    /// A scrub on an S3 backend: it takes, renews and releases its lease (the one object VolumeDriver replaces in
    /// place, so it must not go through the create-only PUT) and publishes a result; run twice, the second run takes
    /// the lease over the first's record. Then the volume reads back what was written last.
    @Test(arguments: S3Server.Kind.allCases)
    func scrubOnS3(kind: S3Server.Kind) async throws {
        let s3 = try S3Server.require(kind)
        let bucket = try await s3.makeBucket()
        let directory = try TemporaryDirectory("vd-s3scrub")
        defer { directory.remove() }
        let config = try self.config(in: directory.path, backendURL: s3.url(bucket: bucket))
        let server = try VDServer(
            dataDirectory: directory.path + "/data", extraArguments: ["--config", config], environment: s3.vdEnvironment
        )
        #expect(try server.cli(["volume", "create", "vol1", "--size", "64M", "--config", config]).succeeded)
        try server.start()
        let uri = server.uri("vol1")
        // Write 8 MiB twice: the first copy becomes dead data in its SCOs.
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0x41 0 8M", uri]).succeeded)
        #expect(try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0x42 0 8M", uri]).succeeded)
        #expect(try server.stop() == 0, "\(server.output)")
        for run in 1...2 {
            let scrub = try server.cli(["scrub", "--volume", "vol1", "--threshold", "0.9", "--config", config])
            #expect(scrub.succeeded, "run \(run): \(scrub.output)\(scrub.error)")
        }
        try server.start()
        defer { _ = try? server.stop() }
        let read = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "read -P 0x42 0 8M", uri])
        #expect(read.succeeded && !read.output.contains("failed"), "\(read.output)")
    }

    @Test func s3FailuresDoNotLoseAcknowledgedWrites() async throws {
        let s3 = try S3Server.require()
        let bucket = try await s3.makeBucket()
        let proxy = try await S3FaultProxy.start(upstream: s3.endpoint)
        let directory = try TemporaryDirectory("vd-s3f")
        defer { directory.remove() }
        let config = try self.config(in: directory.path, backendURL: s3.url(bucket: bucket, endpoint: proxy.endpoint))
        let server = try VDServer(
            dataDirectory: directory.path + "/data", extraArguments: ["--config", config], environment: s3.vdEnvironment
        )
        #expect(try server.cli(["volume", "create", "vol1", "--size", "64M", "--config", config]).succeeded)
        try server.start()
        // Bursts of 500s, 503 SlowDown, resets and truncated bodies while fio writes.
        proxy.inject(.internalError, count: 20)
        proxy.inject(.slowDown, count: 20)
        proxy.inject(.resetConnection, count: 5, method: "PUT")
        proxy.inject(.truncateResponseBody(keepingBytes: 100), count: 5, method: "GET")
        // Uploads that land but whose reply is lost: the retry meets its own object (412 on V4) and goes on.
        proxy.inject(.dropResponse, count: 5, method: "PUT")
        let written = try fio(server.uri("vol1"), verifyOnly: false, directory: directory.path)
        #expect(written.succeeded, "\(written.output)\(written.error)")
        #expect(!proxy.appliedFaults.isEmpty)
        // The faults stop; a clean shutdown uploads everything.
        proxy.clearFaults()
        #expect(try server.stop() == 0, "\(server.output)")
        // Restart from S3 alone (local flash gone): every acknowledged write is there.
        try FileManager.default.removeItem(atPath: directory.path + "/data/flash")
        try server.start()
        defer { _ = try? server.stop() }
        let verified = try fio(server.uri("vol1"), verifyOnly: true, directory: directory.path)
        #expect(verified.succeeded, "\(verified.output)\(verified.error)")
        await proxy.stop()
    }
}
