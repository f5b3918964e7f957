// The scrub lease of a volume: an object (NAME/scrub.lease) naming the scrubber that holds it and until when.
// Object stores here offer no conditional write, so taking it is write, wait, read back: of two scrubbers that write
// within the wait, only the one whose token is still there after its wait goes on (the later writer); the other
// backs off. A lease that expired, or whose holder ran on this host and is gone (killed), can be taken; a live one is
// refused naming its holder.

package import FlashIO
package import Foundation
package import ObjectStore
package import VolumeCore

package struct LeaseRecord: Codable, Sendable {
    package var token: String
    package var holder: String
    package var expiresAt: Date
    /// The holder's process and host: a lease held by a process of this host that no longer exists is stale.
    package var pid: Int32?
    package var host: String?

    /// The holder is known to be gone (it ran on this host and its process is not there any more).
    var holderIsGone: Bool {
        guard let pid, let host, host == ScrubLease.hostName else { return false }
        return kill(pid, 0) != 0 && errno == ESRCH
    }
}

package final class ScrubLease: @unchecked Sendable {
    private let layout: VolumeLayout
    private let seconds: Double
    private let token: String
    private var expiresAt: Date
    private let clock: any VDClock
    /// How long to wait between writing the lease and checking it is still ours.
    static let settleSeconds: Double = 1.5

    private init(layout: VolumeLayout, seconds: Double, token: String, expiresAt: Date, clock: any VDClock) {
        self.layout = layout
        self.seconds = seconds
        self.token = token
        self.expiresAt = expiresAt
        self.clock = clock
    }

    /// The lease record, or nil when there is none. A record that does not verify (after a few reads: bytes can be
    /// damaged on the way) is an error, never "no lease": taking a lease someone holds lets two scrubbers run.
    package static func read(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) -> LeaseRecord? {
        do {
            return try await NamespaceObjects.getVerified(layout.scrubLeaseObject, backend: backend) {
                (bytes) throws(VDError) in
                try MetadataRecord.decode(LeaseRecord.self, from: bytes, kind: .lease, what: layout.scrubLeaseObject)
            }
        } catch  where error.code == .notFound {
            return nil
        } catch  where error.code == .corrupt {
            throw VDError(
                .busy,
                "the scrub lease \(layout.scrubLeaseObject) does not verify (\(error.message)); if no scrub of \(layout.namespace) runs, delete that object"
            )
        }
    }

    package static func acquire(
        layout: VolumeLayout, backend: any ObjectStore, seconds: Double, env: Environment
    )
        async throws(VDError) -> ScrubLease
    {
        let clock = env.clock
        if let current = try await read(layout: layout, backend: backend), current.expiresAt > clock.wallNow(),
            !current.holderIsGone
        {
            throw busy(current, layout: layout)
        }
        let token = env.random.hexToken() + env.random.hexToken()
        let record = LeaseRecord(
            token: token, holder: holderDescription(), expiresAt: clock.wallNow().addingTimeInterval(seconds),
            pid: getpid(), host: hostName)
        try await backend.replace(layout.scrubLeaseObject, data: try MetadataRecord.encode(record, kind: .lease))
        await clock.sleep(for: .seconds(double: settleSeconds))
        guard let check = try await read(layout: layout, backend: backend), check.token == token else {
            let other = try await read(layout: layout, backend: backend)
            throw other.map { busy($0, layout: layout) }
                ?? VDError(.busy, "another scrubber took the scrub lease of \(layout.namespace) at the same time")
        }
        return ScrubLease(layout: layout, seconds: seconds, token: token, expiresAt: record.expiresAt, clock: clock)
    }

    private static func busy(_ record: LeaseRecord, layout: VolumeLayout) -> VDError {
        VDError(
            .busy,
            "volume \(layout.namespace) is being scrubbed by \(record.holder) (lease until \(ISO8601DateFormatter().string(from: record.expiresAt))); try again later"
        )
    }

    static let hostName: String = {
        var host = [UInt8](repeating: 0, count: 256)
        _ = host.withUnsafeMutableBufferPointer {
            gethostname(UnsafeMutableRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self), 255)
        }
        return String(decoding: host.prefix { $0 != 0 }, as: UTF8.self)
    }()

    static func holderDescription() -> String { "vd scrub (pid \(getpid()) on \(hostName))" }

    /// Extends the lease when less than half of it is left.
    package func renewIfNeeded(backend: any ObjectStore) async throws(VDError) {
        guard expiresAt.timeIntervalSince(clock.wallNow()) < seconds / 2 else { return }
        guard let current = try await Self.read(layout: layout, backend: backend), current.token == token else {
            throw VDError(.busy, "the scrub lease of \(layout.namespace) was taken over; stopping")
        }
        var renewed = current
        renewed.expiresAt = clock.wallNow().addingTimeInterval(seconds)
        try await backend.replace(layout.scrubLeaseObject, data: try MetadataRecord.encode(renewed, kind: .lease))
        expiresAt = renewed.expiresAt
    }

    /// Throws `.busy` unless the lease is still this scrubber's, renewing it.
    package func verifyHeld(backend: any ObjectStore) async throws(VDError) {
        guard let current = try await Self.read(layout: layout, backend: backend), current.token == token,
            current.expiresAt > clock.wallNow()
        else {
            throw VDError(.busy, "the scrub lease of \(layout.namespace) expired or was taken over; stopping")
        }
        var renewed = current
        renewed.expiresAt = clock.wallNow().addingTimeInterval(seconds)
        try await backend.replace(layout.scrubLeaseObject, data: try MetadataRecord.encode(renewed, kind: .lease))
        expiresAt = renewed.expiresAt
    }

    package func release(backend: any ObjectStore) async {
        if let current = try? await Self.read(layout: layout, backend: backend), current.token == token {
            try? await backend.delete(layout.scrubLeaseObject)
        }
    }
}
