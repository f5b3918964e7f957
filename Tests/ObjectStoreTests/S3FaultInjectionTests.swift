// S3Store through S3FaultProxy: connection resets, stalls past the timeout, 500 and 503 bursts, truncated bodies and
// flipped bytes. Every transient fault must end in success after retries with intact data; persistent faults must
// end in a clear error within the operation deadline. `direct` is a second store on the same bucket that bypasses the
// proxy, to check what the server really stored.

import NIOCore
import ObjectStore
import Testing
import VolumeCore
import VolumeTesting

struct ProxiedS3 {
    let store: S3Store
    let direct: S3Store
    let proxy: S3FaultProxy
    let bucket: String
}

func withProxiedS3(
    _ adjust: (inout S3Configuration) -> Void = { _ in }, _ body: (ProxiedS3) async throws -> Void
) async throws {
    let direct = try await S3TestEnvironment.makeStore()
    let proxy = try await S3FaultProxy.start(upstream: direct.configuration.endpoint)
    let store = try S3Store(
        configuration: try S3TestEnvironment.configuration(
            bucket: direct.configuration.bucket, endpoint: proxy.endpoint
        ) {
            $0.requestTimeoutSeconds = 10
            // Generous: on a loaded 2-core CI machine RGW itself can pause for over a second, and a stall retry
            // would hide a fault the test injected (CI once saw a flipped range GET abandoned and retried clean).
            // Tests of stalls set their own, shorter timeout.
            $0.stallTimeoutSeconds = 8
            $0.operationDeadlineSeconds = 20
            $0.retry = S3RetryPolicy(baseDelaySeconds: 0.01, maxDelaySeconds: 0.1, attemptsMax: 10)
            adjust(&$0)
        })
    let subject = ProxiedS3(store: store, direct: direct, proxy: proxy, bucket: direct.configuration.bucket)
    do {
        try await body(subject)
    } catch {
        store.shutdown()
        direct.shutdown()
        await proxy.stop()
        throw error
    }
    store.shutdown()
    direct.shutdown()
    await proxy.stop()
}

@Suite("S3 fault injection", .disabled(if: S3TestEnvironment.isSkipped, "VD_SKIP_S3=1"))
struct S3FaultInjectionTests {
    @Test func passesTrafficThroughUnchanged() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(8 << 20, seed: 10)  // large enough for Expect: 100-continue
            try await s3.store.put("through/large", data: data)
            try await s3.store.put("through/small", data: ByteBuffer(string: "small"))
            #expect(try await s3.store.get("through/large") == data)
            #expect(try await s3.direct.get("through/large") == data)
            #expect(try await s3.store.get("through/large", range: 100..<200) == data.getSlice(at: 100, length: 100)!)
            #expect(try await s3.store.head("through/small")?.sizeBytes == 5)
            #expect(try await s3.store.list(prefix: "through/").map(\.name) == ["through/large", "through/small"])
            try await s3.store.delete("through/small")
            #expect(try await s3.store.head("through/small") == nil)
            #expect(s3.proxy.requestCount >= 8)
            #expect(s3.proxy.appliedFaults.isEmpty)
        }
    }

    @Test func connectionResetsAreRetried() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(1 << 20, seed: 11)
            s3.proxy.inject(.resetConnection, count: 3, method: "PUT")
            try await s3.store.put("reset/object", data: data)
            s3.proxy.inject(.resetConnection, count: 3, method: "GET")
            #expect(try await s3.store.get("reset/object") == data)
            s3.proxy.inject(.resetConnection, count: 2, method: "HEAD")
            #expect(try await s3.store.head("reset/object")?.sizeBytes == 1 << 20)
            s3.proxy.inject(.resetConnection, count: 2, method: "DELETE")
            try await s3.store.delete("reset/object")
            #expect(s3.proxy.appliedFaults.count == 10)
            #expect(try await s3.direct.head("reset/object") == nil)
        }
    }

    @Test func stallsPastTheTimeoutAreAbortedAndRetried() async throws {
        try await withProxiedS3({ $0.stallTimeoutSeconds = 1 }) { s3 in
            let data = testBytes(100_000, seed: 12)
            try await s3.store.put("stall/object", data: data)
            s3.proxy.inject(.stall(seconds: 8), count: 1, method: "GET")
            let start = ContinuousClock.now
            #expect(try await s3.store.get("stall/object") == data)
            let elapsed = seconds(since: start)
            // Before the 8 s stall ended: the stall timeout aborted it and the retry succeeded.
            #expect(elapsed >= 0.9 && elapsed < 7, "took \(elapsed) s with a 1 s stall timeout")
            s3.proxy.inject(.stall(seconds: 8), count: 1, method: "PUT")
            try await s3.store.put("stall/second", data: data)
            #expect(try await s3.direct.get("stall/second") == data)
        }
    }

    @Test func errorBurstsAreRetried() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(300_000, seed: 13)
            s3.proxy.inject(.internalError, count: 4, method: "PUT")
            try await s3.store.put("burst/object", data: data)
            s3.proxy.inject(.slowDown, count: 4, method: "GET")
            #expect(try await s3.store.get("burst/object") == data)
            s3.proxy.inject(.slowDown, count: 2, method: "HEAD")
            #expect(try await s3.store.head("burst/object")?.sizeBytes == 300_000)
            s3.proxy.inject(.internalError, count: 2, method: "GET", pathContains: "prefix=")
            #expect(try await s3.store.list(prefix: "burst/").count == 1)
            #expect(s3.proxy.appliedFaults.count == 12)
            #expect(s3.proxy.pendingFaultCount == 0)
        }
    }

    @Test func truncatedBodiesAreRetriedNeverReturnedShort() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(2 << 20, seed: 14)
            try await s3.store.put("cut/object", data: data)
            s3.proxy.inject(.truncateResponseBody(keepingBytes: 1000), count: 2, method: "GET")
            #expect(try await s3.store.get("cut/object") == data)
            s3.proxy.inject(.truncateResponseBody(keepingBytes: 0), count: 1, method: "GET")
            s3.proxy.inject(.truncateResponseBody(keepingBytes: 65_535), count: 1, method: "GET")
            let range: Range<UInt64> = 1000..<(1 << 20)
            let part = try await s3.store.get("cut/object", range: range)
            #expect(part == data.getSlice(at: 1000, length: range.count)!)
            #expect(s3.proxy.appliedFaults.count == 4)
        }
    }

    @Test func flippedByteInAWholeGetIsCaughtByTheETag() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(500_000, seed: 15)
            try await s3.store.put("flip/object", data: data)
            s3.proxy.inject(.flipResponseBodyByte(offset: 12345), count: 1, method: "GET")
            #expect(try await s3.store.get("flip/object") == data)
            let gets = s3.proxy.requestLines.filter { $0.hasPrefix("GET ") && $0.contains("flip/object") }
            #expect(gets.count == 2, "the corrupted GET was retried once: \(gets)")
        }
    }

    @Test func flippedByteInARangeGetIsLeftToTheCaller() async throws {
        // A range has no checksum S3 can give us: the caller's CRC (DESIGN.md: every cluster is verified) catches it.
        try await withProxiedS3 { s3 in
            let data = testBytes(100_000, seed: 16)
            try await s3.store.put("flip/range", data: data)
            s3.proxy.inject(.flipResponseBodyByte(offset: 10), count: 1, method: "GET")
            let part = try await s3.store.get("flip/range", range: 0..<4096)
            #expect(s3.proxy.appliedFaults == [.flipResponseBodyByte(offset: 10)])
            let gets = s3.proxy.requestLines.filter { $0.hasPrefix("GET ") && $0.contains("flip/range") }
            #expect(gets.count == 1, "the corrupted range reached the caller without a retry: \(gets)")
            #expect(part.readableBytes == 4096)
            #expect(part != data.getSlice(at: 0, length: 4096)!)
            #expect(try await s3.store.get("flip/range", range: 0..<4096) == data.getSlice(at: 0, length: 4096)!)
        }
    }

    @Test func corruptedUploadIsRejectedByContentMD5AndRetried() async throws {
        try await withProxiedS3 { s3 in
            let data = testBytes(3 << 20, seed: 17)
            // The first PUT of a V4 store probes which payload check the store verifies: settle it first, so the
            // faults meet the object's uploads, not the probe (CI once saw the count off by the probe).
            _ = await s3.store.payloadIntegrity()
            s3.proxy.inject(
                .flipRequestBodyByte(offset: 2_000_000), count: 2, method: "PUT", pathContains: "md5/object")
            try await s3.store.put("md5/object", data: data)
            #expect(
                s3.proxy.appliedFaults == [
                    .flipRequestBodyByte(offset: 2_000_000), .flipRequestBodyByte(offset: 2_000_000),
                ])
            let puts = s3.proxy.requestLines.filter { $0.hasPrefix("PUT ") && $0.contains("md5/object") }
            #expect(puts.count == 3, "two corrupted uploads rejected, the third stored: \(puts)")
            #expect(try await s3.direct.get("md5/object") == data)
        }
    }

    @Test func persistentErrorsFailWithinTheDeadlineNamingTheObject() async throws {
        try await withProxiedS3({ $0.retry.attemptsMax = 4 }) { s3 in
            s3.proxy.inject(.slowDown, count: 100, method: "PUT")
            let start = ContinuousClock.now
            let error = await vdError { try await s3.store.put("doomed/object", data: ByteBuffer(string: "x")) }
            #expect(error?.code == .backend, "\(String(describing: error))")
            #expect(error?.message.contains("doomed/object") == true)
            #expect(error?.message.contains("SlowDown") == true, "\(String(describing: error))")
            // The attempts ran out (4 PUTs), well before the 20 s operation deadline: counted, not timed closely (a
            // 5 s bound failed once on a loaded 2-core CI machine at 5.18 s).
            let puts = s3.proxy.requestLines.filter { $0.hasPrefix("PUT ") && $0.contains("doomed/object") }
            #expect(puts.count == 4, "\(puts)")
            #expect(seconds(since: start) < 15)
        }
    }

    @Test func persistentStallsTimeOutAtTheDeadline() async throws {
        try await withProxiedS3({
            $0.stallTimeoutSeconds = 0.5
            $0.operationDeadlineSeconds = 2.5
        }) { s3 in
            s3.proxy.inject(.stall(seconds: 30), count: 100, method: "GET")
            let start = ContinuousClock.now
            let error = await vdError { _ = try await s3.store.get("hung/object") }
            let elapsed = seconds(since: start)
            #expect(error?.code == .timeout, "\(String(describing: error))")
            #expect(error?.message.contains("hung/object") == true)
            // Far below the 30 s stall: the deadline ended it (loose above: a loaded CI machine adds seconds).
            #expect(elapsed >= 1 && elapsed < 8, "took \(elapsed) s with a 2.5 s deadline")
        }
    }

    @Test func concurrentOperationsSurviveMixedFaults() async throws {
        try await withProxiedS3 { s3 in
            s3.proxy.inject(.resetConnection, count: 5, method: "PUT")
            s3.proxy.inject(.slowDown, count: 5, method: "PUT")
            s3.proxy.inject(.truncateResponseBody(keepingBytes: 100), count: 5, method: "GET")
            s3.proxy.inject(.internalError, count: 5, method: "GET")
            let names = (0..<32).map { "mixed/\($0)" }
            try await putMany(s3.store, names: names, bytes: 50_000, concurrency: 32)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, name) in names.enumerated() {
                    group.addTask {
                        let got = try await s3.store.get(name)
                        #expect(got == testBytes(50_000, seed: UInt64(index) + 1000))
                    }
                }
                try await group.waitForAll()
            }
            #expect(s3.proxy.pendingFaultCount == 0)
        }
    }

    @Test func shutdownAbortsInFlightRequestsPromptly() async throws {
        try await withProxiedS3({ $0.stallTimeoutSeconds = 30 }) { s3 in
            s3.proxy.inject(.stall(seconds: 30), count: 1, method: "GET")
            let store = s3.store
            let pending = Task { await vdError { _ = try await store.get("anything") } }
            try await Task.sleep(nanoseconds: 300_000_000)
            let start = ContinuousClock.now
            store.shutdown()
            let error = await pending.value
            #expect(error?.code == .shutdown, "\(String(describing: error))")
            // Promptly: not after the 30 s stall or the 10 s request timeout. (A 1 s bound failed once at 1.007 s on
            // a loaded 2-core CI machine: the client's shutdown runs on the busy cooperative pool.)
            let elapsed = seconds(since: start)
            #expect(elapsed < 3, "took \(elapsed) s")
        }
    }

    @Test func cancellationAbortsAStalledRequest() async throws {
        try await withProxiedS3({ $0.stallTimeoutSeconds = 30 }) { s3 in
            s3.proxy.inject(.stall(seconds: 30), count: 1, method: "GET")
            let store = s3.store
            let pending = Task { await vdError { _ = try await store.get("anything") } }
            try await Task.sleep(nanoseconds: 300_000_000)
            let start = ContinuousClock.now
            pending.cancel()
            let error = await pending.value
            #expect(error != nil, "a cancelled GET must not succeed")
            let elapsed = seconds(since: start)
            #expect(elapsed < 3, "took \(elapsed) s, with a 30 s stall timeout")
            // The store keeps working for others.
            try await store.put("after-cancel", data: ByteBuffer(string: "ok"))
            #expect(String(buffer: try await store.get("after-cancel")) == "ok")
        }
    }

    @Test func waitingQueueIsBounded() async throws {
        try await withProxiedS3({
            $0.inFlightRequestsMax = 1
            $0.queuedRequestsMax = 2
            $0.stallTimeoutSeconds = 1
        }) { s3 in
            s3.proxy.inject(.stall(seconds: 5), count: 1, method: "GET")
            try await s3.direct.put("queued", data: ByteBuffer(string: "q"))
            let store = s3.store
            let first = Task { await vdError { _ = try await store.get("queued") } }
            try await Task.sleep(nanoseconds: 200_000_000)  // the first GET holds the only slot
            let rest = (0..<4).map { _ in Task { await vdError { _ = try await store.get("queued") } } }
            var busy = 0
            for task in rest {
                let error = await task.value
                if error?.code == .busy { busy += 1 } else { #expect(error == nil, "\(String(describing: error))") }
            }
            #expect(busy >= 2, "at most 2 requests may wait for the one slot")
            #expect(await first.value == nil, "the stalled GET is retried and succeeds")
        }
    }
}
