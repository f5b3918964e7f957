// The one thread that talks to libs3. It owns up to `inFlightRequestsMax` libs3 request contexts ("slots", each one
// curl multi handle running at most one request, which keeps that slot's keep-alive connection), waits on all their
// sockets with one select(), and turns libs3's @convention(c) callbacks into results that resume Swift continuations.
//
// Faults it must survive: a request that stalls (no byte in either direction for `stallTimeoutSeconds`) or runs past
// its own timeout is aborted by destroying its slot's context, which closes its connection and reports the request
// as interrupted; a libs3 call that fails synchronously; a shutdown while requests are queued or in flight (all of
// them complete with `.shutdown`, nothing is left waiting). Every queue is bounded: at most `queuedRequestsMax`
// requests wait, at most `inFlightRequestsMax` run. One attempt here is one HTTP request; retries live in S3Store.

import CLibS3
import NIOCore
import Synchronization
import VolumeCore

#if canImport(Glibc)
    @preconcurrency import Glibc
#elseif canImport(Musl)
    @preconcurrency import Musl
#endif

/// Monotonic nanoseconds (CLOCK_MONOTONIC).
func monotonicNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}

/// What an attempt asks libs3 to do.
enum S3Operation {
    /// `createOnly`: fail with 412 if the name exists (If-None-Match: *; V4 only, libs3 cannot send it). The body's
    /// integrity rests on `md5Base64` (Content-MD5) or, V4 only, on `payloadSHA256` (the signed payload hash).
    case put(body: ByteBuffer, md5Base64: String?, payloadSHA256: String?, createOnly: Bool)
    /// `byteCount == 0` means to the end of the object.
    case get(startByte: UInt64, byteCount: UInt64)
    case head
    case delete
    case list(prefix: String, marker: String?, maxKeys: Int32, delimiter: String? = nil)
    case testBucket
    case createBucket
    // Multipart uploads: signature V4 only (S3HTTPTransport); libs3's loop refuses them.
    case createMultipart
    case uploadPart(body: ByteBuffer, md5Base64: String, partNumber: Int, uploadID: String)
    /// `body` is the CompleteMultipartUpload XML.
    case completeMultipart(uploadID: String, body: ByteBuffer, createOnly: Bool)
    case abortMultipart(uploadID: String)
    case listMultipart(prefix: String, keyMarker: String?, uploadIDMarker: String?)

    var verb: String {
        switch self {
        case .put: "PUT"
        case .get: "GET"
        case .head: "HEAD"
        case .delete: "DELETE"
        case .list: "LIST"
        case .testBucket: "GET location of"
        case .createBucket: "CREATE"
        case .createMultipart: "CREATE MULTIPART UPLOAD"
        case .uploadPart: "UPLOAD PART"
        case .completeMultipart: "COMPLETE MULTIPART UPLOAD"
        case .abortMultipart: "ABORT MULTIPART UPLOAD"
        case .listMultipart: "LIST MULTIPART UPLOADS"
        }
    }
}

/// Why the loop (not the server) ended an attempt.
enum S3AbortReason: Sendable, Equatable {
    /// The request ran longer than its timeout.
    case timedOut(seconds: Double)
    /// No byte moved for the stall timeout.
    case stalled(seconds: Double)
    /// The response was larger than the bound.
    case tooLarge(bytes: UInt64)
    case cancelled
    case shutdown
    /// The waiting queue was full.
    case queueFull(limit: Int)
}

/// The outcome of one HTTP request, as libs3 reported it, plus what was received.
struct S3AttemptResult: Sendable {
    var status: UInt32 = S3StatusInternalError.rawValue
    var statusName: String = ""
    var errorMessage: String?
    var errorResource: String?
    var errorFurtherDetails: String?
    var abort: S3AbortReason?
    /// GET: the bytes received; HEAD/GET: Content-Length of the response; GET: the ETag.
    var body: ByteBuffer?
    var contentLength: UInt64?
    var eTag: String?
    /// LIST: one page.
    var listed: [ObjectInfo] = []
    /// V4 transport: the HTTP status and the S3 error code of the response (libs3 reports neither).
    var httpStatus: Int?
    var errorCode: String?
    /// CREATE MULTIPART: the upload's id. LIST MULTIPART: one page of uploads and where the next starts.
    var uploadID: String?
    var uploads: [S3MultipartUpload] = []
    var nextKeyMarker: String?
    var nextUploadIDMarker: String?
    var isTruncated = false
    /// With a delimiter: the names that continue past it, up to and including it.
    var commonPrefixes: [String] = []
    var nextMarker: String?

    var isOK: Bool { status == S3StatusOK.rawValue && abort == nil }
    var s3Status: S3Status { S3Status(rawValue: status) }
}

/// A multipart upload in progress (not completed nor aborted).
package struct S3MultipartUpload: Sendable, Hashable {
    package var key: String
    package var uploadID: String
    /// As the server wrote it (ISO 8601).
    package var initiated: String
}

/// The credentials and addressing that every request of one store carries.
struct S3Target: Sendable {
    var host: String
    var bucket: String
    var accessKeyID: String
    var secret: S3Secret
    var scheme: S3Configuration.Scheme
    var uriStyle: S3Configuration.URIStyle
}

/// One HTTP request in flight. Created by S3Store, then touched only by the loop thread (and the libs3 callbacks,
/// which run on it) until `finish` hands the result to the continuation.
final class S3Request: @unchecked Sendable {
    let operation: S3Operation
    let key: String
    let timeoutNanoseconds: UInt64
    let stallTimeoutNanoseconds: UInt64
    let bodySizeBytesMax: UInt64
    let cancelled = Atomic<Bool>(false)

    // Loop-thread state.
    var continuation: CheckedContinuation<S3AttemptResult, Never>?
    var result = S3AttemptResult()
    var startNanoseconds: UInt64 = 0
    var lastProgressNanoseconds: UInt64 = 0
    var putOffset = 0
    var isFinished = false
    /// Where S3_test_bucket writes the bucket's location constraint: libs3 writes it while parsing the response,
    /// after the submitting call has returned, so it must live as long as the request (freed in deinit).
    let locationBuffer = UnsafeMutableBufferPointer<CChar>.allocate(capacity: 64)

    init(
        operation: S3Operation, key: String, timeoutSeconds: Double, stallTimeoutSeconds: Double,
        bodySizeBytesMax: UInt64
    ) {
        self.operation = operation
        self.key = key
        self.timeoutNanoseconds = UInt64(max(timeoutSeconds, 0.001) * 1e9)
        self.stallTimeoutNanoseconds = UInt64(max(stallTimeoutSeconds, 0.001) * 1e9)
        self.bodySizeBytesMax = bodySizeBytesMax
        locationBuffer.initialize(repeating: 0)
    }

    deinit {
        locationBuffer.deallocate()
    }

    /// Hands the result to the waiting task, once.
    func finish() {
        guard !isFinished else { return }
        isFinished = true
        let continuation = self.continuation
        self.continuation = nil
        continuation?.resume(returning: result)
    }

    func progressed() { lastProgressNanoseconds = monotonicNanoseconds() }
}

final class S3RequestLoop: @unchecked Sendable {
    private struct Shared {
        var pending: [S3Request] = []
        var pendingHead = 0
        var isShuttingDown = false
        var pendingCount: Int { pending.count - pendingHead }
    }

    private struct Slot {
        var context: OpaquePointer?
        var request: S3Request?
    }

    private let target: S3Target
    private let inFlightMax: Int
    private let queuedMax: Int
    private let shared = Mutex(Shared())
    private let wakeReadFD: Int32
    private let wakeWriteFD: Int32
    private let thread = Mutex<pthread_t?>(nil)

    /// libs3 is initialised once per process and never deinitialised (other stores may still use it).
    private static let libraryStatus: UInt32 = S3_initialize("VolumeDriver", Int32(S3_INIT_ALL), nil).rawValue

    /// Initialises libs3 for the process (once; later calls only report the outcome).
    static func initializeLibrary() throws(VDError) {
        let status = libraryStatus
        guard status == S3StatusOK.rawValue else {
            throw VDError(
                .backend,
                "libs3 failed to initialise: \(String(cString: S3_get_status_name(S3Status(rawValue: status))))")
        }
    }

    init(target: S3Target, inFlightMax: Int, queuedMax: Int) throws(VDError) {
        try Self.initializeLibrary()
        self.target = target
        self.inFlightMax = inFlightMax
        self.queuedMax = queuedMax
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw VDError(.io, "cannot create the S3 request loop's wake-up pipe: \(String(cString: strerror(errno)))")
        }
        wakeReadFD = fds[0]
        wakeWriteFD = fds[1]
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        guard wakeReadFD < FD_SETSIZE else {
            Glibc.close(wakeReadFD)
            Glibc.close(wakeWriteFD)
            throw VDError(
                .io, "the process has too many open files for select() (descriptor \(fds[0]) >= \(FD_SETSIZE))")
        }
        var handle = pthread_t()
        let box = Unmanaged.passRetained(self)
        let created = pthread_create(
            &handle, nil,
            { argument in
                let loop = Unmanaged<S3RequestLoop>.fromOpaque(argument!).takeRetainedValue()
                loop.run()
                return nil
            }, box.toOpaque())
        guard created == 0 else {
            box.release()
            Glibc.close(wakeReadFD)
            Glibc.close(wakeWriteFD)
            throw VDError(.io, "cannot start the S3 request loop thread: \(String(cString: strerror(created)))")
        }
        thread.withLock { $0 = handle }
    }

    deinit {
        Glibc.close(wakeReadFD)
        Glibc.close(wakeWriteFD)
    }

    /// Runs one HTTP request and returns how it ended. Never throws: failures are in the result.
    func perform(_ request: S3Request) async -> S3AttemptResult {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<S3AttemptResult, Never>) in
                request.continuation = continuation
                let refusal = shared.withLock { shared -> S3AbortReason? in
                    if shared.isShuttingDown { return .shutdown }
                    if shared.pendingCount >= queuedMax { return .queueFull(limit: queuedMax) }
                    shared.pending.append(request)
                    return nil
                }
                if let refusal {
                    request.result.abort = refusal
                    request.finish()
                } else {
                    wake()
                }
            }
        } onCancel: {
            request.cancelled.store(true, ordering: .relaxed)
            wake()
        }
    }

    /// Stops the loop: queued and in-flight requests complete with `.shutdown`, connections are closed, the thread
    /// is joined. Idempotent. Must not be called from the loop thread (it never is: callbacks do not call out).
    func shutdown() {
        shared.withLock { $0.isShuttingDown = true }
        wake()
        let handle = thread.withLock { handle -> pthread_t? in
            defer { handle = nil }
            return handle
        }
        if let handle { pthread_join(handle, nil) }
    }

    private func wake() {
        var byte: UInt8 = 1
        _ = Glibc.write(wakeWriteFD, &byte, 1)  // EAGAIN means a wake-up is already pending
    }

    private func drainWakePipe() {
        var buffer = [UInt8](repeating: 0, count: 64)
        while Glibc.read(wakeReadFD, &buffer, buffer.count) > 0 {}
    }

    // MARK: the loop (loop thread only)

    private func run() {
        var slots = [Slot](repeating: Slot(), count: inFlightMax)
        while true {
            let freeCount = slots.reduce(0) { $0 + ($1.request == nil ? 1 : 0) }
            let (admitted, stopping) = shared.withLock { shared -> ([S3Request], Bool) in
                if shared.isShuttingDown {
                    let rest = Array(shared.pending[shared.pendingHead...])
                    shared.pending = []
                    shared.pendingHead = 0
                    return (rest, true)
                }
                let take = min(freeCount, shared.pendingCount)
                let taken = Array(shared.pending[shared.pendingHead..<(shared.pendingHead + take)])
                shared.pendingHead += take
                if shared.pendingHead > 1024 && shared.pendingHead * 2 > shared.pending.count {
                    shared.pending.removeFirst(shared.pendingHead)
                    shared.pendingHead = 0
                }
                return (taken, false)
            }
            if stopping {
                for request in admitted {
                    request.result.abort = .shutdown
                    request.finish()
                }
                for index in slots.indices {
                    if let request = slots[index].request { request.result.abort = .shutdown }
                    if let context = slots[index].context { S3_destroy_request_context(context) }
                    slots[index].request?.finish()
                    slots[index] = Slot()
                }
                return
            }
            var next = 0
            for request in admitted {
                while slots[next].request != nil { next += 1 }
                start(request, in: &slots[next])
            }
            waitForSockets(slots)
            for index in slots.indices where slots[index].request != nil {
                run(&slots[index])
            }
            enforceTimeouts(&slots)
        }
    }

    private func waitForSockets(_ slots: [Slot]) {
        var readSet = fd_set()
        var writeSet = fd_set()
        var exceptSet = fd_set()
        FDSet.insert(wakeReadFD, into: &readSet)
        var maxFD = wakeReadFD
        var waitMilliseconds: Int64 = 100
        let now = monotonicNanoseconds()
        for slot in slots {
            guard let context = slot.context, let request = slot.request else { continue }
            var slotMax: Int32 = -1
            if S3_get_request_context_fdsets(context, &readSet, &writeSet, &exceptSet, &slotMax) != S3StatusOK {
                waitMilliseconds = 0
            }
            if slotMax < 0 {
                // Not connected yet, or a descriptor beyond FD_SETSIZE that curl cannot report: poll briskly.
                waitMilliseconds = min(waitMilliseconds, 1)
            } else {
                maxFD = max(maxFD, slotMax)
            }
            let curlTimeout = S3_get_request_context_timeout(context)
            if curlTimeout >= 0 { waitMilliseconds = min(waitMilliseconds, curlTimeout) }
            let deadline = min(
                request.startNanoseconds + request.timeoutNanoseconds,
                request.lastProgressNanoseconds + request.stallTimeoutNanoseconds)
            let untilDeadline = deadline > now ? Int64((deadline - now) / 1_000_000) + 1 : 0
            waitMilliseconds = min(waitMilliseconds, untilDeadline)
        }
        var interval = timeval(tv_sec: Int(waitMilliseconds / 1000), tv_usec: Int((waitMilliseconds % 1000) * 1000))
        let ready = select(maxFD + 1, &readSet, &writeSet, &exceptSet, &interval)
        if ready > 0 && FDSet.contains(wakeReadFD, readSet) { drainWakePipe() }
    }

    private func run(_ slot: inout Slot) {
        guard let context = slot.context, let request = slot.request else { return }
        var remaining: Int32 = 0
        let status = S3_runonce_request_context(context, &remaining)
        if status != S3StatusOK && !request.isFinished {
            // The context is broken (curl multi error): abandon it; its request completes as interrupted.
            request.result.errorMessage = "libs3 request context failed: \(String(cString: S3_get_status_name(status)))"
            S3_destroy_request_context(context)
            slot.context = nil
            request.finish()
        }
        if request.isFinished { slot.request = nil }
    }

    private func enforceTimeouts(_ slots: inout [Slot]) {
        let now = monotonicNanoseconds()
        for index in slots.indices {
            guard let request = slots[index].request, let context = slots[index].context else { continue }
            let reason: S3AbortReason?
            if request.cancelled.load(ordering: .relaxed) {
                reason = .cancelled
            } else if now >= request.startNanoseconds + request.timeoutNanoseconds {
                reason = .timedOut(seconds: Double(request.timeoutNanoseconds) / 1e9)
            } else if now >= request.lastProgressNanoseconds + request.stallTimeoutNanoseconds {
                reason = .stalled(seconds: Double(request.stallTimeoutNanoseconds) / 1e9)
            } else {
                reason = nil
            }
            guard let reason else { continue }
            request.result.abort = reason
            // Destroying the context closes the connection and completes the request (status Interrupted).
            S3_destroy_request_context(context)
            request.finish()
            slots[index] = Slot()
        }
    }

    private func start(_ request: S3Request, in slot: inout Slot) {
        if slot.context == nil {
            var context: OpaquePointer?
            let status = S3_create_request_context(&context)
            guard status == S3StatusOK, let context else {
                request.result.status = status.rawValue
                request.result.statusName = String(cString: S3_get_status_name(status))
                request.finish()
                return
            }
            slot.context = context
        }
        request.startNanoseconds = monotonicNanoseconds()
        request.lastProgressNanoseconds = request.startNanoseconds
        slot.request = request
        let callbackData = Unmanaged.passRetained(request).toOpaque()
        S3Calls.submit(request, target: target, context: slot.context!, callbackData: callbackData)
        // libs3 may have completed the request synchronously (a request it could not even build).
        if request.isFinished { slot.request = nil }
    }
}

/// fd_set manipulation (the FD_* macros are not imported into Swift).
enum FDSet {
    static func insert(_ fd: Int32, into set: inout fd_set) {
        precondition(fd >= 0 && fd < FD_SETSIZE, "descriptor \(fd) does not fit in an fd_set")
        withUnsafeMutableBytes(of: &set) { raw in
            let words = raw.bindMemory(to: Int.self)
            words[Int(fd) / Int.bitWidth] |= 1 << (Int(fd) % Int.bitWidth)
        }
    }

    static func contains(_ fd: Int32, _ set: fd_set) -> Bool {
        var copy = set
        return withUnsafeMutableBytes(of: &copy) { raw in
            let words = raw.bindMemory(to: Int.self)
            return words[Int(fd) / Int.bitWidth] & (1 << (Int(fd) % Int.bitWidth)) != 0
        }
    }
}
