// The owner's side of the distributed transaction log (docs/design.md, "Distributed transaction log"): a volume's
// journal mirrored, byte for byte, to a DTL peer on another node until the backend holds it.
//
// The journal's leader hands every range it writes (batches, seal markers, the header of each new journal) to
// `appended` right after the pwritev, in journal order; the mirror posts it to the peer on one connection (posts
// leave in the order they are made, under the mirror's lock). The peer answers each append with `received` (it is
// in the peer's file) and each `sync` with `synced` (durable there).
//
// Modes: `sync`, a write is replied once the peer received it (the write path waits in `waitForWrites`), and a flush
// or FUA once the peer made everything durable (`flush`); `async`, writes do not wait unless more than
// `asyncLagBytesMax` are unanswered, flushes wait as in `sync`. States: `catchingUp` (connected, resending what the
// backend lacks), `inSync` (the peer holds everything not on the backend), `degraded` (no peer: writes and flushes
// continue on local flash alone). A peer that refuses, fails or does not answer within `timeoutSeconds` makes the
// mirror degraded. Nothing is replied without the peer before the degraded state is on the backend (the volume's DTL
// record, written by its one `DTLRecorder`, in request order): a taker then knows the peer's copy may be short; if
// the record cannot be written the volume's lease runs out and its I/O fails instead, and goes on failing, even once
// the lease is renewed, until the degraded record is on the backend (before that the backend may still say in sync
// for a peer that lacks what is written now). Every `retrySeconds` a degraded
// mirror reconnects, tells the peer to drop what it held (`reset`), resends the journal of every epoch the backend
// lacks from the local files, and is in sync again (recorded) once the peer has made all of it durable.
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
    /// Which append of which connection carried a journal range: a write waits for that one only.
    struct Ticket: Sendable, Equatable {
        var connection: UInt64
        var sequence: UInt64
    }

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
        var connectionHandle: (any DTLConnection)?
        /// Changes at every connection (unique among all mirrors: a ticket of another mirror never matches): answers,
        /// waiters and tickets belong to one.
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
        /// Waiting until the degraded state is on the backend.
        var held: [UnsafeContinuation<Void, Never>] = []
        var recordingDegraded = false
        /// Degraded, but the record of it could not be written (the lease ran out): I/O fails (`checkRecorded`) and
        /// no catch-up starts until it is written, since the backend may still say in sync.
        var degradedUnrecorded = false
        var journals: [UInt64: LocalJournal] = [:]
        var storedThrough: UInt64
        var stopped = false
        /// Another mirror takes over: this one records nothing more (its successor's settings are recorded, by
        /// request `retiredBy`: a degradation meanwhile waits for that one).
        var retired = false
        var retiredBy: UInt64?
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
    private let recorder: DTLRecorder
    /// The record of `state` for this mirror's settings.
    private let makeRecord: @Sendable (DTLState) -> DTLRecord
    /// This router may still serve the volume (its lease is valid): a fenced owner must never reset the peer, whose
    /// journals a taker is about to fetch.
    private let mayServe: @Sendable () -> Bool
    private let state: Mutex<State>
    private let tasks = Mutex<[Task<Void, Never>]>([])
    /// vd_volume_dtl_state{volume}: 0 off, 1 in sync, 2 catching up, 3 degraded; vd_volume_dtl_degraded_total.
    private let stateGauge: Gauge
    private let degradations: Counter

    /// Connections of every mirror so far.
    private static let connections = Atomic<UInt64>(0)

    /// Catch-up sends at most this much before waiting for answers.
    static let catchUpWindowBytes: UInt64 = 32 << 20
    static let catchUpChunkBytes = 1 << 20

    init(
        mode: DTLMode, peer: String, volumeID: VolumeID, volumeName: VolumeName, generation: UInt64,
        clusterSizeBytes: UInt32, layout: VolumeLayout, network: DTLNetwork, env: Environment, logger: Logger,
        storedThrough: UInt64, recorder: DTLRecorder, makeRecord: @escaping @Sendable (DTLState) -> DTLRecord,
        mayServe: @escaping @Sendable () -> Bool
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
        self.recorder = recorder
        self.makeRecord = makeRecord
        self.mayServe = mayServe
        stateGauge = Gauge(label: "vd_volume_dtl_state", dimensions: [("volume", volumeName.rawValue)])
        degradations = Counter(label: "vd_volume_dtl_degraded_total", dimensions: [("volume", volumeName.rawValue)])
        stateGauge.record(3)
        state = Mutex(State(storedThrough: storedThrough))
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

    /// From now on this mirror records nothing: the settings of its successor are being recorded, by the request
    /// `record` makes (nil: none, the mirror is stopping with the volume). The request is made under the mirror's lock,
    /// so no record of this mirror can be requested after it.
    @discardableResult
    func retire(recording record: (() -> UInt64)? = nil) -> UInt64? {
        state.withLock { state in
            state.retired = true
            state.retiredBy = record?()
            return state.retiredBy
        }
    }

    /// The successor's settings could not be recorded: this mirror goes on recording its own states.
    func unretire() {
        state.withLock { state in
            state.retired = false
            state.retiredBy = nil
        }
    }

    /// Throws while the volume is degraded without that on the backend: a write or flush released then must fail
    /// (the backend may say in sync for a peer that lacks it).
    func checkRecorded() throws(VDError) {
        guard state.withLock({ $0.degradedUnrecorded && !$0.stopped }) else { return }
        throw VDError(
            .shutdown,
            "volume \(volumeName): the DTL peer was lost and the degraded state is not on the backend yet (the lease ran out); I/O is refused until it is recorded"
        )
    }

    /// Stops for good (after `retire`, or at close once everything was flushed to the peer): waiting writes and
    /// flushes continue without the peer.
    func stop() async {
        let (connection, released) = state.withLock {
            state -> ((any DTLConnection)?, [UnsafeContinuation<Void, Never>]) in
            state.stopped = true
            defer { state.connectionHandle = nil }
            return (state.connectionHandle, Self.takeAllWaiters(&state))
        }
        for continuation in released { continuation.resume() }
        stateGauge.record(0)
        for task in tasks.withLock({ $0 }) { task.cancel() }
        await connection?.close()
    }

    // MARK: the journal's side (leader only, in journal order)

    /// A journal that existed before the mirror (the backend lacks it): part of every catch-up.
    func seed(epoch: UInt64, _ journal: LocalJournal) {
        state.withLock { state in
            guard epoch > state.storedThrough, state.journals[epoch] == nil else { return }
            state.journals[epoch] = journal
        }
    }

    /// `bytes` are written at `offset` of the journal of `epoch` (SCO `sco`); `crc`, when known, is their CRC32C.
    /// Their buffers are sent as they are (not copied). Returns the append's ticket (nil: no peer connected).
    @discardableResult
    func appended(
        epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: DTLPayload, crc: UInt32? = nil
    ) -> Ticket? {
        let end = offset + UInt64(bytes.readableBytes)
        let now = env.clock.now()
        return state.withLock { state -> Ticket? in
            var journal = state.journals[epoch] ?? LocalJournal(sco: sco, lengthBytes: 0)
            precondition(journal.sco == sco, "epoch \(epoch) is in two journals")
            journal.lengthBytes = max(journal.lengthBytes ?? 0, end)
            state.journals[epoch] = journal
            guard let connection = state.connectionHandle else { return nil }
            Self.send(
                &state, connection,
                connection.appendFrame(epoch: epoch, sco: sco, offset: offset, bytes: bytes, crc: crc), now)
            return Ticket(connection: state.connection, sequence: state.sent)
        }
    }

    /// `bytes` are written at `offset` of the journal of `epoch` (SCO `sco`).
    @discardableResult
    func appended(epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer) -> Ticket? {
        appended(epoch: epoch, sco: sco, offset: offset, bytes: DTLPayload(bytes))
    }

    private static func send(
        _ state: inout State, _ connection: any DTLConnection, _ frame: DTLFrame, _ now: MonotonicInstant
    ) {
        state.sent += 1
        let bytes = UInt64(frame.payloadParts.readableBytes)
        state.unanswered.append((state.sent, bytes, now))
        state.unansweredBytes += bytes
        connection.post(frame)
    }

    /// Epochs through `epoch` are on the backend: the peer may drop them.
    func stored(through epoch: UInt64) {
        state.withLock { state in
            guard epoch > state.storedThrough else { return }
            state.storedThrough = epoch
            state.journals = state.journals.filter { $0.key > epoch }
            if let connection = state.connectionHandle { connection.post(connection.frame(.trim, value: epoch)) }
        }
    }

    // MARK: the write path

    /// Waits, in `sync` mode, until the peer received the append of `ticket` (the journal range of a write; nil: it
    /// went out on no connection), in `async` mode only while too much is unanswered. Never fails: without a peer
    /// the volume continues degraded (once that is recorded). An append of a connection since replaced is covered
    /// by the degradation that ended it.
    func waitForWrites(_ ticket: Ticket?) async {
        await wait { state in
            guard state.connectionHandle != nil else { return nil }
            switch mode {
            case .sync:
                guard let ticket, ticket.connection == state.connection else { return nil }
                return state.received >= ticket.sequence ? nil : ticket.sequence
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
            guard let connection = state.connectionHandle else { return nil }
            state.syncsSent += 1
            state.syncsSentAt[state.syncsSent] = now
            connection.post(connection.frame(.sync, value: state.syncsSent))
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
                if state.stopped { return true }
                // Held until the degraded state is on the backend (or the lease runs out: then released, they fail).
                if state.recordingDegraded || (state.degradedUnrecorded && mayServe()) {
                    state.held.append(continuation)
                    return false
                }
                guard let goal = target(&state) else { return true }
                register(&state, Waiter(target: goal, connection: state.connection, continuation: continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    private static func takeHeld(_ state: inout State) -> [UnsafeContinuation<Void, Never>] {
        defer { state.held = [] }
        return state.held
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
            let (stopped, connected, unrecorded) = state.withLock {
                ($0.stopped, $0.connectionHandle != nil || $0.recordingDegraded, $0.degradedUnrecorded)
            }
            if stopped { return }
            if unrecorded && !connected {
                // Once the lease is valid again: first the degraded record, then a catch-up (which resets the peer,
                // while the backend may still say in sync). Without it, what waits for the record fails.
                if mayServe() {
                    await recordDegradedAgain()
                } else {
                    for continuation in state.withLock({ Self.takeHeld(&$0) }) { continuation.resume() }
                }
            } else if !connected && !unrecorded && mayServe() {
                do throws(VDError) {
                    let connection = try await network.connect(peer, volumeID, generation)
                    await catchUp(connection)
                } catch {
                    noteFailure("cannot reach DTL peer \(peer): \(error.message)")
                }
            }
            await env.clock.sleep(for: .seconds(network.retrySeconds))
        }
    }

    /// Requests the degraded record again (the last attempt failed with the lease) and waits for it, holding writes
    /// and flushes meanwhile; once it is written they go on, degraded.
    private func recordDegradedAgain() async {
        let (version, notRecording) = state.withLock { state -> (UInt64?, [UnsafeContinuation<Void, Never>]) in
            // Retired: only the successor's record may be requested; what waits fails (`checkRecorded`).
            guard state.degradedUnrecorded, !state.recordingDegraded, !state.stopped, !state.retired else {
                return (nil, state.recordingDegraded ? [] : Self.takeHeld(&state))
            }
            state.recordingDegraded = true
            return (recorder.request(makeRecord(.degraded)), [])
        }
        for continuation in notRecording { continuation.resume() }
        guard let version else { return }
        let written = await recorder.written(version)
        let released = state.withLock { state -> [UnsafeContinuation<Void, Never>] in
            state.recordingDegraded = false
            if written { state.degradedUnrecorded = false }
            return Self.takeHeld(&state)
        }
        if written { logger.info("volume \(volumeName): the degraded DTL state is recorded; I/O continues degraded") }
        for continuation in released { continuation.resume() }
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
    private func catchUp(_ handle: any DTLConnection) async {
        // Listened to before anything is posted: the leader may post an append as soon as the connection is live, and
        // its answer may arrive before this task goes on. Until then it is nobody's current connection (ignored).
        let connection = Self.connections.add(1, ordering: .relaxed).newValue
        handle.listen { [self] result in answered(result, connection: connection) }
        let started = state.withLock { state -> [(UInt64, LocalJournal)]? in
            // Checked again right before the reset goes out (a taker waits at least a second beyond the lease). Not
            // while the backend may still say in sync from before an unrecorded degradation: the reset empties the
            // peer a taker would trust.
            guard !state.stopped, !state.degradedUnrecorded, mayServe() else { return nil }
            state.connection = connection
            state.connectionHandle = handle
            state.sent = 0
            state.received = 0
            state.unanswered = []
            state.unansweredBytes = 0
            state.syncsSent = 0
            state.syncsSentAt = [:]
            state.status = .catchingUp
            stateGauge.record(2)
            // Reset first, in the same step as going live: every append after this one is sent too.
            handle.post(handle.frame(.reset))
            handle.post(handle.frame(.trim, value: state.storedThrough))
            return state.journals.sorted { $0.key < $1.key }
        }
        guard let journals = started else {
            await handle.close()
            return
        }
        logger.info("volume \(volumeName): DTL peer \(peer) connected; catching up \(journals.count) journal(s)")
        do throws(VDError) {
            for (epoch, journal) in journals {
                try await resend(epoch: epoch, journal, handle: handle, connection: connection)
            }
        } catch {
            degrade("the DTL catch-up failed: \(error.message)", connection: connection)
            return
        }
        // In sync once the peer made all of it durable.
        await flush()
        let reached = state.withLock { state -> Bool in
            guard state.connection == connection, state.connectionHandle != nil, !state.stopped else { return false }
            state.status = .inSync
            state.lastError = nil
            stateGauge.record(1)
            // Requested under the lock: a degradation after this point is recorded after it.
            if !state.retired { _ = recorder.request(makeRecord(.inSync)) }
            return true
        }
        if reached { logger.info("volume \(volumeName): DTL peer \(peer) in sync") }
    }

    /// Sends the local journal of `epoch` again, in chunks, waiting for answers whenever a window is in flight.
    private func resend(
        epoch: UInt64, _ journal: LocalJournal, handle: any DTLConnection, connection: UInt64
    ) async throws(VDError) {
        let path = layout.scoPath(journal.sco)
        let fs = env.fs
        let (volumeID, clusterSizeBytes) = (self.volumeID, self.clusterSizeBytes)
        var isStored: Bool { state.withLock { $0.storedThrough >= epoch } }
        let file: FlashFile
        do {
            file = try await env.tasks.blocking { () throws(VDError) -> FlashFile in
                try fs.open(path, options: .readOnly)
            }
        } catch  where error.code == .notFound {
            // Stored (and evicted) meanwhile: nothing to resend.
            if isStored { return }
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
            // Stored meanwhile: the peer may have dropped it already; sending it again would only take its space.
            if isStored { return }
            let count = Int(min(UInt64(Self.catchUpChunkBytes), length! - offset))
            let at = offset
            let bytes = try await env.tasks.blocking { () throws(VDError) -> ByteBuffer in
                ByteBuffer(bytes: try file.readExactly(count, at: at))
            }
            let now = env.clock.now()
            let live = state.withLock { state -> Bool in
                guard state.connection == connection, state.connectionHandle != nil else { return false }
                Self.send(
                    &state, handle, handle.appendFrame(epoch: epoch, sco: journal.sco, offset: at, bytes: bytes), now)
                return true
            }
            guard live else { throw VDError(.io, "the DTL peer connection ended") }
            offset += UInt64(count)
            await wait { state in
                state.unansweredBytes > Self.catchUpWindowBytes && state.connectionHandle != nil ? state.sent : nil
            } register: { state, waiter in
                state.writeWaiters.append(waiter)
            }
        }
    }

    /// A frame (or the end) of `connection`, on its thread (an event loop): answers release waiters; anything else
    /// degrades.
    private func answered(_ result: Result<DTLFrame, VDError>, connection: UInt64) {
        let frame: DTLFrame
        switch result {
        case .failure(let error):
            degrade(error.message, connection: connection)
            return
        case .success(let arrived): frame = arrived
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
                guard state.writeWaiters.contains(where: { $0.target <= state.received }) else { return [] }
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
        default:
            degrade("the DTL peer sent an unexpected \(frame.kind) frame", connection: connection)
        }
    }

    private func watchdogLoop() async {
        let timeout = network.timeoutSeconds
        while !Task.isCancelled, !state.withLock({ $0.stopped }) {
            await env.clock.sleep(for: .seconds(max(0.05, timeout / 4)))
            let now = env.clock.now()
            let late = state.withLock { state -> UInt64? in
                guard state.connectionHandle != nil else { return nil }
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
    /// flushes continue without it. Writes and flushes arriving meanwhile wait too.
    private func degrade(_ reason: String, connection: UInt64) {
        let outcome = state.withLock { state -> (handle: any DTLConnection, version: UInt64?)? in
            guard state.connection == connection, let handle = state.connectionHandle, !state.stopped else {
                return nil
            }
            state.connectionHandle = nil
            state.status = .degraded
            stateGauge.record(3)
            degradations.increment()
            state.recordingDegraded = true
            state.lastError = reason
            state.unanswered = []
            state.unansweredBytes = 0
            state.syncsSentAt = [:]
            state.held += state.writeWaiters.map(\.continuation) + state.syncWaiters.map(\.continuation)
            state.writeWaiters = []
            state.syncWaiters = []
            // Retired: the successor's settings (not in sync) are being recorded; stopping with the volume: nothing.
            return (handle, state.retired ? state.retiredBy : recorder.request(makeRecord(.degraded)))
        }
        guard let (handle, version) = outcome else { return }
        logger.warning("volume \(volumeName): DTL degraded (\(reason)); writes continue on local flash only")
        _ = env.tasks.spawn { [self] in
            await handle.close()
            var recorded = true
            if let version, !(await recorder.written(version)) {
                recorded = false
                logger.error(
                    "volume \(volumeName): the degraded DTL state could not be recorded (the lease is not valid): its I/O fails until it is"
                )
            }
            let released = state.withLock { state -> [UnsafeContinuation<Void, Never>] in
                state.recordingDegraded = false
                if !recorded { state.degradedUnrecorded = true }
                defer { state.held = [] }
                return state.held
            }
            for continuation in released { continuation.resume() }
        }
    }
}

/// The one writer of a volume's DTL record (`NAME/dtl-state/N`, `DTLRecord.write`): records are written in the order
/// they were requested (the last request wins), each retried until it is on the backend or the volume may no longer
/// write metadata (its lease ran out: its I/O fails then anyway).
final class DTLRecorder: Sendable {
    private struct State {
        var wanted: DTLRecord?
        var requested: UInt64 = 0
        var written: UInt64 = 0
        var running = false
        var waiters: [(version: UInt64, continuation: UnsafeContinuation<Bool, Never>)] = []
        var results: [UInt64: Bool] = [:]
    }

    private let write: @Sendable (DTLRecord) async throws(VDError) -> Void
    private let mayWrite: @Sendable () -> Bool
    private let env: Environment
    private let logger: Logger
    private let state = Mutex(State())

    init(
        env: Environment, logger: Logger, mayWrite: @escaping @Sendable () -> Bool,
        write: @escaping @Sendable (DTLRecord) async throws(VDError) -> Void
    ) {
        self.env = env
        self.logger = logger
        self.mayWrite = mayWrite
        self.write = write
    }

    /// Asks for `record` to be written after every earlier request; its version, for `written`.
    func request(_ record: DTLRecord) -> UInt64 {
        let (version, start) = state.withLock { state -> (UInt64, Bool) in
            state.requested += 1
            state.wanted = record
            defer { state.running = true }
            return (state.requested, !state.running)
        }
        if start { _ = env.tasks.spawn { [self] in await run() } }
        return version
    }

    /// Whether request `version` (or a later one, which replaces it) reached the backend.
    func written(_ version: UInt64) async -> Bool {
        await withUnsafeContinuation { continuation in
            let done = state.withLock { state -> Bool? in
                if state.written >= version { return state.results[state.written] ?? false }
                state.waiters.append((version, continuation))
                return nil
            }
            if let done { continuation.resume(returning: done) }
        }
    }

    private func run() async {
        while true {
            let next = state.withLock { state -> (DTLRecord, UInt64)? in
                guard state.requested > state.written, let wanted = state.wanted else {
                    state.running = false
                    return nil
                }
                return (wanted, state.requested)
            }
            guard let (record, version) = next else { return }
            var ok = false
            var logged = false
            while mayWrite() {
                do throws(VDError) {
                    try await write(record)
                    ok = true
                    break
                } catch {
                    if !logged {
                        logger.warning(
                            "cannot record the DTL state \(record.state.rawValue): \(error.message); retrying")
                        logged = true
                    }
                    await env.clock.sleep(for: .milliseconds(500))
                }
            }
            let released = state.withLock { state -> [UnsafeContinuation<Bool, Never>] in
                state.written = version
                state.results = [version: ok]
                let ready = state.waiters.filter { $0.version <= version }
                state.waiters.removeAll { $0.version <= version }
                return ready.map(\.continuation)
            }
            for continuation in released { continuation.resume(returning: ok) }
        }
    }
}
