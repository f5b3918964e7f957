import DTL
import FlashIO
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing
import VolumeCore

@testable import VolumeRouter

/// The rule behind every reply without the peer: the degraded state is on the backend first (else a taker trusts an
/// `in_sync` record and fetches a peer copy that lacks the reply). Here a mirror against an in-process peer that
/// answers at once, a backend that can refuse the DTL record, and an owner lease that can run out and be renewed.
@Suite(.serialized) struct DTLRecordingTests {
    /// A peer link that answers every append (`received`) and sync (`synced`), off the caller's thread (the mirror
    /// posts under its lock). It counts frames posted before anyone listened: over TCP an answer to one of them can
    /// arrive first, and a listener attached after that is a crash (`DTLInbox.listen`).
    final class AnsweringLink: DTLConnection, @unchecked Sendable {
        let volumeID: VolumeID
        let generation: UInt64 = 1
        let inbox = DTLInbox()
        private let appends = Mutex<UInt64>(0)
        let listening = Atomic<Bool>(false)
        let postedBeforeListening = Atomic<Int>(0)

        init(volumeID: VolumeID) { self.volumeID = volumeID }

        func post(_ frame: DTLFrame) {
            if !listening.load(ordering: .relaxed) { postedBeforeListening.add(1, ordering: .relaxed) }
            let answer: DTLFrame
            switch frame.kind {
            case .append:
                answer = self.frame(
                    .received,
                    value: appends.withLock {
                        $0 += 1; return $0
                    })
            case .sync: answer = self.frame(.synced, value: frame.value)
            default: return
            }
            let inbox = self.inbox
            Task { inbox.deliver(.success(answer)) }
        }

        func nextFrame() async throws(VDError) -> DTLFrame { try await inbox.next().get() }
        func listen(_ handler: @escaping @Sendable (Result<DTLFrame, VDError>) -> Void) {
            listening.store(true, ordering: .relaxed)
            inbox.listen(handler)
        }
        func close() async { inbox.deliver(.failure(VDError(.io, "closed"))) }
        /// The network between owner and peer fails.
        func cut() { inbox.deliver(.failure(VDError(.io, "the link was cut"))) }
    }

    /// The backend and the lease as the mirror sees them, and what happened: "connect" for each connection to the
    /// peer, and each DTL record's state as it reached the backend.
    final class World: Sendable {
        let backendDown = Atomic<Bool>(false)
        let leaseValid = Atomic<Bool>(true)
        let events = Mutex<[String]>([])
        let links = Mutex<[AnsweringLink]>([])
    }

    /// A mirror with its links, its DTL records as written, and switches for the backend and the lease.
    final class Rig: Sendable {
        let pool = NIOThreadPool(numberOfThreads: 1)
        let root = NSTemporaryDirectory() + "vd-dtlrec-" + UUID().uuidString
        let world = World()
        let recorder: DTLRecorder
        let mirror: DTLMirror

        init() throws {
            pool.start()
            let env = Environment.live(pool: pool)
            let logger = Logger(label: "dtl-recording")
            let (world, volumeID) = (self.world, VolumeID(high: 7, low: 9))
            recorder = DTLRecorder(env: env, logger: logger, mayWrite: { world.leaseValid.load(ordering: .relaxed) }) {
                (record) throws(VDError) in
                if world.backendDown.load(ordering: .relaxed) { throw VDError(.backend, "503 Slow Down") }
                world.events.withLock { $0.append(record.state.rawValue) }
            }
            var network = DTLNetwork { (_, _, _) throws(VDError) -> any DTLConnection in
                let link = AnsweringLink(volumeID: volumeID)
                world.events.withLock { $0.append("connect") }
                world.links.withLock { $0.append(link) }
                return link
            }
            network.timeoutSeconds = 2
            network.retrySeconds = 0.05
            mirror = DTLMirror(
                mode: .sync, peer: "p", volumeID: volumeID, volumeName: try VolumeName(validating: "vol1"),
                generation: 1, clusterSizeBytes: 4096,
                layout: VolumeLayout(flashDirectory: root, namespace: "vol1"), network: network, env: env,
                logger: logger, storedThrough: 0, recorder: recorder,
                makeRecord: { state in
                    DTLRecord(
                        mode: .sync, peer: "p", state: state, generation: 1, changedAt: Date(), storedThrough: 0)
                },
                mayServe: { world.leaseValid.load(ordering: .relaxed) })
        }

        var backendDown: Bool {
            get { world.backendDown.load(ordering: .relaxed) }
            set { world.backendDown.store(newValue, ordering: .relaxed) }
        }
        var leaseValid: Bool {
            get { world.leaseValid.load(ordering: .relaxed) }
            set { world.leaseValid.store(newValue, ordering: .relaxed) }
        }
        /// The network to the peer fails.
        func cutLink() { world.links.withLock { $0.last! }.cut() }

        /// Frames posted on a link before the mirror listened to it (must be none).
        var postedBeforeListening: Int {
            world.links.withLock { $0.reduce(0) { $0 + $1.postedBeforeListening.load(ordering: .relaxed) } }
        }

        var recorded: [String] { world.events.withLock { $0 } }

        func inSync() async throws {
            try await DTLMirrorTests.waitFor("in sync, recorded") {
                mirror.status.state == .inSync && recorded.last == "in_sync"
            }
        }

        func shutdown() async {
            await mirror.stop()
            try? await pool.shutdownGracefully()
        }
    }

    /// Whether `task` is still running after `seconds`.
    static func stillWaiting(_ task: Task<Void, Never>, seconds: Double) async -> Bool {
        let finished = Atomic<Bool>(false)
        Task {
            await task.value
            finished.store(true, ordering: .relaxed)
        }
        try? await Task.sleep(for: .seconds(seconds))
        return !finished.load(ordering: .relaxed)
    }

    @Test func aDegradationTheLeaseKeptOffTheBackendIsRecordedBeforeWritesOrACatchUpResume() async throws {
        let rig = try Rig()
        rig.mirror.start()
        try await rig.inSync()
        #expect(rig.recorded == ["connect", "in_sync"])

        // The owner is cut off from both: the peer link fails and the backend refuses the degraded record.
        rig.backendDown = true
        rig.cutLink()
        let mirror = rig.mirror
        let held = Task { await mirror.waitForWrites(nil) }
        #expect(await Self.stillWaiting(held, seconds: 0.3), "a write is replied before the degradation is recorded")
        // The lease runs out: the held write is let go, and fails.
        rig.leaseValid = false
        await held.value
        #expect(throws: VDError.self) { try mirror.checkRecorded() }

        // The lease is renewed (nobody took the volume over) while the backend still refuses the record: writes
        // wait, and no catch-up starts (it would reset the peer a taker trusts while the backend says in sync).
        rig.leaseValid = true
        let after = Task { await mirror.waitForWrites(nil) }
        #expect(await Self.stillWaiting(after, seconds: 0.5), "a write is replied while the backend says in sync")
        #expect(rig.recorded == ["connect", "in_sync"])
        #expect(throws: VDError.self) { try mirror.checkRecorded() }

        // The backend returns: first the degraded record, then the write goes on (degraded), then the catch-up.
        rig.backendDown = false
        await after.value
        #expect(rig.recorded.prefix(3) == ["connect", "in_sync", "degraded"])
        try await rig.inSync()
        try mirror.checkRecorded()
        #expect(rig.recorded == ["connect", "in_sync", "degraded", "connect", "in_sync"])
        #expect(rig.postedBeforeListening == 0, "a reset or an append went out before the mirror listened")
        await rig.shutdown()
    }

    @Test func aRetiredMirrorThatLosesItsPeerWaitsForItsSuccessorsRecord() async throws {
        let rig = try Rig()
        rig.mirror.start()
        try await rig.inSync()

        // New settings are being recorded (the backend is slow to take them) when the old peer fails.
        rig.backendDown = true
        let recorder = rig.recorder
        let successor = DTLRecord(
            mode: .sync, peer: "q", state: .degraded, generation: 1, changedAt: Date(), storedThrough: 0)
        let version = try #require(rig.mirror.retire { recorder.request(successor) })
        rig.cutLink()
        let mirror = rig.mirror
        let held = Task { await mirror.waitForWrites(nil) }
        #expect(
            await Self.stillWaiting(held, seconds: 0.3),
            "a write is replied without the peer before any not-in-sync record is on the backend")
        rig.backendDown = false
        await held.value
        #expect(await recorder.written(version))
        try mirror.checkRecorded()
        await rig.shutdown()
        // The retired mirror recorded nothing of its own (it may have reconnected to its old peer meanwhile).
        #expect(rig.recorded.filter { $0 != "connect" } == ["in_sync", "degraded"], "\(rig.recorded)")
    }
}
