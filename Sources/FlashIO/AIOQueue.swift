// Asynchronous O_DIRECT reads on the local flash through Linux AIO (libaio). A read is submitted with io_submit from
// the caller's thread and completed by one reaper thread (io_getevents), which resumes the waiting task: a cache miss
// on flash never blocks a Swift concurrency thread, and the page cache is bypassed (the guest caches what it reads;
// our memory goes to the map).
//
// Bounds: at most `depth` requests are in the kernel; more wait in a FIFO and are submitted as completions arrive.
// Faults: a failed or short read resumes its caller with a VDError naming the file and offset.

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif
import CLibAIO
package import NIOCore
import Synchronization
package import VolumeCore

package final class AIOQueue: @unchecked Sendable {
    /// Memory alignment, offset and length granularity required by O_DIRECT here.
    package static let alignmentBytes = 4096

    private final class Request: @unchecked Sendable {
        let iocb: UnsafeMutablePointer<iocb>
        let buffer: UnsafeMutableRawPointer
        let length: Int
        let path: String
        let offset: UInt64
        let continuation: CheckedContinuation<ByteBuffer, any Error>

        init(fd: Int32, path: String, offset: UInt64, length: Int, continuation: CheckedContinuation<ByteBuffer, any Error>) {
            self.length = length
            self.path = path
            self.offset = offset
            self.continuation = continuation
            var raw: UnsafeMutableRawPointer?
            let rounded = (length + AIOQueue.alignmentBytes - 1) / AIOQueue.alignmentBytes * AIOQueue.alignmentBytes
            precondition(posix_memalign(&raw, AIOQueue.alignmentBytes, rounded) == 0, "out of memory")
            buffer = raw!
            iocb = UnsafeMutablePointer<iocb>.allocate(capacity: 1)
            iocb.initialize(to: CLibAIO.iocb())
            io_prep_pread(iocb, fd, buffer, rounded, Int64(offset))
        }

        deinit {
            free(buffer)
            iocb.deinitialize(count: 1)
            iocb.deallocate()
        }
    }

    private struct State {
        var inKernel = 0
        var waiting: [Request] = []
        var closed = false
    }

    private let context: io_context_t
    private let depth: Int
    private let state = Mutex(State())
    private var reaper: pthread_t?

    package init(depth: Int = 128) throws(VDError) {
        var ctx: io_context_t?
        let rc = io_setup(Int32(depth), &ctx)
        guard rc == 0, let ctx else {
            throw VDError(.io, "cannot set up Linux AIO (io_setup: \(String(cString: strerror(-rc))))", errno: -rc)
        }
        context = ctx
        self.depth = depth
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let created = pthread_create(
            &thread, nil,
            { raw in
                let queue = Unmanaged<AIOQueue>.fromOpaque(raw!).takeRetainedValue()
                queue.reap()
                return nil
            }, box.toOpaque())
        precondition(created == 0, "cannot start the AIO reaper thread")
        reaper = thread
    }

    /// Stops the reaper after in-flight requests complete; later reads fail with `.shutdown`.
    package func close() {
        let wasClosed = state.withLock { state -> Bool in
            defer { state.closed = true }
            return state.closed
        }
        guard !wasClosed, let reaper else { return }
        pthread_join(reaper, nil)
        io_destroy(context)
    }

    /// Reads `length` bytes at `offset` of `file` (opened with `.direct`); offset and length must be multiples of
    /// `alignmentBytes`. A short read (past end of file) is `.corrupt`.
    package func read(_ file: FlashFile, offset: UInt64, length: Int) async throws(VDError) -> ByteBuffer {
        precondition(offset % UInt64(Self.alignmentBytes) == 0 && length % Self.alignmentBytes == 0, "unaligned O_DIRECT read")
        let fd = file.fd
        let path = file.path
        do {
            return try await withCheckedThrowingContinuation { continuation in
                let request = Request(fd: fd, path: path, offset: offset, length: length, continuation: continuation)
                let submitNow = state.withLock { state -> Bool in
                    if state.closed { return false }
                    if state.inKernel < depth {
                        state.inKernel += 1
                        return true
                    }
                    state.waiting.append(request)
                    return false
                }
                if submitNow {
                    submit(request)
                } else if state.withLock({ $0.closed }) {
                    continuation.resume(throwing: VDError(.shutdown, "flash I/O queue is closed"))
                }
            }
        } catch let error as VDError {
            throw error
        } catch {
            throw VDError(.io, "\(error)")
        }
    }

    private func submit(_ request: Request) {
        request.iocb.pointee.data = Unmanaged.passRetained(request).toOpaque()
        var list: UnsafeMutablePointer<iocb>? = request.iocb
        while true {
            let rc = io_submit(context, 1, &list)
            if rc == 1 { return }
            if rc == -EINTR || rc == -EAGAIN {
                sched_yield()
                continue
            }
            Unmanaged<Request>.fromOpaque(request.iocb.pointee.data).release()
            state.withLock { $0.inKernel -= 1 }
            request.continuation.resume(
                throwing: VDError(
                    .io, "read \(request.path) at \(request.offset): io_submit failed: \(String(cString: strerror(-rc)))",
                    errno: -rc))
            return
        }
    }

    private func reap() {
        let batch = 64
        let events = UnsafeMutablePointer<io_event>.allocate(capacity: batch)
        defer { events.deallocate() }
        var timeout = timespec(tv_sec: 0, tv_nsec: 50_000_000)
        while true {
            let (closed, busy) = state.withLock { ($0.closed, $0.inKernel > 0 || !$0.waiting.isEmpty) }
            if closed && !busy { break }
            let n = io_getevents(context, 1, Int(batch), events, &timeout)
            if n < 0 { continue }
            for i in 0..<Int(n) {
                let event = events[i]
                let request = Unmanaged<Request>.fromOpaque(event.data!).takeRetainedValue()
                let result = Int(bitPattern: UInt(event.res))
                if result < 0 {
                    request.continuation.resume(
                        throwing: VDError(
                            .io, "read \(request.path) at \(request.offset): \(String(cString: strerror(Int32(-result))))",
                            errno: Int32(-result)))
                } else if result < request.length {
                    request.continuation.resume(
                        throwing: VDError(
                            .corrupt, "read \(request.path) at \(request.offset): file ends after \(result) of \(request.length) bytes"))
                } else {
                    let bytes = ByteBuffer(bytes: UnsafeRawBufferPointer(start: request.buffer, count: request.length))
                    request.continuation.resume(returning: bytes)
                }
            }
            // Move waiting requests into the kernel as slots free up.
            let next = state.withLock { state -> [Request] in
                state.inKernel -= Int(n)
                let room = min(depth - state.inKernel, state.waiting.count)
                guard room > 0 else { return [] }
                let taken = Array(state.waiting.prefix(room))
                state.waiting.removeFirst(room)
                state.inKernel += room
                return taken
            }
            for request in next { submit(request) }
        }
    }
}
