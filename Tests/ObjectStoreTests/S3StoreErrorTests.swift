// What an operator sees when the S3 backend is misconfigured: wrong secret, unknown access key, missing bucket,
// unreachable endpoint. Each must fail fast (no hang, no crash) with the right code and a message that says what to
// fix, and no message or description may ever contain the secret key.

import Foundation
import NIOCore
import ObjectStore
import Testing
import VolumeCore

@Suite("S3 store errors", .disabled(if: S3TestEnvironment.isSkipped, "VD_SKIP_S3=1"))
struct S3StoreErrorTests {
    @Test func wrongSecretIsAnAuthenticationErrorQuickly() async throws {
        let good = try await S3TestEnvironment.makeStore()
        defer { good.shutdown() }
        let wrongSecret = "this-is-not-the-secret-0123456789"
        let bad = try S3Store(
            configuration: try S3TestEnvironment.configuration(bucket: good.configuration.bucket) {
                $0.secretAccessKey = S3Secret(wrongSecret)
            })
        defer { bad.shutdown() }
        let start = ContinuousClock.now
        for operation in ["put", "get", "verify"] {
            let error = await vdError {
                switch operation {
                case "put": try await bad.put("object", data: ByteBuffer(string: "x"))
                case "get": _ = try await bad.get("object")
                default: try await bad.verifyAccess()
                }
            }
            #expect(error?.code == .authentication, "\(operation): \(String(describing: error))")
            #expect(error?.message.contains(good.configuration.accessKeyID) == true)
            #expect(error?.message.contains(wrongSecret) == false)
            #expect(error?.message.contains("SignatureDoesNotMatch") == true, "\(String(describing: error))")
        }
        #expect(seconds(since: start) < 5)
    }

    @Test func unknownAccessKeyIsAnAuthenticationError() async throws {
        let good = try await S3TestEnvironment.makeStore()
        defer { good.shutdown() }
        let bad = try S3Store(
            configuration: try S3TestEnvironment.configuration(bucket: good.configuration.bucket) {
                $0.accessKeyID = "NOSUCHACCESSKEY00000"
            })
        defer { bad.shutdown() }
        let error = await vdError { try await bad.verifyAccess() }
        #expect(error?.code == .authentication)
        #expect(error?.message.contains("NOSUCHACCESSKEY00000") == true, "\(String(describing: error))")
    }

    @Test func unknownBucketSaysToCreateIt() async throws {
        let store = try S3Store(configuration: try S3TestEnvironment.configuration(bucket: "vd-no-such-bucket-4711"))
        defer { store.shutdown() }
        let error = await vdError { try await store.verifyAccess() }
        #expect(error?.code == .configuration)
        #expect(error?.message.contains("create bucket vd-no-such-bucket-4711") == true, "\(String(describing: error))")
        let getError = await vdError { _ = try await store.get("x") }
        #expect(getError?.code == .configuration, "\(String(describing: getError))")
        let putError = await vdError { try await store.put("x", data: ByteBuffer(string: "x")) }
        #expect(putError?.code == .configuration, "\(String(describing: putError))")
    }

    @Test func unreachableEndpointFailsWithinTheDeadline() async throws {
        // Nothing listens on port 1: every connection is refused, retried until the deadline.
        let store = try S3Store(
            configuration: try S3TestEnvironment.configuration(bucket: "vd-unreachable", endpoint: "127.0.0.1:1") {
                $0.operationDeadlineSeconds = 2
                $0.retry = S3RetryPolicy(baseDelaySeconds: 0.05, maxDelaySeconds: 0.5, attemptsMax: 100)
            })
        defer { store.shutdown() }
        let start = ContinuousClock.now
        let error = await vdError { try await store.verifyAccess() }
        let elapsed = seconds(since: start)
        #expect(error?.code == .backend, "\(String(describing: error))")
        #expect(error?.message.contains("127.0.0.1:1") == true, "\(String(describing: error))")
        #expect(elapsed < 3, "took \(elapsed) s")
    }

    @Test func operationsAfterShutdownFail() async throws {
        let store = try await S3TestEnvironment.makeStore()
        try await store.put("a", data: ByteBuffer(string: "a"))
        store.shutdown()
        store.shutdown()  // idempotent
        let error = await vdError { _ = try await store.get("a") }
        #expect(error?.code == .shutdown)
    }
}

/// Configuration checks that need no server.
@Suite("S3 configuration")
struct S3ConfigurationTests {
    @Test func secretNeverShows() throws {
        let secret = "super-secret-value-that-must-not-leak"
        let configuration = S3Configuration(
            endpoint: "127.0.0.1:9", bucket: "bucket", accessKeyID: "AKIDVISIBLE", secretAccessKey: S3Secret(secret))
        var dumped = ""
        dump(configuration, to: &dumped)
        for text in [
            configuration.description, String(describing: configuration), String(reflecting: configuration), dumped,
            "\(configuration.secretAccessKey)", BackendSpec.s3(configuration).description,
        ] {
            #expect(!text.contains(secret), "leaked in: \(text)")
        }
        let store = try S3Store(configuration: configuration)
        defer { store.shutdown() }
        #expect(!store.description.contains(secret))
        #expect(store.description.contains("AKIDVISIBLE"))
    }

    @Test func badConfigurationIsRejected() {
        let base = S3Configuration(
            endpoint: "127.0.0.1:7480", bucket: "bucket", accessKeyID: "AK", secretAccessKey: S3Secret("s"))
        var cases: [(String, S3Configuration)] = []
        var c = base
        c.endpoint = "127.0.0.1:99999"
        cases.append(("bad port", c))
        c = base
        c.bucket = "x"
        cases.append(("short bucket", c))
        c = base
        c.uriStyle = .virtualHost
        c.bucket = "Upper_Case"
        cases.append(("virtual-host bucket", c))
        c = base
        c.inFlightRequestsMax = 0
        cases.append(("no in-flight slots", c))
        c = base
        c.requestTimeoutSeconds = 0
        cases.append(("zero timeout", c))
        c = base
        c.secretAccessKey = S3Secret("")
        cases.append(("empty secret", c))
        c = base
        c.retry.attemptsMax = 0
        cases.append(("no attempts", c))
        for (what, configuration) in cases {
            #expect(throws: VDError.self, "\(what)") { try configuration.validate() }
            #expect((try? S3Store(configuration: configuration)) == nil, "\(what)")
        }
        #expect(throws: Never.self) { try base.validate() }
    }
}
