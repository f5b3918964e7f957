// The distributed transaction log in the simulation: a DTL peer machine of its own (its simulated disk, the real
// `DTLStore` and `DTLPeerLogic`), and in-process links from owners to it that deliver frames in order, each after a
// simulated network delay, handled by the peer's process. The links can be cut (the network between owner and peer
// fails) and the peer can lose its disk; the owner then degrades, reconnects and catches the peer up. A node that
// loses its flash (or is taken over) recovers from the peer the writes the backend lacks.

import DTL
import FlashIO
import Logging
import NIOCore
import Synchronization
import VolumeCore
import VolumeRouter

final class SimDTLPeer: @unchecked Sendable {
    static let node = "dtlpeer"
    static let directory = "/dtlpeer/dtl"
    let fs: SimFileSystem
    let scheduler: SimScheduler
    let process: SimProcess
    let logger: Logger
    private(set) var logic: DTLPeerLogic
    private var links: [SimDTLLink] = []

    init(scheduler: SimScheduler, logger: Logger) {
        self.scheduler = scheduler
        self.logger = logger
        fs = SimFileSystem(name: Self.node, scheduler: scheduler)
        process = scheduler.makeProcess("dtl-peer")
        process.role = "dtl-peer"
        logic = Self.makeLogic(fs: fs, logger: logger)
    }

    private static func makeLogic(fs: SimFileSystem, logger: Logger) -> DTLPeerLogic {
        // The simulated disk cannot fail to create a directory.
        let store = try! DTLStore(directory: directory, bytesPerVolumeMax: 64 << 20, fs: fs)
        return DTLPeerLogic(store: store, logger: logger)
    }

    /// A new link of an owner (or taker) of `generation` for `volume`, on `node` (whose journals its appends must
    /// match).
    func connect(volume: VolumeID, generation: UInt64, from node: SimNode) -> SimDTLLink {
        let link = SimDTLLink(
            peer: self, volumeID: volume, generation: generation, session: logic.newConnection(), owner: node)
        links.removeAll { $0.isEnded }
        links.append(link)
        return link
    }

    /// The network between the owners and the peer fails: every link ends (their owners degrade).
    func cutLinks(_ reason: String) {
        for link in links { link.end(reason) }
        links = []
    }

    /// The peer loses its disk and starts again empty.
    func loseDisk() {
        cutLinks("the DTL peer restarted")
        fs.wipe(Self.directory)
        logic = Self.makeLogic(fs: fs, logger: logger)
    }
}

/// One owner's link to the simulated peer: frames are handled in the order posted, by the peer's process.
final class SimDTLLink: DTLConnection, @unchecked Sendable {
    let volumeID: VolumeID
    let generation: UInt64
    private let session: UInt64
    private unowned let peer: SimDTLPeer
    private let owner: SimNode
    private let inbox = DTLInbox()
    private struct State {
        var queue: [DTLFrame] = []
        var draining = false
        var ended = false
        var appends: UInt64 = 0
    }
    private let state = Mutex(State())

    init(peer: SimDTLPeer, volumeID: VolumeID, generation: UInt64, session: UInt64, owner: SimNode) {
        self.peer = peer
        self.owner = owner
        self.volumeID = volumeID
        self.generation = generation
        self.session = session
    }

    var isEnded: Bool { state.withLock { $0.ended } }

    func post(_ frame: DTLFrame) {
        if frame.kind == .append { checkHeldLocally(frame) }
        let start = state.withLock { state -> Bool in
            guard !state.ended else { return false }
            state.queue.append(frame)
            defer { state.draining = true }
            return !state.draining
        }
        if start { _ = peer.process.spawn { [self] in await drain() } }
    }

    private func drain() async {
        while true {
            // The network's delay, then the peer handles the frame (its file I/O is simulated: no blocking).
            await peer.scheduler.sleep(for: .microseconds(Int64(peer.scheduler.between(50...3000))))
            let next = state.withLock { state -> (DTLFrame, UInt64)? in
                guard !state.ended, !state.queue.isEmpty else {
                    state.draining = false
                    return nil
                }
                let frame = state.queue.removeFirst()
                if frame.kind == .append { state.appends += 1 }
                return (frame, state.appends)
            }
            guard let (frame, appends) = next else { return }
            let replies = peer.logic.handle(frame, connection: session, appends: appends)
            guard !isEnded else { return }
            for reply in replies { inbox.deliver(.success(reply)) }
        }
    }

    /// The owner's journal file must hold what it mirrors already: a catch-up resends from that file the ranges the
    /// mirror recorded, so a range mirrored before its local write could put on the peer bytes the file does not hold
    /// yet (see `Journal.commit`). Both copies are in this process's memory here, so every append is compared (with
    /// the journal of that volume and SCO in any of the node's volume directories: a moved volume's stays renamed).
    private func checkHeldLocally(_ frame: DTLFrame) {
        guard peer.scheduler.currentProcess?.isAlive != false, let (offset, payload) = try? frame.appended() else {
            return
        }
        // Frames pass this link unencoded: the CRC a journal derived from its batches is checked here instead.
        if let known = frame.payloadCRC, known != frame.payloadParts.crc32c() {
            peer.scheduler.reportInvariantFailure(
                "\(owner.name) sent an append whose derived payload CRC does not match its bytes")
        }
        let bytes = payload.joined
        let sco = SCONumber(rawValue: frame.value)
        let end = Int(offset) + bytes.readableBytes
        var journals: [String] = []
        for volume in (try? owner.fs.listDirectory(owner.flashDirectory)) ?? [] {
            let path = VolumeLayout(flashDirectory: owner.flashDirectory + "/" + volume, namespace: "").scoPath(sco)
            guard let file = owner.fs.contents(path), file.count >= SCOFormat.blockBytes,
                let header = try? SCOHeader.decode(ByteBuffer(bytes: file[0..<SCOFormat.blockBytes]), what: path),
                header.volumeID == volumeID, header.sco == sco
            else { continue }
            if end <= file.count && file[Int(offset)..<end].elementsEqual(bytes.readableBytesView) { return }
            journals.append(path)
        }
        guard let path = journals.first else { return }
        peer.scheduler.reportInvariantFailure(
            "\(owner.name) mirrored bytes \(offset)..<\(end) of \(path) that its journal file does not hold")
    }

    func nextFrame() async throws(VDError) -> DTLFrame { try await inbox.next().get() }

    func listen(_ handler: @escaping @Sendable (Result<DTLFrame, VDError>) -> Void) { inbox.listen(handler) }

    func close() async { end("the DTL link was closed") }

    func end(_ reason: String) {
        let first = state.withLock { state -> Bool in
            defer {
                state.ended = true
                state.queue = []
            }
            return !state.ended
        }
        if first { inbox.deliver(.failure(VDError(.io, reason))) }
    }
}
