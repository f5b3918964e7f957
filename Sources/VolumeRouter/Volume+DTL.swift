// A volume's DTL settings (docs/design.md, "Distributed transaction log"): the record on the backend that says how
// the volume is mirrored and where it stands (so a router taking it over knows where to fetch and what it may have
// lost), starting and stopping the mirror, and installing journals fetched from the peer at a takeover.

package import DTL
import FlashIO
package import Foundation
import Logging
package import NIOCore
package import NIOSSL
package import ObjectStore
import Scrubber
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

/// How routers reach DTL peers (from the router's configuration, or a simulation's links).
package struct DTLNetwork: Sendable {
    /// Connects to node NAME's DTL service for a volume, as its owner (or taker) of a generation.
    package var connect:
        @Sendable (_ node: String, _ volume: VolumeID, _ generation: UInt64) async throws(VDError) -> any DTLConnection
    /// A peer that does not answer an append or a sync within this is treated as lost (the volume degrades).
    package var timeoutSeconds: Double = 5
    /// In `async` mode, writes wait once this many bytes are unanswered.
    package var asyncLagBytesMax: UInt64 = 64 << 20
    /// A degraded mirror tries to reconnect this often.
    package var retrySeconds: Double = 1
    /// A node to be the peer of a volume owned here, other than the one named (nil: none known).
    package var choosePeer: @Sendable (_ excluding: String) async throws(VDError) -> String? = { _ in nil }

    package init(
        connect:
            @escaping @Sendable (_ node: String, _ volume: VolumeID, _ generation: UInt64) async throws(VDError) ->
            any DTLConnection
    ) {
        self.connect = connect
    }

    /// Over TCP with the cluster token (under TLS with `tls`); `resolve` gives node NAME's DTL address (its node
    /// record).
    package static func tcp(
        token: String, group: any EventLoopGroup, tls: NIOSSLContext? = nil,
        resolve: @escaping @Sendable (String) async throws(VDError) -> (host: String, port: Int)
    ) -> DTLNetwork {
        DTLNetwork { (node, volume, generation) throws(VDError) -> any DTLConnection in
            let (host, port) = try await resolve(node)
            return try await DTLClient.connect(
                host: host, port: port, token: token, volumeID: volume, generation: generation, group: group,
                tls: tls)
        }
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

/// `NAME/dtl-state/N` on the backend (the newest version counts): the volume's mirror mode, its peer, and its last
/// recorded state.
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

    /// The newest version of the volume's record (nil: never written). A version damaged on the way is read again
    /// a few times, never replaced by an older one.
    package static func load(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) -> DTLRecord? {
        let versions = SequencedRecord(store: backend, prefix: layout.dtlRecordPrefix)
        if let (_, record) = try await versions.readVerified({ (version, data) throws(VDError) in
            try MetadataRecord.decode(DTLRecord.self, from: data, kind: .dtlRecord, what: versions.name(of: version))
        }) {
            return record
        }
        do {
            // A volume whose record predates the versions. Bytes damaged on the way are read again
            // (NamespaceObjects.getVerified).
            return try await NamespaceObjects.getVerified(layout.legacyDTLObject, backend: backend) {
                (data) throws(VDError) -> DTLRecord in
                try MetadataRecord.decode(DTLRecord.self, from: data, kind: .dtlRecord, what: layout.legacyDTLObject)
            }
        } catch  where error.code == .notFound {
            return nil
        }
    }

    /// Writes this record as the version after the newest (create-only: `.conflict` when another writer created
    /// that version first; the caller retries). A PUT the client gave up on that the store applies later can only
    /// create an old version number, which readers never take over a newer one.
    package func write(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) {
        let versions = SequencedRecord(store: backend, prefix: layout.dtlRecordPrefix)
        let written = try await versions.write(
            try MetadataRecord.encode(self, kind: .dtlRecord), after: try await versions.versions().last)
        // Clean-up only (what is left is deleted by a later write, or with the volume).
        if written == 1 { try? await backend.delete(layout.legacyDTLObject) }
        try? await versions.prune(newest: written)
    }
}

extension Volume {
    /// The mirror's mode, peer and state (`off` without one; a mode without a known peer is degraded).
    package var dtlStatus: DTLStatus {
        journal.mirror?.status ?? dtlWithoutMirror.withLock { $0 } ?? .off
    }

    /// The one writer of the volume's DTL record.
    var dtlRecorder: DTLRecorder {
        dtlRecorderBox.withLock { box in
            if let recorder = box { return recorder }
            let (layout, backend) = (self.layout, self.backend)
            let recorder = DTLRecorder(
                env: env, logger: logger, mayWrite: { [weak self] in self?.mayWriteMetadata ?? false },
                write: { (record) throws(VDError) in try await record.write(layout: layout, backend: backend) })
            box = recorder
            return recorder
        }
    }

    /// Mirrors the volume to `peer` in `mode` from now on (`none`: stops mirroring; a mode without a peer: recorded
    /// as degraded, nothing mirrored). The new settings are on the backend before anything is replied under them;
    /// the mirror is swapped with the journal's leader rights: every range written from then on reaches the new
    /// mirror, and everything before it that the backend lacks is in its catch-up.
    package func startDTL(mode: DTLMode, peer: String?, network: DTLNetwork) async throws(VDError) {
        let generation = ownerLease?.generation ?? 1
        let (env, uploader) = (self.env, self.uploader)
        let makeRecord: @Sendable (DTLState) -> DTLRecord = { state in
            DTLRecord(
                mode: mode, peer: mode == .none ? nil : peer, state: state, generation: generation,
                changedAt: env.clock.wallNow(), storedThrough: uploader.storedThrough.rawValue)
        }
        let previous = journal.mirror
        // Retired in the same step as the request: a degradation of the previous mirror meanwhile waits for this
        // record (not in sync) before it lets writes go on without its peer.
        let (recorder, record) = (dtlRecorder, makeRecord(mode == .none ? .off : .degraded))
        let version = previous?.retire { recorder.request(record) } ?? recorder.request(record)
        guard await recorder.written(version) else {
            previous?.unretire()
            throw VDError(
                .shutdown, "volume \(config.name): the DTL settings cannot be recorded (the lease is not valid)")
        }
        var created: DTLMirror?
        if mode != .none, let peer {
            created = DTLMirror(
                mode: mode, peer: peer, volumeID: config.id, volumeName: config.name, generation: generation,
                clusterSizeBytes: config.clusterSizeBytes, layout: layout, network: network, env: env, logger: logger,
                storedThrough: uploader.storedThrough.rawValue, recorder: dtlRecorder, makeRecord: makeRecord,
                mayServe: { [weak self] in self?.mayWriteMetadata ?? false })
        }
        dtlWithoutMirror.withLock {
            $0 =
                mode != .none && peer == nil
                ? DTLStatus(
                    mode: mode, peer: nil, state: .degraded, unansweredBytes: 0,
                    lastError: "no DTL peer other than this node is known") : nil
        }
        let mirror = created
        try await journal.exclusive { [self] (_) throws(VDError) in
            if let mirror {
                for (epoch, local) in try await localJournalsNotStored() { mirror.seed(epoch: epoch, local) }
            }
            journal.mirrorBox.withLock { $0 = mirror }
        }
        await previous?.stop()
        mirror?.start()
        logger.info("volume \(config.name): DTL mode \(mode.rawValue)\(peer.map { ", peer \($0)" } ?? "")")
    }

    /// Stops the mirror without flushing (tests that lose the node).
    func stopMirror() async {
        let mirror = journal.mirrorBox.withLock { box in
            defer { box = nil }
            return box
        }
        mirror?.retire()
        await mirror?.stop()
    }

    /// At close, once every replied write is durable here: the peer makes everything durable too (or the mirror
    /// degrades and records it), then the mirror stops.
    func flushAndStopMirror() async {
        guard let mirror = journal.mirror else { return }
        await mirror.flush()
        mirror.retire()
        journal.mirrorBox.withLock { $0 = nil }
        await mirror.stop()
    }

    /// The journal of every epoch the backend lacks (leader only: the open journal's length is exact). A journal
    /// that cannot be found fails the start: a mirror must never be in sync without it.
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
                throw VDError(
                    .notFound, "volume \(config.name): the journal of epoch \(epoch) was not found for the DTL peer")
            }
        }
        return journals
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
