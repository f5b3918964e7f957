// The real environment of `vd serve`, `vd scrub` and the offline CLI: the POSIX file system, RocksDB maps, the
// system clocks and random generator, unstructured tasks, and blocking file work on an NIO thread pool.

package import FlashIO
package import NIOPosix
import RocksKV
package import VolumeCore

/// Background tasks as unstructured Tasks; blocking work on a thread pool; failpoints from VD_FAILPOINT.
package struct PoolTaskRunner: TaskRunner {
    package let pool: NIOThreadPool
    package init(pool: NIOThreadPool) { self.pool = pool }

    @discardableResult
    package func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        Task { await body() }
    }

    package func blocking<T: Sendable>(_ body: @escaping @Sendable () throws(VDError) -> T) async throws(VDError) -> T {
        let result: Result<T, VDError>
        do {
            result = try await pool.runIfActive { () -> Result<T, VDError> in
                do throws(VDError) { return .success(try body()) } catch { return .failure(error) }
            }
        } catch {
            throw VDError(.shutdown, "the I/O thread pool is shut down")
        }
        return try result.get()
    }

    package func failpoint(_ name: String) { Failpoint.hit(name) }

    package func invariantFailed(_ message: String) { fatalError("invariant violated: \(message)") }
}

extension Environment {
    /// The real world, with blocking work on `pool` (which the caller starts and shuts down).
    package static func live(pool: NIOThreadPool) -> Environment {
        Environment(
            fs: PosixFileSystem(), clock: SystemClock(), random: SystemRandom(), tasks: PoolTaskRunner(pool: pool),
            keyValueStores: RocksStoreFactory())
    }
}
