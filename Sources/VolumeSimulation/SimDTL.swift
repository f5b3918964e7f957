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

    /// A new link of an owner (or taker) of `generation` for `volume`.
    func connect(volume: VolumeID, generation: UInt64) -> SimDTLLink {
        let link = SimDTLLink(peer: self, volumeID: volume, generation: generation, session: logic.newConnection())
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
    private let inbox = DTLInbox()
    private struct State {
        var queue: [DTLFrame] = []
        var draining = false
        var ended = false
        var appends: UInt64 = 0
    }
    private let state = Mutex(State())

    init(peer: SimDTLPeer, volumeID: VolumeID, generation: UInt64, session: UInt64) {
        self.peer = peer
        self.volumeID = volumeID
        self.generation = generation
        self.session = session
    }

    var isEnded: Bool { state.withLock { $0.ended } }

    func post(_ frame: DTLFrame) {
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
