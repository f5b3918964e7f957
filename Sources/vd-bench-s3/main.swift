// vd-bench-s3: upload throughput of S3Store (signatures V4 and V2) against its raw transports (AsyncHTTPClient with
// V4 signing; libs3 S3_put_object with V2), in one run against one server.
//
//   vd-bench-s3 [--objects N] [--size BYTES] [--concurrency K] [--repeat R] [--endpoint HOST:PORT] [--bucket NAME]
//
// Reads the server and credentials from VD_TEST_S3_ENDPOINT, VD_TEST_S3_ACCESS_KEY, VD_TEST_S3_SECRET_KEY (as written
// by tools/s3/rgw.sh). Prints MB/s (10^6 bytes per second) of: raw libs3 one at a time, raw libs3 K in flight in one
// request context (with Content-MD5 computed once, or per PUT like S3Store does), the raw V4 transport one at a time
// and K at once, S3Store V2 and S3Store V4 one at a time and K at once, and the ratios (S3Store V4 / raw V4 is the
// figure the V4 transport is held to: >= 0.8). Every phase uploads the same N objects of the same size (new names each time)
// and deletes them afterwards (memstore keeps them in RAM). The phases run R rounds, interleaved, and the medians are
// reported with the range: on a small machine the server shares the cores and single runs vary by tens of percent.

import NIOCore
import ObjectStore
import VolumeCore

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif

struct Options {
    var objects = 8
    var sizeBytes = 64 << 20
    var concurrency = 4
    var repeats = 3
    var endpoint = ""
    var bucket = "vd-bench"
    var accessKey = ""
    var secretKey = ""
}

func environment(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }

func fail(_ message: String) -> Never {
    fputs("vd-bench-s3: \(message)\n", stderr)
    exit(1)
}

func parseOptions() -> Options {
    var options = Options()
    options.endpoint = environment("VD_TEST_S3_ENDPOINT") ?? ""
    options.accessKey = environment("VD_TEST_S3_ACCESS_KEY") ?? environment("AWS_ACCESS_KEY_ID") ?? ""
    options.secretKey = environment("VD_TEST_S3_SECRET_KEY") ?? environment("AWS_SECRET_ACCESS_KEY") ?? ""
    var arguments = CommandLine.arguments.dropFirst()
    while let flag = arguments.popFirst() {
        guard let value = arguments.popFirst() else { fail("\(flag) needs a value") }
        switch flag {
        case "--objects":
            guard let number = Int(value) else { fail("--objects takes a number") }
            options.objects = number
        case "--size":
            options.sizeBytes = Int((try? ByteSize.parse(value)) ?? 0)
            if options.sizeBytes <= 0 { fail("--size takes a size such as 64M") }
        case "--concurrency":
            guard let number = Int(value) else { fail("--concurrency takes a number") }
            options.concurrency = number
        case "--repeat":
            guard let number = Int(value), number >= 1 else { fail("--repeat takes a number >= 1") }
            options.repeats = number
        case "--endpoint": options.endpoint = value
        case "--bucket": options.bucket = value
        default:
            fail(
                "unknown option \(flag); use --objects N --size 64M --concurrency K --repeat R --endpoint H:P --bucket B"
            )
        }
    }
    if options.endpoint.isEmpty { fail("no server: set VD_TEST_S3_ENDPOINT (tools/s3/rgw.sh start DIR) or --endpoint") }
    if options.accessKey.isEmpty || options.secretKey.isEmpty {
        fail("set VD_TEST_S3_ACCESS_KEY and VD_TEST_S3_SECRET_KEY")
    }
    if options.objects < 1 || options.concurrency < 1 { fail("--objects and --concurrency must be at least 1") }
    return options
}

func megabytesPerSecond(_ options: Options, _ seconds: Double) -> Double {
    Double(options.objects * options.sizeBytes) / seconds / 1e6
}

func format(_ value: Double) -> String {
    let rounded = (value * 10).rounded() / 10
    return String(rounded)
}

/// Runs the blocking raw benchmark on a thread of its own (never on the cooperative pool).
func runRaw(
    _ configuration: S3Configuration, names: [String], body: ByteBuffer, concurrency: Int,
    contentMD5: S3RawPutBenchmark.ContentMD5
) async throws -> Double {
    try await withCheckedThrowingContinuation { continuation in
        let box = Unmanaged.passRetained(
            RawJob(
                configuration: configuration, names: names, body: body, concurrency: concurrency,
                contentMD5: contentMD5
            ) {
                continuation.resume(with: $0)
            })
        var thread = pthread_t()
        pthread_create(
            &thread, nil,
            { argument in
                let job = Unmanaged<RawJob>.fromOpaque(argument!).takeRetainedValue()
                job.run()
                return nil
            }, box.toOpaque())
        pthread_detach(thread)
    }
}

final class RawJob: @unchecked Sendable {
    let configuration: S3Configuration
    let names: [String]
    let body: ByteBuffer
    let concurrency: Int
    let contentMD5: S3RawPutBenchmark.ContentMD5
    let done: (Result<Double, any Error>) -> Void
    init(
        configuration: S3Configuration, names: [String], body: ByteBuffer, concurrency: Int,
        contentMD5: S3RawPutBenchmark.ContentMD5, done: @escaping (Result<Double, any Error>) -> Void
    ) {
        self.configuration = configuration
        self.names = names
        self.body = body
        self.concurrency = concurrency
        self.contentMD5 = contentMD5
        self.done = done
    }
    func run() {
        do {
            let seconds = try S3RawPutBenchmark.run(
                configuration: configuration, names: names, body: body, concurrency: concurrency,
                contentMD5: contentMD5)
            done(.success(seconds))
        } catch {
            done(.failure(error))
        }
    }
}

func runStore(_ store: S3Store, names: [String], body: ByteBuffer, concurrency: Int) async throws -> Double {
    let start = ContinuousClock.now
    try await withThrowingTaskGroup(of: Void.self) { group in
        for (index, name) in names.enumerated() {
            if index >= concurrency { try await group.next() }
            group.addTask { try await store.put(name, data: body) }
        }
        try await group.waitForAll()
    }
    let elapsed = ContinuousClock.now - start
    return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
}

func deleteAll(_ store: S3Store, _ names: [String]) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        for name in names { group.addTask { try await store.delete(name) } }
        try await group.waitForAll()
    }
}

let options = parseOptions()
let configuration = S3Configuration(
    endpoint: options.endpoint, bucket: options.bucket, uriStyle: .path, scheme: .http,
    accessKeyID: options.accessKey, secretAccessKey: S3Secret(options.secretKey), signature: .v2,
    inFlightRequestsMax: max(16, options.concurrency))
var configurationV4 = configuration
configurationV4.signature = .v4
do {
    let store = try S3Store(configuration: configuration)
    try await store.createBucketIfMissing()
    let storeV4 = try S3Store(configuration: configurationV4)
    // The check S3Store V4 uses on this store (the "hash per PUT" raw phase does the same work).
    let integrityV4 = await storeV4.payloadIntegrity()
    var body = ByteBufferAllocator().buffer(capacity: options.sizeBytes)
    var state: UInt64 = 0x1234_5678_9ABC_DEF1
    while body.readableBytes < options.sizeBytes {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        body.writeInteger(state, as: UInt64.self)
    }
    body.moveWriterIndex(to: options.sizeBytes)
    let run = String(UInt32.random(in: 0...UInt32.max), radix: 16)
    func names(_ phase: String) -> [String] { (0..<options.objects).map { "bench/\(run)/\(phase)/\($0)" } }

    print(
        "S3 upload benchmark: \(options.objects) objects of \(ByteSize.format(UInt64(options.sizeBytes))), "
            + "concurrency \(options.concurrency), \(options.repeats) rounds, server \(options.endpoint) "
            + "(\(configuration.bucket))")
    let md5Start = ContinuousClock.now
    for _ in 0..<4 { _ = S3Encoding.md5(body) }
    let md5Elapsed = ContinuousClock.now - md5Start
    let md5Seconds = (Double(md5Elapsed.components.seconds) + Double(md5Elapsed.components.attoseconds) / 1e18) / 4
    print(
        "  Content-MD5 of one object (S3Store computes it per PUT; the raw runs send one computed beforehand): "
            + "\(format(md5Seconds * 1000)) ms, \(format(Double(options.sizeBytes) / md5Seconds / 1e6)) MB/s")
    let shaStart = ContinuousClock.now
    for _ in 0..<4 { _ = body.withUnsafeReadableBytes { S3SignatureV4.sha256Hex($0) } }
    let shaElapsed = ContinuousClock.now - shaStart
    let shaSeconds = (Double(shaElapsed.components.seconds) + Double(shaElapsed.components.attoseconds) / 1e18) / 4
    print(
        "  SHA256 of one object (what a signed V4 payload would add per PUT; S3Store sends UNSIGNED-PAYLOAD with a "
            + "signed Content-MD5): \(format(shaSeconds * 1000)) ms, \(format(Double(options.sizeBytes) / shaSeconds / 1e6)) MB/s"
    )
    let phases: [(name: String, concurrency: Int, raw: S3RawPutBenchmark.ContentMD5?)] = [
        ("raw libs3 sequential", 1, .precomputed),
        ("raw libs3 concurrent", options.concurrency, .precomputed),
        ("raw libs3 concurrent, MD5 per PUT", options.concurrency, .perObject),
        ("raw V4 sequential", 1, nil),
        ("raw V4 concurrent", options.concurrency, nil),
        ("raw V4 concurrent, hash per PUT", options.concurrency, nil),
        ("S3Store V2 sequential", 1, nil),
        ("S3Store V2 concurrent", options.concurrency, nil),
        ("S3Store V4 sequential", 1, nil),
        ("S3Store V4 concurrent", options.concurrency, nil),
    ]
    var rates: [String: [Double]] = [:]
    for round in 1...options.repeats {
        var line = "  round \(round):"
        for phase in phases {
            let phaseNames = names("\(round)-" + phase.name.replacingSpaces())
            let seconds: Double
            if let contentMD5 = phase.raw {
                seconds = try await runRaw(
                    configuration, names: phaseNames, body: body, concurrency: phase.concurrency,
                    contentMD5: contentMD5)
            } else if phase.name.hasPrefix("raw V4") {
                seconds = try await S3RawV4PutBenchmark.run(
                    configuration: configurationV4, names: phaseNames, body: body, concurrency: phase.concurrency,
                    checkPerPut: phase.name.hasSuffix("hash per PUT") ? integrityV4 : nil)
            } else {
                seconds = try await runStore(
                    phase.name.hasPrefix("S3Store V4") ? storeV4 : store, names: phaseNames, body: body,
                    concurrency: phase.concurrency)
            }
            rates[phase.name, default: []].append(megabytesPerSecond(options, seconds))
            line += " \(format(megabytesPerSecond(options, seconds)))"
            try await deleteAll(store, phaseNames)
        }
        print(line + " MB/s")
    }
    func median(_ name: String) -> Double {
        let sorted = rates[name]!.sorted()
        return sorted.count % 2 == 1
            ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }
    for phase in phases {
        let values = rates[phase.name]!
        print(
            "  \(phase.name) (K=\(phase.concurrency)): median \(format(median(phase.name))) MB/s "
                + "(range \(format(values.min()!))-\(format(values.max()!)))")
    }
    print(
        "  ratio of medians S3Store V2/raw libs3: sequential \(format(median("S3Store V2 sequential") / median("raw libs3 sequential"))), "
            + "concurrent \(format(median("S3Store V2 concurrent") / median("raw libs3 concurrent"))), "
            + "concurrent vs raw with MD5 per PUT "
            + "\(format(median("S3Store V2 concurrent") / median("raw libs3 concurrent, MD5 per PUT")))")
    func ratio(_ a: String, _ b: String) -> String { String(format: "%.2f", median(a) / median(b)) }
    print(
        "  ratio of medians S3Store V4/raw V4: sequential \(ratio("S3Store V4 sequential", "raw V4 sequential")), "
            + "concurrent \(ratio("S3Store V4 concurrent", "raw V4 concurrent")), concurrent vs raw V4 doing the same "
            + "check per PUT (\(integrityV4.rawValue)) \(ratio("S3Store V4 concurrent", "raw V4 concurrent, hash per PUT"))"
            + "; S3Store V4/S3Store V2: sequential "
            + "\(format(median("S3Store V4 sequential") / median("S3Store V2 sequential"))), concurrent "
            + "\(format(median("S3Store V4 concurrent") / median("S3Store V2 concurrent")))")
    store.shutdown()
    storeV4.shutdown()
} catch {
    fail("\(error)")
}

extension String {
    func replacingSpaces() -> String { String(compactMap { $0 == "," ? nil : $0 == " " ? "-" : $0 }) }
}
