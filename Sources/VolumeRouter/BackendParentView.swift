// A clone's parent owned by another router, read from the backend alone (docs/design.md "Clones across owners").
//
// What a clone reads of its parent is the parent at one snapshot: its TLogs up to that epoch and the SCOs they
// name are immutable on the backend, and the snapshot cannot be deleted while the clone is registered in it. The
// view replays the parent's namespace (its generation chain, TLogs, scrub results and snapshot table) into a
// temporary map with the scrubber's own code (`NamespaceReplay`) and reads clusters from the backend SCOs, caching
// fetched windows in the router's flash cache under a private id.
//
// The one thing that moves under it is the owner's scrubber: it copies live clusters of the snapshot to new SCOs
// and, once the TLog that applies the result is stored and a grace period has passed, deletes the sources. A read
// that finds an SCO gone replays the namespace again (the applying TLog is on the backend by then) and reads once
// more. A replay that no longer finds the snapshot ends the view: reads fail, never return another version's data.
// Nothing here writes to the backend.

import BlockMap
package import FlashIO
package import Logging
import NIOCore
package import ObjectStore
package import SCOCache
import Scrubber
import Synchronization
package import VolumeCore

package final class BackendParentView: CloneParentSource, MapBackedReads {
    package let name: VolumeName
    /// The snapshot of the parent the clone reads (the view serves this epoch only).
    let snapshotName: String
    let snapshotEpoch: UInt64
    let clusterBytes: Int
    let parent: ParentLink?
    private let backend: any ObjectStore
    let reader: BackendSCOReader
    private let workDirectory: String
    private let env: Environment
    private let logger: Logger

    /// One replay of the parent's namespace, closed once it is replaced and no read uses it any more.
    private final class Replay: Sendable {
        let replay: NamespaceReplay
        let number: Int
        init(_ replay: NamespaceReplay, number: Int) {
            self.replay = replay
            self.number = number
        }
    }

    private struct State {
        var current: Replay
        var users: [Int: Int] = [:]
        var retired: [Int: Replay] = [:]
        var refresh: Task<Void, Never>?
        var refreshFailure: VDError?
        var gone: VDError?
        var detached = false
    }

    private let state: Mutex<State>

    /// Builds the view of `name`@`snapshot` (epoch `epoch`) from `backend`: fails when the snapshot is not in the
    /// parent's table on the backend, or its TLogs are not all stored yet.
    package static func load(
        name: VolumeName, snapshot: String, epoch: UInt64, backend: any ObjectStore, cache: FlashCache,
        workDirectory: String, options: VolumeOptions, env: Environment, logger: Logger,
        resolveParent: (VolumeConfig.Parent) async throws(VDError) -> any CloneParentSource
    ) async throws(VDError) -> BackendParentView {
        try env.fs.makeDirectories(workDirectory)
        // The parent's own parent first: its addresses decide what the parent's unmaps hide in the replay.
        let config = try await NamespaceObjects.loadConfig(of: name, backend: backend)
        var parent: ParentLink?
        if let link = config.parent {
            parent = ParentLink(source: try await resolveParent(link), epoch: link.epoch)
        }
        let cacheVolume = VolumeID.random(using: env.random)
        let fetched = VolumeLayout(
            flashDirectory: workDirectory + "/fetched-" + cacheVolume.description, namespace: name.rawValue)
        let replay: NamespaceReplay
        do throws(VDError) {
            try env.fs.makeDirectories(fetched.fetchedDirectory)
            replay = try await replayChecked(
                name: name, snapshot: snapshot, epoch: epoch, backend: backend, workDirectory: workDirectory,
                parent: parent, env: env, logger: logger)
        } catch {
            parent?.detach()
            try? env.fs.removeTree(fetched.flashDirectory)
            throw error
        }
        let reader = BackendSCOReader(
            volumeID: config.id, volumeName: name, layout: fetched, backend: backend, cache: cache,
            cacheVolume: cacheVolume, readAheadBytes: options.readAheadBytes)
        var logger = logger
        logger[metadataKey: "parent"] = "\(name)@\(snapshot)"
        return BackendParentView(
            name: name, snapshot: snapshot, epoch: epoch, clusterBytes: Int(config.clusterSizeBytes),
            parent: parent, backend: backend, reader: reader, workDirectory: workDirectory, replay: replay, env: env,
            logger: logger)
    }

    private init(
        name: VolumeName, snapshot: String, epoch: UInt64, clusterBytes: Int, parent: ParentLink?,
        backend: any ObjectStore, reader: BackendSCOReader, workDirectory: String, replay: NamespaceReplay,
        env: Environment, logger: Logger
    ) {
        self.name = name
        snapshotName = snapshot
        snapshotEpoch = epoch
        self.clusterBytes = clusterBytes
        self.parent = parent
        self.backend = backend
        self.reader = reader
        self.workDirectory = workDirectory
        self.env = env
        self.logger = logger
        state = Mutex(State(current: Replay(replay, number: 0)))
    }

    /// A replay of the parent's namespace that holds the snapshot at its epoch, with every TLog through it.
    private static func replayChecked(
        name: VolumeName, snapshot: String, epoch: UInt64, backend: any ObjectStore, workDirectory: String,
        parent: ParentLink?, env: Environment, logger: Logger
    ) async throws(VDError) -> NamespaceReplay {
        var parentAddresses: ((ClusterAddress, ClusterAddress) throws(VDError) -> [ClusterAddress])?
        if let parent {
            parentAddresses = { (start, end) throws(VDError) in
                try parent.addressesPossiblyWithData(from: start, to: end)
            }
        }
        let replay = try await NamespaceReplay.load(
            volume: name, backend: backend, workDirectory: workDirectory, env: env, logger: logger,
            parentAddresses: parentAddresses, progress: { _ in })
        guard replay.contents.snapshots.snapshot(named: snapshot)?.epoch == epoch else {
            replay.close()
            throw VDError(
                .notFound,
                "\(name)@\(snapshot) (epoch \(epoch)) is not in the snapshot table of \(name) on \(backend.description)"
            )
        }
        guard let last = replay.contents.lastEpoch, last.rawValue >= epoch else {
            replay.close()
            throw VDError(
                .busy,
                "\(name)@\(snapshot) is not on \(backend.description) yet (its TLogs are stored through epoch \(replay.contents.lastEpoch?.rawValue ?? 0) of \(epoch)); retry once the owner has uploaded it"
            )
        }
        return replay
    }

    package var snapshotTable: SnapshotTable { state.withLock { $0.current.replay.contents.snapshots } }

    /// The parent's configuration (size, cluster size, its own parent).
    package var parentConfig: VolumeConfig { state.withLock { $0.current.replay.contents.config } }

    package func detach() {
        let replays = state.withLock { state -> [Replay] in
            state.detached = true
            state.gone = VDError(.shutdown, "the view of \(name)@\(snapshotName) was closed")
            var idle = state.retired.values.filter { (state.users[$0.number] ?? 0) == 0 }
            for replay in idle { state.retired[replay.number] = nil }
            if (state.users[state.current.number] ?? 0) == 0 { idle.append(state.current) }
            return idle
        }
        for replay in replays { replay.replay.close() }
        reader.cache.forget(volume: reader.cacheVolume)
        try? env.fs.removeTree(reader.layout.flashDirectory)
        parent?.detach()
    }

    // MARK: reads

    /// Runs `body` on the current replay; when an SCO it read is gone (a scrub of the owner deleted it after
    /// relocating its clusters), replays the namespace again and runs it once more.
    private func withReplay<T>(_ body: (BlockMap) async throws(VDError) -> T) async throws(VDError) -> T {
        var attempt = 0
        while true {
            attempt += 1
            let replay = try use()
            do {
                let result = try await body(replay.replay.map)
                done(with: replay)
                return result
            } catch {
                done(with: replay)
                guard error.code == .notFound, attempt == 1 else { throw error }
                logger.info("a parent SCO was gone (\(error.message)); replaying the parent's namespace again")
                try await refresh(replacing: replay.number)
            }
        }
    }

    private func use() throws(VDError) -> Replay {
        try state.withLock { (state) throws(VDError) -> Replay in
            if let gone = state.gone { throw gone }
            state.users[state.current.number, default: 0] += 1
            return state.current
        }
    }

    private func done(with replay: Replay) {
        let close = state.withLock { state -> Bool in
            state.users[replay.number, default: 1] -= 1
            guard state.users[replay.number] == 0 else { return false }
            state.users[replay.number] = nil
            if state.retired.removeValue(forKey: replay.number) != nil { return true }
            return state.detached && state.current.number == replay.number
        }
        if close { replay.replay.close() }
    }

    /// Replays the namespace again unless another read already replaced replay `number` (one replay at a time; the
    /// others wait for it).
    private func refresh(replacing number: Int) async throws(VDError) {
        let task = state.withLock { state -> Task<Void, Never>? in
            guard state.current.number == number, state.gone == nil else { return nil }
            if let running = state.refresh { return running }
            let task = env.tasks.spawn { [self] in
                do throws(VDError) {
                    let replay = try await Self.replayChecked(
                        name: name, snapshot: snapshotName, epoch: snapshotEpoch, backend: backend,
                        workDirectory: workDirectory, parent: parent, env: env, logger: logger)
                    install(replay)
                } catch {
                    // The view ends only when the snapshot itself is gone (an object missing for another reason,
                    // such as a scrub result deleted between listing and loading, is retried by the next read).
                    var gone = false
                    if error.code == .notFound { gone = await snapshotIsOnBackend() == false }
                    if gone { logger.error("\(error.message): reads through it fail") }
                    self.state.withLock { state in
                        state.refresh = nil
                        state.refreshFailure = error
                        if gone { state.gone = error }
                    }
                }
            }
            state.refresh = task
            return task
        }
        if let task { await task.value }
        try state.withLock { (state) throws(VDError) in
            if let gone = state.gone { throw gone }
            if state.current.number == number, let failure = state.refreshFailure { throw failure }
        }
    }

    /// Whether the parent's configuration and this snapshot (at its epoch) are on the backend (nil: the backend
    /// did not say).
    private func snapshotIsOnBackend() async -> Bool? {
        let layout = VolumeLayout(flashDirectory: "", namespace: name.rawValue)
        do throws(VDError) {
            guard try await backend.head(layout.configObject) != nil,
                let table = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: backend)
            else { return false }
            return table.snapshot(named: snapshotName)?.epoch == snapshotEpoch
        } catch {
            return nil
        }
    }

    private func install(_ replay: NamespaceReplay) {
        let previous = state.withLock { state -> Replay? in
            state.refresh = nil
            state.refreshFailure = nil
            guard !state.detached else { return nil }
            let old = state.current
            state.current = Replay(replay, number: old.number + 1)
            if (state.users[old.number] ?? 0) == 0 { return old }
            state.retired[old.number] = old
            return nil
        }
        if let previous { previous.replay.close() } else if state.withLock({ $0.detached }) { replay.close() }
    }

    package func readSparse(offset: UInt64, length: UInt32, atEpoch epoch: UInt64) async throws(VDError) -> SparseData {
        precondition(epoch == snapshotEpoch, "a parent view serves the epoch of its snapshot only")
        guard length > 0 else { return SparseData(data: ByteBuffer()) }
        let cs = UInt64(clusterBytes)
        let first = offset / cs
        let count = Int((offset + UInt64(length) - 1) / cs - first + 1)
        return try await withReplay { (map) async throws(VDError) -> SparseData in
            try await assemble(
                values: try values(first: first, count: count, atEpoch: epoch, in: map), first: first, offset: offset,
                length: length)
        }
    }

    package func allocation(
        offset: UInt64, length: UInt64, atEpoch epoch: UInt64?
    ) async throws(VDError) -> [BlockExtent] {
        precondition(epoch == snapshotEpoch, "a parent view serves the epoch of its snapshot only")
        return try await withReplay { (map) async throws(VDError) -> [BlockExtent] in
            try await mapAllocation(offset: offset, length: length, atEpoch: epoch, in: map)
        }
    }

    package func addressesPossiblyWithData(
        from start: ClusterAddress, to end: ClusterAddress
    ) throws(VDError) -> [ClusterAddress] {
        let replay = try use()
        defer { done(with: replay) }
        var addresses = try replay.replay.map.writtenAddresses(from: start, to: end).map(\.0)
        if let parent { addresses += try parent.addressesPossiblyWithData(from: start, to: end) }
        return addresses
    }

    package func content(_ address: ClusterAddress, atEpoch epoch: UInt64?) throws(VDError) -> ClusterContent {
        precondition(epoch == snapshotEpoch, "a parent view serves the epoch of its snapshot only")
        let replay = try use()
        defer { done(with: replay) }
        let id = replay.replay.contents.config.id
        if let value = try replay.replay.map.value(address, atEpoch: snapshotEpoch) {
            return ClusterContent(volume: id, location: value.location)
        }
        guard let parent else { return ClusterContent(volume: id, location: nil) }
        return try parent.content(address)
    }

    func readClusters(
        sco: SCONumber, offset: UInt32, crcs: [UInt32], firstAddress: ClusterAddress
    ) async throws(VDError) -> ByteBuffer {
        let length = crcs.count * clusterBytes
        if let cached = try await reader.cache.read(reader.cacheKey(sco), offset: UInt64(offset), length: length),
            firstMismatch(cached, crcs) == nil
        {
            return cached
        }
        return try await fetchVerified(
            sco: sco, offset: offset, crcs: crcs, firstAddress: firstAddress, from: reader, logger: logger)
    }
}
