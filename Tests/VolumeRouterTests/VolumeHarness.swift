import FlashIO
import Foundation
import Logging
import NIOCore
import NIOPosix
import ObjectStore
import SCOCache
import VolumeCore
@testable import VolumeRouter

/// A volume on a temporary flash directory with an in-memory (or given) backend, reopenable like a restart.
final class VolumeHarness: @unchecked Sendable {
    let root: String
    let backend: any ObjectStore
    let pool: NIOThreadPool
    let env: Environment
    let config: VolumeConfig
    var options: VolumeOptions
    var cacheCapacityBytes: UInt64
    let directIO: Bool
    var aio: AIOQueue?
    var cache: FlashCache!
    var volume: Volume!

    var layout: VolumeLayout { VolumeLayout(flashDirectory: root + "/flash", namespace: config.name.rawValue) }

    init(
        sizeBytes: UInt64 = 64 << 20, scoSizeBytes: UInt64 = 1 << 20, backend: any ObjectStore = MemoryStore(),
        cacheCapacityBytes: UInt64 = 1 << 30, directIO: Bool = false, configure: (inout VolumeOptions) -> Void = { _ in }
    ) async throws {
        root = NSTemporaryDirectory() + "vd-test-" + UUID().uuidString
        try Syscall.makeDirectories(root)
        self.backend = backend
        pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        env = .live(pool: pool)
        config = VolumeConfig(name: try VolumeName(validating: "vol1"), sizeBytes: sizeBytes)
        var options = VolumeOptions()
        options.scoSizeBytes = scoSizeBytes
        options.uploadPendingBytesMax = max(2 * scoSizeBytes, 64 << 20)
        options.uploadRetryDelaySeconds = 0.01
        options.uploadRetryDelaySecondsMax = 0.05
        configure(&options)
        self.options = options
        self.cacheCapacityBytes = cacheCapacityBytes
        self.directIO = directIO
        // What `vd volume create` writes: the configuration object in the namespace.
        try await backend.put(
            VolumeLayout(flashDirectory: "", namespace: "vol1").configObject,
            data: try MetadataRecord.encode(config, kind: .volumeConfig))
        try await open()
    }

    func open() async throws {
        if directIO { aio = try AIOQueue() }
        cache = FlashCache(capacityBytes: cacheCapacityBytes, aio: aio, logger: Logger(label: "test"))
        volume = try await Volume.open(
            config: config, layout: layout, options: options, backend: backend, cache: cache, env: env,
            logger: Logger(label: "test"))
    }

    /// A clean stop and start.
    func restart(drain: Bool = false) async throws {
        _ = await volume.close(drainTimeoutSeconds: drain ? 30 : nil)
        aio?.close()
        try await open()
    }

    /// Waits until every SCO rolled so far (all but the open journal) is on the backend with its TLog.
    func waitUntilStored(timeoutSeconds: Double = 120) async throws {
        let target = SCONumber(volume.journal.openEpoch - 1)
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if volume.uploadStatus.storedThrough >= target { return }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw VDError(.timeout, "uploads did not reach \(target.hex): \(volume.uploadStatus)")
    }

    func shutdown() async {
        _ = await volume?.close()
        aio?.close()
        try? await pool.shutdownGracefully()
        try? Syscall.removeTree(root)
    }
}

/// Deterministic pseudo-random bytes.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func pattern(_ count: Int, seed: UInt64) -> ByteBuffer {
    var generator = SeededGenerator(seed: seed)
    var bytes = [UInt8](repeating: 0, count: count)
    for i in 0..<count { bytes[i] = UInt8(truncatingIfNeeded: generator.next()) }
    return ByteBuffer(bytes: bytes)
}
