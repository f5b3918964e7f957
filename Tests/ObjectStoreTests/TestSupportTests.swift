// The test support itself: FaultyObjectStore applies exactly the faults it is told (and replays by seed), the HTTP
// framer of S3FaultProxy gives back its input byte for byte however it is fed, and the retry backoff stays in bounds.

import NIOCore
import ObjectStore
import Testing
import VolumeCore
import VolumeTesting

@Suite("Test support")
struct TestSupportTests {
    @Test func faultyStoreScriptedFaults() async throws {
        let store = FaultyObjectStore(wrapping: MemoryStore(), seed: 42)
        let data = testBytes(1000, seed: 1)
        store.inject(.fail(VDError(.backend, "injected")), count: 2, on: [.put])
        #expect(await vdError { try await store.put("a", data: data) }?.message == "injected")
        #expect(await vdError { try await store.put("a", data: data) }?.message == "injected")
        try await store.put("a", data: data)
        #expect(try await store.get("a") == data)

        store.inject(.corruptReturnedBytes, on: [.get])
        let corrupted = try await store.get("a")
        #expect(corrupted.readableBytes == data.readableBytes && corrupted != data)
        store.inject(.truncateReturnedBytes, on: [.getRange])
        #expect(try await store.get("a", range: 0..<500).readableBytes < 500)

        store.inject(.failAfterPerforming(VDError(.timeout, "lost reply")), on: [.put])
        #expect(await vdError { try await store.put("b", data: data) }?.code == .timeout)
        #expect(try await store.head("b")?.sizeBytes == 1000, "the PUT happened although it reported failure")

        store.inject(.stall(seconds: 0.2), on: [.head], namePrefix: "a")
        let start = ContinuousClock.now
        _ = try await store.head("a")
        #expect(seconds(since: start) >= 0.2)
        #expect(store.appliedFaults.count == 6)
    }

    @Test func faultyStoreRandomFailuresReplayBySeed() async throws {
        func run(seed: UInt64) async -> [Bool] {
            let store = FaultyObjectStore(wrapping: MemoryStore(), seed: seed)
            store.failRandomly(probability: 0.3, with: VDError(.backend, "random"))
            var outcomes: [Bool] = []
            for index in 0..<50 {
                outcomes.append(await vdError { try await store.put("o\(index)", data: ByteBuffer(string: "x")) } == nil)
            }
            return outcomes
        }
        let first = await run(seed: 7)
        #expect(await run(seed: 7) == first)
        #expect(first.contains(true) && first.contains(false))
    }

    @Test(arguments: [1, 3, 7, 64, 100_000])
    func httpFramerRoundTripsDripFedStreams(chunkBytes: Int) {
        let responses =
            "HTTP/1.1 100 Continue\r\n\r\n"
            + "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"x\"\r\n\r\nhello"
            + "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"  // answer to HEAD: no body
            + "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n"
            + "HTTP/1.1 204 No Content\r\n\r\n"
            + "HTTP/1.1 206 Partial Content\r\ncontent-length: 3\r\n\r\nabc"
        let methods = ["PUT", "HEAD", "GET", "DELETE", "GET"]
        var parser = HTTPStreamParser(isResponse: true)
        var input = ByteBuffer(string: responses)
        var output = ByteBuffer()
        var statuses: [Int] = []
        var bodies: [String] = []
        var currentBody = ""
        var finalCount = 0
        while input.readableBytes > 0 {
            parser.append(input.readSlice(length: min(chunkBytes, input.readableBytes))!)
            while let piece = parser.next(bodyless: { _ in methods[finalCount] == "HEAD" }) {
                switch piece {
                case .head(let head):
                    output.writeImmutableBuffer(head.raw)
                    statuses.append(head.status)
                    if head.status / 100 != 1 { finalCount += 1 }
                    finalCount = min(finalCount, methods.count - 1)
                case .body(let bytes, _, let isFramed):
                    output.writeImmutableBuffer(bytes)
                    if !isFramed { currentBody += String(buffer: bytes) }
                case .end:
                    bodies.append(currentBody)
                    currentBody = ""
                }
            }
        }
        #expect(String(buffer: output) == responses)
        #expect(statuses == [100, 200, 200, 200, 204, 206])
        #expect(bodies.filter { !$0.isEmpty } == ["hello", "abc"])
    }

    @Test func backoffIsFullJitterWithinBounds() {
        let policy = S3RetryPolicy(baseDelaySeconds: 0.1, maxDelaySeconds: 1, attemptsMax: 10)
        var random = SeededRandom(seed: 3)
        for attempt in 1...20 {
            let cap = min(1, 0.1 * Double(1 << min(attempt - 1, 20)))
            for _ in 0..<50 {
                let delay = policy.delaySeconds(afterAttempt: attempt, using: &random)
                #expect(delay >= 0 && delay <= cap)
            }
        }
    }
}
