// Serving a volume under an owner lease (when routers share the backend, `[cluster] node`): the lease is renewed in
// the background every third of its period; reads, writes and flushes are refused (`.shutdown`: ESHUTDOWN over NBD)
// once it ran out by this process's clock or another router took the volume, and are never acknowledged after that
// (checked again before the reply). The other volumes of the router are not affected. A clean, fully drained close
// releases the volume so the next router takes it without waiting.

import Foundation
import ObjectStore
package import VolumeCore

extension Volume {
    /// The lease this router serves the volume under (nil: no ownership in use).
    package var ownerLease: OwnerLease? { ownership.withLock { $0 } }

    /// Set before any background work starts (Volume.open); the Router renews the lease from when it took it.
    func serve(under lease: OwnerLease) {
        ownership.withLock { $0 = lease }
    }

    /// Throws unless this router may acknowledge I/O on the volume now.
    func checkOwnership() throws(VDError) {
        guard let lease = ownership.withLock({ $0 }) else { return }
        if lease.isValid(at: env.clock.now()) { return }
        if let fenced = lease.fenced { throw VDError(.shutdown, "volume \(name): \(fenced.message)") }
        throw VDError(
            .shutdown,
            "volume \(name): this router's ownership lease ran out (no renewal reached the backend for \(Int(lease.leaseSeconds)) s); I/O is refused until one does"
        )
    }

    /// Throws unless the owner record on the backend, read now, is still this router's (before deleting objects
    /// a later owner's history could need). Without ownership in use: nothing to check.
    package func confirmOwnershipOnBackend() async throws(VDError) {
        guard let lease = ownership.withLock({ $0 }) else { return }
        do {
            try await lease.confirmOnBackend()
        } catch {
            throw VDError(error.code == .busy ? .shutdown : error.code, "volume \(name): \(error.message)")
        }
    }

    /// After a clean close that left everything on the backend: the next router takes the volume without waiting.
    func releaseOwnership(to node: String?) async -> Bool {
        guard let lease = ownership.withLock({ $0 }), lease.fenced == nil else { return false }
        do {
            try await lease.release(to: node)
            logger.info("volume \(name): released (everything is on the backend)")
            return true
        } catch {
            logger.warning("volume \(name): could not release its owner record: \(error.message)")
            return false
        }
    }
}
