import DTL
import FlashIO
import Foundation
import Logging
import NIOCore
import NIOPosix
import ObjectStore
import SCOCache
import Testing
import VolumeCore
import VolumeTesting

@testable import VolumeRouter

/// The owner's DTL mirror against a real peer service on loopback, and a takeover that rebuilds the volume from the
/// backend plus the peer's journals after the owner's flash is gone.
@Suite(.serialized) struct DTLMirrorTests {
    static let token = "dtl-mirror-test-token-0123"

    /// A DTL peer service on 127.0.0.1 (its store in `directory`).
    final class Peer: @unchecked Sendable {
        let directory: String
        let pool: NIOThreadPool
        var store: DTLStore
        var server: DTLServer
        var port: Int

        init(directory: String, port: Int = 0) async throws {
            self.directory = directory
            pool = NIOThreadPool(numberOfThreads: 2)
            pool.start()
            store = try DTLStore(directory: directory, bytesPerVolumeMax: 256 << 20, fs: PosixFileSystem())
            server = DTLServer(
                host: "127.0.0.1", port: port, token: DTLMirrorTests.token, store: store, pool: pool,
                group: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "peer"))
            try await server.start()
            self.port = try #require(server.localPort)
        }

        func stop() async {
            await server.stop()
            store.close()
        }

        /// Starts again on the same port, with an empty store when `emptied` (a peer that lost its flash).
        func restart(emptied: Bool) async throws {
            if emptied { try Syscall.removeTree(directory) }
            store = try DTLStore(directory: directory, bytesPerVolumeMax: 256 << 20, fs: PosixFileSystem())
            server = DTLServer(
                host: "127.0.0.1", port: port, token: DTLMirrorTests.token, store: store, pool: pool,
                group: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "peer"))
            try await server.start()
        }

        func shutdown() async {
            await stop()
            try? await pool.shutdownGracefully()
        }

        var network: DTLNetwork {
            let port = self.port
            var network = DTLNetwork.tcp(token: DTLMirrorTests.token, group: MultiThreadedEventLoopGroup.singleton) {
                (_) throws(VDError) -> (host: String, port: Int) in ("127.0.0.1", port)
            }
            network.timeoutSeconds = 1
            network.retrySeconds = 0.1
            return network
        }

        /// What a taker of `generation` gets (`complete`: the record said in sync).
        func source(generation: UInt64, volumeID: VolumeID, complete: Bool = true) -> PeerJournalSource {
            let port = self.port
            return { (after) throws(VDError) -> FetchedJournals in
                let client = try await DTLClient.connect(
                    host: "127.0.0.1", port: port, token: DTLMirrorTests.token, volumeID: volumeID,
                    generation: generation, group: MultiThreadedEventLoopGroup.singleton)
                let journals = try await client.fetch(afterEpoch: after)
                await client.close()
                return FetchedJournals(journals: journals, complete: complete, peer: "p")
            }
        }
    }

    static func waitFor(
        _ what: String, timeoutSeconds: Double = 20, _ condition: () -> Bool
    ) async throws {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while !condition() {
            guard Date() < deadline else { throw VDError(.timeout, "timed out waiting for \(what)") }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// The owner's flash is gone (its volume is not closed cleanly: nothing more is uploaded); a router of the next
    /// generation opens the volume from the backend and the peer.
    static func loseOwnerAndTakeOver(
        _ harness: VolumeHarness, peer: Peer, generation: UInt64, complete: Bool = true
    ) async throws -> Volume {
        await harness.volume.stopMirror()
        harness.volume.uploader.stop()
        _ = await harness.volume.close()
        harness.volume = nil
        try Syscall.removeTree(harness.root + "/flash")
        harness.cache = FlashCache(capacityBytes: 1 << 30, aio: nil, logger: Logger(label: "test"))
        let volume = try await Volume.open(
            config: harness.config, layout: harness.layout, options: harness.options, backend: harness.backend,
            cache: harness.cache, env: harness.env, logger: Logger(label: "taker"),
            generation: OwnerGeneration(generation: generation, node: "taker"),
            peerJournals: peer.source(generation: generation, volumeID: harness.config.id, complete: complete))
        harness.volume = volume
        return volume
    }

    /// A peer for the harness's volume, mirrored in sync mode and in sync.
    static func mirrored(_ harness: VolumeHarness) async throws -> Peer {
        let peer = try await Peer(directory: harness.root + "/peer")
        try await harness.volume.startDTL(mode: .sync, peer: "p", network: peer.network)
        try await waitFor("in sync") { harness.volume.dtlStatus.state == .inSync }
        return peer
    }

    @Test func flushedWritesSurviveTheOwnersLossThroughThePeer() async throws {
        let backend = FaultyObjectStore(wrapping: MemoryStore())
        let harness = try await VolumeHarness(scoSizeBytes: 1 << 20, backend: backend) {
            $0.uploadAgeSecondsMax = 3600
        }
        let peer = try await Self.mirrored(harness)

        // Enough to roll twice (1 MiB SCOs), so epochs are stored, sealed-not-stored and open at the loss.
        var expected: [UInt64: ByteBuffer] = [:]
        for index in 0..<40 {
            let offset = UInt64((index * 7919) % 1000) * 65536
            let data = pattern(65536, seed: UInt64(index))
            try await harness.volume.write(offset: offset, data: data, fua: false)
            expected[offset] = data
            if index % 10 == 9 { try await harness.volume.flush() }
            if index == 9 {
                // From here on TLogs do not reach the backend: sealed epochs wait on local flash (and the peer).
                try await harness.waitUntilStored()
                backend.inject(
                    .fail(VDError(.backend, "held back")), count: 100_000, on: [.put], namePrefix: "vol1/tlog/")
            }
        }
        try await harness.volume.flush()
        #expect(harness.volume.journal.openEpoch >= 3)
        let storedBefore = harness.volume.uploadStatus.storedThrough.rawValue
        #expect(storedBefore + 2 <= harness.volume.journal.openEpoch)
        let openEpoch = harness.volume.journal.openEpoch
        #expect(harness.volume.dtlStatus.state == .inSync)

        backend.clearFaults()
        let volume = try await Self.loseOwnerAndTakeOver(harness, peer: peer, generation: 2)
        for (offset, data) in expected {
            #expect(try await volume.read(offset: offset, length: 65536) == data, "offset \(offset)")
        }
        // The recovered epochs are the new generation's: its SCO numbers and its TLog names.
        #expect(volume.journal.openEpoch > openEpoch)
        #expect(volume.generations.start(of: 2) != nil)
        #expect(volume.journal.state.sco.rawValue > GenerationChain.numberBase(of: 2))
        try await harness.waitUntilStored()
        let tlogs = try await backend.list(prefix: "vol1/tlog/").map(\.name)
        let tagged = tlogs.filter { $0.hasSuffix("." + SCONumber(2).hex) }
        // At least a sealed epoch whose TLog was held back and the epoch open at the loss came from the peer; every
        // epoch of the history has its TLog.
        #expect(tagged.count >= 2, "\(tlogs)")
        let epochs = Set(tlogs.compactMap { harness.layout.parseTLogObject($0)?.epoch })
        #expect(Set(1..<openEpoch).isSubset(of: epochs), "\(tlogs)")
        await harness.shutdown()
        await peer.shutdown()
    }

    @Test func aLostPeerDegradesThenCatchesUpAndProtectsAgain() async throws {
        let harness = try await VolumeHarness(scoSizeBytes: 1 << 20) { $0.uploadAgeSecondsMax = 3600 }
        let peer = try await Self.mirrored(harness)
        var expected: [UInt64: ByteBuffer] = [:]
        for index in 0..<8 {
            let data = pattern(65536, seed: 100 + UInt64(index))
            try await harness.volume.write(offset: UInt64(index) * 65536, data: data, fua: index % 4 == 3)
            expected[UInt64(index) * 65536] = data
        }

        // The peer goes away with its flash: writes and flushes go on, degraded, within the timeout.
        await peer.stop()
        let started = Date()
        for index in 8..<16 {
            let data = pattern(65536, seed: 100 + UInt64(index))
            try await harness.volume.write(offset: UInt64(index) * 65536, data: data, fua: true)
            expected[UInt64(index) * 65536] = data
        }
        #expect(Date().timeIntervalSince(started) < 10)
        #expect(harness.volume.dtlStatus.state == .degraded)
        #expect(harness.volume.dtlStatus.lastError != nil)

        // It returns empty: the owner sends everything the backend lacks again.
        try await peer.restart(emptied: true)
        try await Self.waitFor("caught up") { harness.volume.dtlStatus.state == .inSync }
        for index in 16..<24 {
            let data = pattern(65536, seed: 100 + UInt64(index))
            try await harness.volume.write(offset: UInt64(index) * 65536, data: data, fua: false)
            expected[UInt64(index) * 65536] = data
        }
        try await harness.volume.flush()

        let volume = try await Self.loseOwnerAndTakeOver(harness, peer: peer, generation: 2)
        for (offset, data) in expected.sorted(by: { $0.key < $1.key }) {
            #expect(try await volume.read(offset: offset, length: 65536) == data, "offset \(offset)")
        }
        await harness.shutdown()
        await peer.shutdown()
    }

    /// S13 (docs/simulation.md): a rollback recovered from the peer whose table change never reached the backend.
    /// The snapshots it deleted must not come back: they would read versions the rollback no longer keeps.
    @Test func aRollbackRecoveredFromThePeerDeletesTheSnapshotsItDeleted() async throws {
        let backend = FaultyObjectStore(wrapping: MemoryStore())
        let harness = try await VolumeHarness(scoSizeBytes: 1 << 20, backend: backend) {
            $0.uploadAgeSecondsMax = 3600
        }
        let peer = try await Self.mirrored(harness)
        let first = pattern(65536, seed: 1)
        try await harness.volume.write(offset: 0, data: first, fua: true)
        _ = try await harness.volume.createSnapshot(named: "s1")
        try await harness.waitUntilStored()
        try await Self.waitFor("table stored") { !harness.volume.catalog.needsUpload }
        // From here on no TLog reaches the backend; the table with s2 does, the rollback's does not.
        backend.inject(.fail(VDError(.backend, "held back")), count: 100_000, on: [.put], namePrefix: "vol1/tlog/")
        let second = pattern(65536, seed: 2)
        try await harness.volume.write(offset: 0, data: second, fua: true)
        let s2 = try await harness.volume.createSnapshot(named: "s2")
        try await Self.waitFor("table with s2 stored") { !harness.volume.catalog.needsUpload }
        backend.inject(
            .fail(VDError(.backend, "held back")), count: 100_000, on: [.put], namePrefix: "vol1/snapshots/")
        _ = try await harness.volume.rollback(toSnapshot: "s1")
        try await harness.volume.write(offset: 65536, data: pattern(65536, seed: 3), fua: true)
        #expect(harness.volume.snapshotTable.snapshot(named: "s2") == nil)

        backend.clearFaults()
        let volume = try await Self.loseOwnerAndTakeOver(harness, peer: peer, generation: 2)
        #expect(volume.snapshotTable.snapshot(named: "s2") == nil, "s2 (epoch \(s2.epoch)) came back")
        #expect(
            volume.snapshotTable.rollbacks.contains { $0.toEpoch == volume.snapshotTable.snapshot(named: "s1")?.epoch })
        #expect(try await volume.read(offset: 0, length: 65536) == first)
        await harness.shutdown()
        await peer.shutdown()
    }

    @Test func withoutThePeerTheTakeoverHasOnlyTheBackend() async throws {
        // The control of the two tests above: the same loss without a mirror loses what was not uploaded.
        let harness = try await VolumeHarness(scoSizeBytes: 1 << 20) { $0.uploadAgeSecondsMax = 3600 }
        let peer = try await Peer(directory: harness.root + "/peer")
        let data = pattern(65536, seed: 7)
        try await harness.volume.write(offset: 0, data: data, fua: true)
        let volume = try await Self.loseOwnerAndTakeOver(harness, peer: peer, generation: 2, complete: false)
        #expect(try await volume.read(offset: 0, length: 65536) != data)
        await harness.shutdown()
        await peer.shutdown()
    }
}
