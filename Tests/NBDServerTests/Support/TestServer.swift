// Starting an NBDServer over MemoryBlockDevices on a Unix socket in a fresh temporary directory, and test devices
// that are slow or fail on demand.

import Foundation
import Logging
import NBDServer
import NIOCore
import NIOPosix
import Synchronization
import Testing
import VolumeCore
import VolumeTesting

let testLogger: Logger = {
    var logger = Logger(label: "nbd-test", factory: { _ in SwiftLogNoOpLogHandler() })
    if ProcessInfo.processInfo.environment["NBD_TEST_LOG"] != nil {
        logger = Logger(label: "nbd-test")
        logger.logLevel = .debug
    }
    return logger
}()

/// A fresh directory under /tmp (short paths: Unix socket paths are limited to 107 bytes).
func makeTemporaryDirectory() throws -> String {
    var template = Array("/tmp/nbdt.XXXXXX".utf8CString)
    let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    guard result != nil else { throw WireError("mkdtemp failed: errno \(errno)") }
    return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

final class TestServer: Sendable {
    let server: NBDServer
    let directory: String
    let socketPath: String
    let device: MemoryBlockDevice

    private init(server: NBDServer, directory: String, socketPath: String, device: MemoryBlockDevice) {
        self.server = server
        self.directory = directory
        self.socketPath = socketPath
        self.device = device
    }

    /// Serves `disk` (a MemoryBlockDevice of `size` bytes, also the default export), `ro` (the same device,
    /// read-only) and any `extraExports`.
    static func start(
        size: UInt64 = 64 << 20, extraExports: [NBDExport] = [],
        configure: (inout NBDServerConfiguration) -> Void = { _ in }
    ) async throws -> TestServer {
        let directory = try makeTemporaryDirectory()
        let socketPath = directory + "/nbd.sock"
        let device = MemoryBlockDevice(sizeBytes: size)
        let exports = NBDStaticExportProvider(
            [
                NBDExport(name: "disk", description: "memory disk", device: device),
                NBDExport(name: "ro", description: "read-only view", device: device, readOnly: true),
            ] + extraExports, defaultExportName: "disk")
        var configuration = NBDServerConfiguration(unixSocketPath: socketPath)
        configure(&configuration)
        let server = NBDServer(
            configuration: configuration, exports: exports, eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
            logger: testLogger)
        try await server.start()
        return TestServer(server: server, directory: directory, socketPath: socketPath, device: device)
    }

    func uri(_ export: String = "disk") -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }

    func stop() async {
        await server.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Waits until the server has no connections at all (they closed and their device commands finished).
    func waitForNoConnections(timeout: Duration = .seconds(5)) async throws {
        let deadline = ContinuousClock.now + timeout
        while server.connectionCount > 0 {
            guard ContinuousClock.now < deadline else {
                throw WireError("\(server.connectionCount) connections still open after \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }
}

/// Runs `body` with a started server and always stops it.
func withTestServer<T>(
    size: UInt64 = 64 << 20, extraExports: [NBDExport] = [],
    configure: (inout NBDServerConfiguration) -> Void = { _ in },
    _ body: (TestServer) async throws -> T
) async throws -> T {
    let server = try await TestServer.start(size: size, extraExports: extraExports, configure: configure)
    do {
        let result = try await body(server)
        await server.stop()
        return result
    } catch {
        await server.stop()
        throw error
    }
}

/// A device that holds operations back until released, to make replies complete out of order or while clients
/// vanish. Operations at offsets in `slowOffsets` wait for `release()`.
final class GatedDevice: BlockDevice {
    let inner: MemoryBlockDevice
    let slowOffsets: Set<UInt64>
    private let state = Mutex<
        (released: Bool, waiting: [CheckedContinuation<Void, Never>], started: Int, finished: Int)
    >(
        (false, [], 0, 0))

    init(inner: MemoryBlockDevice, slowOffsets: Set<UInt64>) {
        self.inner = inner
        self.slowOffsets = slowOffsets
    }

    var info: BlockDeviceInfo { inner.info }
    var startedSlowOperations: Int { state.withLock { $0.started } }
    var finishedSlowOperations: Int { state.withLock { $0.finished } }

    func release() {
        let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.released = true
            defer { state.waiting = [] }
            return state.waiting
        }
        for continuation in waiting { continuation.resume() }
    }

    private func gate(_ offset: UInt64) async {
        guard slowOffsets.contains(offset) else { return }
        await withCheckedContinuation { continuation in
            let resumeNow = state.withLock { state -> Bool in
                state.started += 1
                if state.released { return true }
                state.waiting.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
        state.withLock { $0.finished += 1 }
    }

    func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
        await gate(offset)
        return try await inner.read(offset: offset, length: length)
    }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {
        await gate(offset)
        try await inner.write(offset: offset, data: data, fua: fua)
    }
    func flush() async throws(VDError) { try await inner.flush() }
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError) {
        try await inner.trim(offset: offset, length: length, fua: fua)
    }
    func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {
        try await inner.writeZeroes(offset: offset, length: length, fua: fua, mayUnmap: mayUnmap)
    }
    func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] {
        try await inner.allocation(offset: offset, length: length)
    }
}

/// Leaves a Unix socket file at `path` that nobody listens on, as a crashed server would.
func makeStaleSocketFile(_ path: String) throws {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw WireError("socket failed: errno \(errno)") }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard result == 0 else { throw WireError("bind failed: errno \(errno)") }
}
