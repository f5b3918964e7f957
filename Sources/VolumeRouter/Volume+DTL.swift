// A volume's DTL settings (docs/design.md, "Distributed transaction log"): the record on the backend that says how
// the volume is mirrored and where it stands (so a router taking it over knows where to fetch and what it may have
// lost), starting and stopping the mirror, and installing journals fetched from the peer at a takeover.

import FlashIO
package import Foundation
import Logging
package import NIOCore
package import ObjectStore
import Synchronization
import TransactionLog
package import VolumeCore

/// How a volume's writes are mirrored.
package enum DTLMode: String, Sendable, Codable, CaseIterable {
    case sync
    case async
    case none
}

/// Where a volume's mirror stands.
package enum DTLState: String, Sendable, Codable {
    /// The peer holds every write the backend lacks.
    case inSync = "in_sync"
    /// Connected; resending what the backend lacks.
    case catchingUp = "catching_up"
    /// No peer: writes continue on local flash only.
    case degraded
    /// Mode `none`.
    case off
}

/// How routers reach DTL peers (from the router's configuration).
package struct DTLNetwork: Sendable {
    package var token: String
    package var group: any EventLoopGroup
    /// HOST and port of node NAME's DTL service (its node record).
    package var resolve: @Sendable (String) async throws(VDError) -> (host: String, port: Int)
    /// A peer that does not answer an append or a sync within this is treated as lost (the volume degrades).
    package var timeoutSeconds: Double = 5
    /// In `async` mode, writes wait once this many bytes are unanswered.
    package var asyncLagBytesMax: UInt64 = 64 << 20
    /// A degraded mirror tries to reconnect this often.
    package var retrySeconds: Double = 1
    /// A node to be the peer of a volume owned here, other than the one named (nil: none known).
    package var choosePeer: @Sendable (_ excluding: String) async throws(VDError) -> String? = { _ in nil }

    package init(
        token: String, group: any EventLoopGroup,
        resolve: @escaping @Sendable (String) async throws(VDError) -> (host: String, port: Int)
    ) {
        self.token = token
        self.group = group
        self.resolve = resolve
    }
}

/// What `vd volume info` and metrics show of a volume's mirror.
package struct DTLStatus: Sendable, Codable, Equatable {
    package var mode: DTLMode
    package var peer: String?
    package var state: DTLState
    /// Bytes sent to the peer and not yet answered.
    package var unansweredBytes: UInt64
    /// Why the mirror is degraded (the last failure).
    package var lastError: String?

    package static let off = DTLStatus(mode: .none, peer: nil, state: .off, unansweredBytes: 0, lastError: nil)
}

/// `NAME/dtl` on the backend: the volume's mirror mode, its peer, and its last recorded state.
package struct DTLRecord: Codable, Sendable, Equatable {
    package var mode: DTLMode
    /// The peer's node name (nil with mode `none`).
    package var peer: String?
    /// `degraded` from before the owner replied to anything without the peer until the peer is in sync again.
    package var state: DTLState
    /// The owner generation that wrote the record.
    package var generation: UInt64
    package var changedAt: Date
    /// Every epoch through this one was on the backend when the record was written.
    package var storedThrough: UInt64

    package init(
        mode: DTLMode, peer: String?, state: DTLState, generation: UInt64, changedAt: Date, storedThrough: UInt64
    ) {
        self.mode = mode
        self.peer = peer
        self.state = state
        self.generation = generation
        self.changedAt = changedAt
        self.storedThrough = storedThrough
    }

    package static func load(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) -> DTLRecord? {
        do {
            return try MetadataRecord.decode(
                DTLRecord.self, from: try await backend.get(layout.dtlObject), kind: .dtlRecord,
                what: layout.dtlObject)
        } catch  where error.code == .notFound {
            return nil
        }
    }

    package func write(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) {
        try await backend.replace(layout.dtlObject, data: try MetadataRecord.encode(self, kind: .dtlRecord))
    }
}

extension Volume {
    /// The mirror's mode, peer and state (`off` without one).
    package var dtlStatus: DTLStatus { journal.mirror?.status ?? .off }

    /// Mirrors the volume to `peer` in `mode` from now on (`none`: stops mirroring). The mirror is swapped with the
    /// journal's leader rights: every range written from then on reaches the new mirror, and everything before it
    /// that the backend lacks is in its catch-up.
    package func startDTL(mode: DTLMode, peer: String?, network: DTLNetwork) async throws(VDError) {
        var created: DTLMirror?
        if mode != .none {
            guard let peer else { throw VDError(.invalidArgument, "a DTL mode other than none needs a peer") }
            let generation = ownerLease?.generation ?? 1
            let (layout, backend, env, logger, config) = (self.layout, self.backend, self.env, self.logger, self.config)
            let uploader = self.uploader
            let record: @Sendable (DTLState) async -> Void = { [weak self] state in
                guard let self, self.mayWriteMetadata else { return }
                let entry = DTLRecord(
                    mode: mode, peer: peer, state: state, generation: generation, changedAt: env.clock.wallNow(),
                    storedThrough: uploader.storedThrough.rawValue)
                let written = await env.firstWithin(seconds: network.timeoutSeconds) { () async throws(VDError) in
                    try await entry.write(layout: layout, backend: backend)
                }
                if !written {
                    logger.warning(
                        "volume \(config.name): could not record the DTL state \(state.rawValue) on the backend within \(network.timeoutSeconds) s"
                    )
                }
            }
            created = DTLMirror(
                mode: mode, peer: peer, volumeID: config.id, volumeName: config.name, generation: generation,
                clusterSizeBytes: config.clusterSizeBytes, layout: layout, network: network, env: env, logger: logger,
                storedThrough: uploader.storedThrough.rawValue, journals: [:], record: record)
        }
        let mirror = created
        let previous = Mutex<DTLMirror?>(nil)
        try await journal.exclusive { [self] (_) throws(VDError) in
            if let mirror {
                for (epoch, local) in try await localJournalsNotStored() {
                    mirror.seed(epoch: epoch, local)
                }
            }
            previous.withLock {
                $0 = journal.mirrorBox.withLock { box in
                    defer { box = mirror }
                    return box
                }
            }
        }
        await previous.withLock { $0 }?.stop()
        mirror?.start()
        logger.info("volume \(config.name): DTL mode \(mode.rawValue)\(peer.map { ", peer \($0)" } ?? "")")
    }

    func stopMirror() async {
        let mirror = journal.mirrorBox.withLock { box in
            defer { box = nil }
            return box
        }
        await mirror?.stop()
    }

    /// The journal of every epoch the backend lacks (leader only: the open journal's length is exact).
    private func localJournalsNotStored() async throws(VDError) -> [UInt64: DTLMirror.LocalJournal] {
        journal.assertLeader()
        let stored = uploader.storedThrough.rawValue
        let open = journal.state
        var journals: [UInt64: DTLMirror.LocalJournal] = [
            open.epoch: DTLMirror.LocalJournal(sco: open.sco, lengthBytes: open.writeOffset)
        ]
        guard open.epoch > stored + 1 else { return journals }
        let (fs, directory) = (env.fs, layout.tlogDirectory)
        for epoch in (stored + 1)..<open.epoch {
            if let unsealed = journal.unsealedJournal(epoch) {
                journals[epoch] = DTLMirror.LocalJournal(sco: unsealed.sco, lengthBytes: nil)
                continue
            }
            // Sealed: its TLog (written before the journal leaves the unsealed set) names the SCO and its length.
            let tlog = try await blocking { () throws(VDError) -> TLog? in
                try TLogFiles.read(SCONumber(epoch), directory: directory, fs: fs)
            }
            let sealed = tlog?.records.lazy.compactMap { record -> DTLMirror.LocalJournal? in
                guard case .scoSealed(let sco, let length, _) = record else { return nil }
                return DTLMirror.LocalJournal(sco: sco, lengthBytes: length)
            }.first
            if let sealed {
                journals[epoch] = sealed
            } else if uploader.storedThrough.rawValue < epoch {
                logger.warning("volume \(config.name): the journal of epoch \(epoch) was not found for the DTL peer")
            }
        }
        return journals
    }
}

extension Environment {
    /// Runs `operation`; true if it succeeded within `seconds` (it is left running otherwise).
    func firstWithin(
        seconds: Double, _ operation: @escaping @Sendable () async throws(VDError) -> Void
    ) async -> Bool {
        let outcome = Mutex<(done: Bool, continuation: UnsafeContinuation<Bool, Never>?)>((false, nil))
        let finish: @Sendable (Bool) -> Void = { value in
            let continuation = outcome.withLock { state -> UnsafeContinuation<Bool, Never>? in
                guard !state.done else { return nil }
                state.done = true
                defer { state.continuation = nil }
                return state.continuation
            }
            continuation?.resume(returning: value)
        }
        return await withUnsafeContinuation { continuation in
            outcome.withLock { $0.continuation = continuation }
            let clock = self.clock
            let work = tasks.spawn {
                do throws(VDError) {
                    try await operation()
                    finish(true)
                } catch {
                    finish(false)
                }
            }
            _ = work
            _ = tasks.spawn {
                await clock.sleep(for: .seconds(seconds))
                finish(false)
            }
        }
    }
}

/// Journals fetched from a DTL peer at a takeover, installed as local journals of the taking router's generation.
enum PeerJournals {
    /// What was installed.
    struct Installed: Sendable {
        var epochs: [UInt64] = []
        var bytes: UInt64 = 0
        /// The last installed journal was sealed (else it was the open journal when the owner was lost).
        var lastSealed = false
    }

    /// Writes the fetched journals of the epochs right after `after`, in order and without a gap, into the volume's
    /// SCO directory under new numbers from `firstNumber` on. Each must verify exactly as a local journal in
    /// recovery (its valid prefix is kept); every batch header is rewritten for its new number (the headers name
    /// the SCO and chain by CRC; payloads are unchanged). A fenced owner's late upload of the same journal under
    /// its own number can therefore never collide with what this generation stores.
    static func install(
        _ fetched: [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)], after: UInt64, firstNumber: SCONumber,
        config: VolumeConfig, layout: VolumeLayout, fs: any FileSystem, logger: Logger
    ) throws(VDError) -> Installed {
        var byEpoch: [UInt64: (sco: SCONumber, bytes: ByteBuffer)] = [:]
        for journal in fetched where journal.epoch > after {
            // Two journals claiming one epoch: the newer (higher number) is history, as in recovery.
            if let other = byEpoch[journal.epoch], other.sco > journal.sco { continue }
            byEpoch[journal.epoch] = (journal.sco, journal.bytes)
        }
        var installed = Installed()
        var epoch = after + 1
        var number = firstNumber
        while let journal = byEpoch[epoch] {
            let temporary = layout.scoDirectory + "/peer-journal-\(epoch).tmp"
            let file = try fs.open(temporary, options: [.create, .truncate])
            defer { file.close() }
            try journal.bytes.withUnsafeReadableBytes { (raw) throws(VDError) in try file.write(raw, at: 0) }
            let scan: JournalScan
            do throws(VDError) {
                scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: journal.sco, clusterSizeBytes: config.clusterSizeBytes)
            } catch {
                logger.warning(
                    "volume \(config.name): the DTL peer's journal of epoch \(epoch) does not verify: \(error.message)")
                try fs.unlinkIfPresent(temporary)
                break
            }
            guard scan.header.epoch == epoch else {
                logger.warning("volume \(config.name): the DTL peer's journal of epoch \(epoch) names another epoch")
                try fs.unlinkIfPresent(temporary)
                break
            }
            try file.truncate(to: scan.validLength)
            let header = SCOHeader(
                volumeID: config.id, sco: number, clusterSizeBytes: config.clusterSizeBytes, epoch: epoch
            ).encode()
            try header.withUnsafeReadableBytes { (raw) throws(VDError) in try file.write(raw, at: 0) }
            var chain = BatchHeader.storedCRC(of: header)
            for batch in scan.batches {
                let encoded = BatchHeader(
                    volumeID: config.id, sco: number, offset: batch.offset, previousCRC: chain,
                    flags: batch.header.flags, entries: batch.header.entries
                ).encode()
                try encoded.withUnsafeReadableBytes { (raw) throws(VDError) in try file.write(raw, at: batch.offset) }
                chain = BatchHeader.storedCRC(of: encoded)
            }
            try file.sync()
            try fs.rename(temporary, layout.scoPath(number))
            try fs.syncDirectory(layout.scoDirectory)
            installed.epochs.append(epoch)
            installed.bytes += scan.validLength
            installed.lastSealed = scan.isSealed
            logger.info(
                "volume \(config.name): epoch \(epoch) recovered from the DTL peer (\(scan.validLength) bytes, \(scan.isSealed ? "sealed" : "open at the loss")) as SCO \(number.hex)"
            )
            number = number.next
            epoch += 1
            if !scan.isSealed { break }
        }
        return installed
    }
}
