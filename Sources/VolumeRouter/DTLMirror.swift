// The owner's side of the distributed transaction log (docs/design.md, "Distributed transaction log"): a volume's
// journal mirrored, byte for byte, to a DTL peer on another node until the backend holds it.
//
// The journal's leader hands every range it writes (batches, seal markers, the header of each new journal) to
// `appended` right after the pwritev, in journal order; the mirror posts it to the peer on one TCP connection. The
// peer answers each append with `received` (it is in the peer's file) and each `sync` with `synced` (durable there).
//
// Modes: `sync`, a write is replied once the peer received it (the write path waits in `waitForWrites`), and a flush
// or FUA once the peer made everything durable (`flush`); `async`, writes do not wait unless more than
// `asyncLagBytesMax` are unanswered, flushes wait as in `sync`. States: `catchingUp` (connected, resending what the
// backend lacks), `inSync` (the peer holds everything not on the backend), `degraded` (no peer: writes and flushes
// continue on local flash alone). A peer that refuses, fails or does not answer within `timeoutSeconds` makes the
// mirror degraded. Before anything is replied without the peer, the degraded state is recorded on the backend (the
// volume's DTL record, within `timeoutSeconds`), so a taker knows the peer's copy may be short. Every `retrySeconds`
// the mirror reconnects, tells the peer to drop what it held (`reset`), resends the journal of every epoch the
// backend lacks from the local files, and is in sync again once the peer has made all of it durable.
//
// Owns: the connection, the counts of appends sent and answered, waiting writes and flushes, and which journals
// (epoch, SCO, length) exist only locally.

import Collections
import CoreMetrics
import DTL
import FlashIO
import Logging
import NIOCore
import Synchronization
import TransactionLog
import VolumeCore

final class DTLMirror: Sendable {
    struct LocalJournal {
        var sco: SCONumber
        /// Bytes written so far; nil: a journal rolled before the mirror started (its length is found by a scan).
        var lengthBytes: UInt64?
    }

    private struct Waiter {
        var target: UInt64
        var connection: UInt64
        var continuation: UnsafeContinuation<Void, Never>
    }

    private struct State {
        var status: DTLState = .degraded
        var client: DTLClient?
        /// Bumped at every connection: answers and waiters belong to one.
        var connection: UInt64 = 0
        var sent: UInt64 = 0
        var received: UInt64 = 0
        /// Appends sent and not answered: their count, size and when they left.
        var unanswered = Deque<(count: UInt64, bytes: UInt64, at: MonotonicInstant)>()
        var unansweredBytes: UInt64 = 0
        var writeWaiters: [Waiter] = []
        var syncsSent: UInt64 = 0
        var syncsSentAt: [UInt64: MonotonicInstant] = [:]
        var syncWaiters: [Waiter] = []
        /// Waiting while the degraded state is being recorded on the backend.
        var held: [UnsafeContinuation<Void, Never>] = []
        var recordingDegraded = false
        var journals: [UInt64: LocalJournal] = [:]
        var storedThrough: UInt64
        var stopped = false
        var lastError: String?
    }

    let mode: DTLMode
    let peer: String
    private let volumeID: VolumeID
    private let volumeName: VolumeName
    private let generation: UInt64
    private let clusterSizeBytes: UInt32
    private let layout: VolumeLayout
    private let network: DTLNetwork
    private let env: Environment
    private let logger: Logger
    /// Records the state in the volume's DTL record on the backend (best effort).
    private let record: @Sendable (DTLState) async -> Void
    private let state: Mutex<State>
    private let tasks = Mutex<[Task<Void, Never>]>([])
    /// vd_volume_dtl_state{volume}: 0 off, 1 in sync, 2 catching up, 3 degraded; vd_volume_dtl_degraded_total.
    private let stateGauge: Gauge
    private let degradations: Counter

    /// Catch-up sends at most this much before waiting for answers.
    static let catchUpWindowBytes: UInt64 = 32 << 20
    static let catchUpChunkBytes = 1 << 20

    init(
        mode: DTLMode, peer: String, volumeID: VolumeID, volumeName: VolumeName, generation: UInt64,
        clusterSizeBytes: UInt32, layout: VolumeLayout, network: DTLNetwork, env: Environment, logger: Logger,
        storedThrough: UInt64, journals: [UInt64: LocalJournal], record: @escaping @Sendable (DTLState) async -> Void
    ) {
        precondition(mode != .none, "a DTL mirror of mode none")
        self.mode = mode
        self.peer = peer
        self.volumeID = volumeID
        self.volumeName = volumeName
        self.generation = generation
        self.clusterSizeBytes = clusterSizeBytes
        self.layout = layout
        self.network = network
        self.env = env
        self.logger = logger
        self.record = record
        stateGauge = Gauge(label: "vd_volume_dtl_state", dimensions: [("volume", volumeName.rawValue)])
        degradations = Counter(label: "vd_volume_dtl_degraded_total", dimensions: [("volume", volumeName.rawValue)])
        stateGauge.record(3)
        var initial = State(storedThrough: storedThrough)
        initial.journals = journals.filter { $0.key > storedThrough }
        state = Mutex(initial)
    }

    var status: DTLStatus {
        state.withLock {
            DTLStatus(
                mode: mode, peer: peer, state: $0.status, unansweredBytes: $0.unansweredBytes, lastError: $0.lastError)
        }
    }

    /// Starts connecting (and reconnecting whenever degraded) and watching for a peer that stopped answering.
    func start() {
        let connector = env.tasks.spawn { [self] in await connectLoop() }
        let watchdog = env.tasks.spawn { [self] in await watchdogLoop() }
        tasks.withLock { $0 = [connector, watchdog] }
    }

    /// Stops for good: waiting writes and flushes continue without the peer.
    func stop() async {
        let (client, released) = state.withLock { state -> (DTLClient?, [UnsafeContinuation<Void, Never>]) in
            state.stopped = true
            defer { state.client = nil }
            return (state.client, Self.takeAllWaiters(&state))
        }
        for continuation in released { continuation.resume() }
        stateGauge.record(0)
        await client?.close()
        let running = tasks.withLock { $0 }
        for task in running { task.cancel() }
        for task in running { await task.value }
    }

    // MARK: the journal's side (leader only, in journal order)

    /// A journal that existed before the mirror (the backend lacks it): part of every catch-up.
    func seed(epoch: UInt64, _ journal: LocalJournal) {
        state.withLock { state in
            guard epoch > state.storedThrough, state.journals[epoch] == nil else { return }
            state.journals[epoch] = journal
        }
    }

    /// `bytes` were written at `offset` of the journal of `epoch` (SCO `sco`).
    func appended(epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer) {
        let end = offset + UInt64(bytes.readableBytes)
        let now = env.clock.now()
        state.withLock { state in
            var journal = state.journals[epoch] ?? LocalJournal(sco: sco, lengthBytes: 0)
            precondition(journal.sco == sco, "epoch \(epoch) is in two journals")
            journal.lengthBytes = max(journal.lengthBytes ?? 0, end)
            state.journals[epoch] = journal
            guard let client = state.client else { return }
            Self.send(&state, client, client.appendFrame(epoch: epoch, sco: sco, offset: offset, bytes: bytes), now)
        }
    }

    private static func send(_ state: inout State, _ client: DTLClient, _ frame: DTLFrame, _ now: MonotonicInstant) {
        state.sent += 1
        let bytes = UInt64(frame.payload.readableBytes)
        state.unanswered.append((state.sent, bytes, now))
        state.unansweredBytes += bytes
        client.post(frame)
    }

    /// Epochs through `epoch` are on the backend: the peer may drop them.
    func stored(through epoch: UInt64) {
        state.withLock { state in
            guard epoch > state.storedThrough else { return }
            state.storedThrough = epoch
            state.journals = state.journals.filter { $0.key > epoch }
            state.client?.post(state.client!.frame(.trim, value: epoch))
        }
    }

    // MARK: the write path

    /// Waits, in `sync` mode, until the peer received every append sent so far (in `async` mode only while too much
    /// is unanswered). Never fails: without a peer the volume continues degraded.
    func waitForWrites() async {
        await wait { state in
            guard state.client != nil else { return nil }
            switch mode {
            case .sync: return state.received >= state.sent ? nil : state.sent
            case .async: return state.unansweredBytes > network.asyncLagBytesMax ? state.sent : nil
            case .none: return nil
            }
        } register: { state, waiter in
            state.writeWaiters.append(waiter)
        }
    }

    /// Waits until the peer made everything sent so far durable (a flush or FUA reply), unless degraded.
    func flush() async {
        let now = env.clock.now()
        await wait { state in
            guard let client = state.client else { return nil }
            state.syncsSent += 1
            state.syncsSentAt[state.syncsSent] = now
            client.post(client.frame(.sync, value: state.syncsSent))
            return state.syncsSent
        } register: { state, waiter in
            state.syncWaiters.append(waiter)
        }
    }

    /// `target` decides (under the lock) what to wait for (nil: nothing); `register` queues the waiter.
    private func wait(
        target: (inout State) -> UInt64?, register: (inout State, Waiter) -> Void
    ) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let ready = state.withLock { state -> Bool in
                if state.recordingDegraded {
                    state.held.append(continuation)
                    return false
                }
                guard !state.stopped, let goal = target(&state) else { return true }
                register(&state, Waiter(target: goal, connection: state.connection, continuation: continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    private static func takeAllWaiters(_ state: inout State) -> [UnsafeContinuation<Void, Never>] {
        defer {
            state.writeWaiters = []
            state.syncWaiters = []
            state.held = []
        }
        return state.writeWaiters.map(\.continuation) + state.syncWaiters.map(\.continuation) + state.held
    }

    // MARK: the connection

    private func connectLoop() async {
        while !Task.isCancelled {
            let (stopped, connected) = state.withLock { ($0.stopped, $0.client != nil || $0.recordingDegraded) }
            if stopped { return }
            if !connected {
                do throws(VDError) {
                    let (host, port) = try await network.resolve(peer)
                    let client = try await DTLClient.connect(
                        host: host, port: port, token: network.token, volumeID: volumeID, generation: generation,
                        group: network.group)
                    await catchUp(client)
                } catch {
                    noteFailure("cannot reach DTL peer \(peer): \(error.message)")
                }
            }
            await env.clock.sleep(for: .seconds(network.retrySeconds))
        }
    }

    private func noteFailure(_ message: String) {
        let first = state.withLock { state -> Bool in
            defer { state.lastError = message }
            return state.lastError != message
        }
        if first { logger.warning("volume \(volumeName): \(message)") }
    }

    /// A new connection: the peer drops what it held, gets every journal the backend lacks again, and once it made
    /// them durable the mirror is in sync.
    private func catchUp(_ client: DTLClient) async {
        let started = state.withLock {
            state -> (UInt64, [(UInt64, LocalJournal)], UInt64)? in
            guard !state.stopped else { return nil }
            state.connection += 1
            state.client = client
            state.sent = 0
            state.received = 0
            state.unanswered = []
            state.unansweredBytes = 0
            state.syncsSent = 0
            state.syncsSentAt = [:]
            state.status = .catchingUp
            stateGauge.record(2)
            // Reset first, in the same step as going live: every append after this one is sent too.
            client.post(client.frame(.reset))
            return (state.connection, state.journals.sorted { $0.key < $1.key }, state.storedThrough)
        }
        guard let (connection, journals, storedThrough) = started else {
            await client.close()
            return
        }
        let reader = env.tasks.spawn { [self] in await readLoop(client, connection: connection) }
        tasks.withLock { $0.append(reader) }
        logger.info("volume \(volumeName): DTL peer \(peer) connected; catching up \(journals.count) journal(s)")
        client.post(client.frame(.trim, value: storedThrough))
        do throws(VDError) {
            for (epoch, journal) in journals {
                try await resend(epoch: epoch, journal, client: client, connection: connection)
            }
        } catch {
            degrade("the DTL catch-up failed: \(error.message)", connection: connection)
            return
        }
        // In sync once the peer made all of it durable.
        await flush()
        let reached = state.withLock { state -> Bool in
            guard state.connection == connection, state.client != nil else { return false }
            state.status = .inSync
            state.lastError = nil
            stateGauge.record(1)
            return true
        }
        if reached {
            logger.info("volume \(volumeName): DTL peer \(peer) in sync")
            await record(.inSync)
        }
    }

    /// Sends the local journal of `epoch` again, in chunks, waiting for answers whenever a window is in flight.
    private func resend(
        epoch: UInt64, _ journal: LocalJournal, client: DTLClient, connection: UInt64
    ) async throws(VDError) {
        let path = layout.scoPath(journal.sco)
        let fs = env.fs
        let (volumeID, clusterSizeBytes) = (self.volumeID, self.clusterSizeBytes)
        let file: FlashFile
        do {
            file = try await env.tasks.blocking { () throws(VDError) -> FlashFile in
                try fs.open(path, options: .readOnly)
            }
        } catch  where error.code == .notFound {
            // Stored (and evicted) meanwhile: nothing to resend.
            if state.withLock({ $0.storedThrough >= epoch }) { return }
            throw error
        }
        defer { file.close() }
        var length = journal.lengthBytes
        if length == nil {
            length = try await env.tasks.blocking { () throws(VDError) -> UInt64 in
                try JournalScanner.scan(
                    file: file, volumeID: volumeID, sco: journal.sco, clusterSizeBytes: clusterSizeBytes,
                    verifyPayloads: false
                ).validLength
            }
        }
        var offset: UInt64 = 0
        while offset < length! {
            let count = Int(min(UInt64(Self.catchUpChunkBytes), length! - offset))
            let at = offset
            let bytes = try await env.tasks.blocking { () throws(VDError) -> ByteBuffer in
                ByteBuffer(bytes: try file.readExactly(count, at: at))
            }
            let now = env.clock.now()
            let live = state.withLock { state -> Bool in
                guard state.connection == connection, state.client != nil else { return false }
                Self.send(
                    &state, client, client.appendFrame(epoch: epoch, sco: journal.sco, offset: at, bytes: bytes), now)
                return true
            }
            guard live else { throw VDError(.io, "the DTL peer connection ended") }
            offset += UInt64(count)
            await wait { state in
                state.unansweredBytes > Self.catchUpWindowBytes && state.client != nil ? state.sent : nil
            } register: { state, waiter in
                state.writeWaiters.append(waiter)
            }
        }
    }

    private func readLoop(_ client: DTLClient, connection: UInt64) async {
        while true {
            let frame: DTLFrame
            do {
                frame = try await client.nextFrame()
            } catch {
                degrade(error.message, connection: connection)
                return
            }
            switch frame.kind {
            case .received:
                let released = state.withLock { state -> [UnsafeContinuation<Void, Never>] in
                    guard state.connection == connection else { return [] }
                    state.received = max(state.received, frame.value)
                    while let first = state.unanswered.first, first.count <= state.received {
                        state.unansweredBytes -= first.bytes
                        state.unanswered.removeFirst()
                    }
                    let ready = state.writeWaiters.filter { $0.target <= state.received }
                    state.writeWaiters.removeAll { $0.target <= state.received }
                    return ready.map(\.continuation)
                }
                for continuation in released { continuation.resume() }
            case .synced:
                let released = state.withLock { state -> [UnsafeContinuation<Void, Never>] in
                    guard state.connection == connection else { return [] }
                    state.syncsSentAt = state.syncsSentAt.filter { $0.key > frame.value }
                    let ready = state.syncWaiters.filter { $0.target <= frame.value }
                    state.syncWaiters.removeAll { $0.target <= frame.value }
                    return ready.map(\.continuation)
                }
                for continuation in released { continuation.resume() }
            case .refused:
                degrade(DTLClient.refusal(frame).message, connection: connection)
                return
            default:
                degrade("the DTL peer sent an unexpected \(frame.kind) frame", connection: connection)
                return
            }
        }
    }

    private func watchdogLoop() async {
        let timeout = network.timeoutSeconds
        while !Task.isCancelled, !state.withLock({ $0.stopped }) {
            await env.clock.sleep(for: .seconds(max(0.05, timeout / 4)))
            let now = env.clock.now()
            let late = state.withLock { state -> UInt64? in
                guard state.client != nil else { return nil }
                let oldest = [state.unanswered.first?.at, state.syncsSentAt.values.min()].compactMap { $0 }.min()
                guard let oldest, oldest.duration(to: now) >= .seconds(timeout) else { return nil }
                return state.connection
            }
            if let late {
                degrade("the DTL peer \(peer) did not answer within \(timeout) s", connection: late)
            }
        }
    }

    /// The peer of `connection` is lost: record the degraded state on the backend, then let waiting writes and
    /// flushes continue without it.
    private func degrade(_ reason: String, connection: UInt64) {
        let client = state.withLock { state -> DTLClient? in
            guard state.connection == connection, let client = state.client else { return nil }
            state.client = nil
            state.status = .degraded
            stateGauge.record(3)
            degradations.increment()
            state.recordingDegraded = true
            state.lastError = reason
            state.unanswered = []
            state.unansweredBytes = 0
            state.syncsSentAt = [:]
            // Waiters of this connection wait for the record, like any write arriving meanwhile.
            state.held += state.writeWaiters.map(\.continuation) + state.syncWaiters.map(\.continuation)
            state.writeWaiters = []
            state.syncWaiters = []
            return client
        }
        guard let client else { return }
        logger.warning("volume \(volumeName): DTL degraded (\(reason)); writes continue on local flash only")
        let task = env.tasks.spawn { [self] in
            await client.close()
            await record(.degraded)
            let released = state.withLock { state -> [UnsafeContinuation<Void, Never>] in
                state.recordingDegraded = false
                defer { state.held = [] }
                return state.held
            }
            for continuation in released { continuation.resume() }
        }
        tasks.withLock { $0.append(task) }
    }
}
