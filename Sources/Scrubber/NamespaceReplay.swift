// A volume as its backend namespace alone describes it: its configuration, snapshot table, scrub results and the
// contiguous prefix of its TLogs, replayed into a temporary RocksDB map with the same code the router uses
// (MapChanges). What the scrubber and `vd check` reason about.
//
// Liveness: a cluster version is live when the volume reads it now (the current value) or a snapshot that exists
// reads it (a history version whose epoch is at or below the snapshot and whose successor is after it). Nothing
// else is ever read again, so nothing else needs to be kept.

package import BlockMap
package import FlashIO
package import Logging
package import NIOCore
package import ObjectStore
import SnappyCodec
package import VolumeCore

package struct LiveVersion: Sendable {
    package var address: ClusterAddress
    package var epoch: UInt64
    package var location: ClusterLocation
}

/// What a namespace holds.
package struct NamespaceContents: Sendable {
    package var config: VolumeConfig
    package var snapshots: SnapshotTable
    /// Router SCOs with their sealed length and CRC (from the TLogs).
    package var routerSCOs: [SCONumber: (lengthBytes: UInt64, crc: UInt32)] = [:]
    /// Every scrub result, and which are applied (their marker object exists).
    package var results: [UInt64: ScrubResult] = [:]
    package var appliedResults: Set<UInt64> = []
    /// Object names present under the namespace's sco/ and tlog/ prefixes.
    package var scoObjects: [SCONumber: UInt64] = [:]
    package var tlogNumbers: [SCONumber] = []
    /// The contiguous prefix of TLogs replayed (nil: none).
    package var lastEpoch: SCONumber?

    /// Length and CRC of any SCO the history knows (router or scrub-written).
    package func scoInfo(_ sco: SCONumber) -> (lengthBytes: UInt64, crc: UInt32)? {
        if let info = routerSCOs[sco] { return info }
        for result in results.values {
            if let created = result.created.first(where: { $0.sco == sco.rawValue }) { return (created.lengthBytes, created.crc) }
        }
        return nil
    }

    /// Results not yet applied: their sources must not be touched and their new SCOs are not referenced yet.
    package var pendingResults: [ScrubResult] { results.values.filter { !appliedResults.contains($0.id) }.sorted { $0.id < $1.id } }
}

package final class NamespaceReplay: @unchecked Sendable {
    package let layout: VolumeLayout
    package let backend: any ObjectStore
    package let contents: NamespaceContents
    package let map: BlockMap
    private let database: any KeyValueStore
    private let directory: String
    private let env: Environment

    /// Loads and replays the namespace of `volume` into a temporary map under `workDirectory`.
    package static func load(
        volume: VolumeName, backend: any ObjectStore, workDirectory: String, env: Environment, logger: Logger,
        progress: @escaping @Sendable (String) -> Void
    ) async throws(VDError) -> NamespaceReplay {
        let layout = VolumeLayout(flashDirectory: "", namespace: volume.rawValue)
        let rawConfig: ByteBuffer
        do {
            rawConfig = try await backend.get(layout.configObject)
        } catch where error.code == .notFound {
            throw VDError(.notFound, "the backend (\(backend.description)) has no volume named \(volume)")
        }
        let config = try MetadataRecord.decode(VolumeConfig.self, from: rawConfig, kind: .volumeConfig, what: layout.configObject)
        var contents = NamespaceContents(config: config, snapshots: SnapshotTable())
        if let table = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: backend) { contents.snapshots = table }
        for info in try await backend.list(prefix: layout.scoPrefix) {
            if let number = SCONumber(hex: info.name.dropFirst(layout.scoPrefix.count)) { contents.scoObjects[number] = info.sizeBytes }
        }
        contents.tlogNumbers = VolumeLayout.numbers(in: try await backend.list(prefix: layout.tlogPrefix).map(\.name), prefix: layout.tlogPrefix)
        for info in try await backend.list(prefix: layout.scrubPrefix) {
            let name = info.name.dropFirst(layout.scrubPrefix.count)
            if name.hasSuffix(".applied"), let id = UInt64(name.dropLast(".applied".count), radix: 16) {
                contents.appliedResults.insert(id)
            } else if let id = UInt64(name, radix: 16) {
                let result = try MetadataRecord.decode(
                    ScrubResult.self, from: try await backend.get(info.name), kind: .scrubResult, what: info.name)
                guard result.volumeID == config.id, result.id == id else {
                    throw VDError(.corrupt, "\(info.name) belongs to another volume or result")
                }
                contents.results[id] = result
            }
        }

        let directory = workDirectory + "/replay-" + env.random.hexToken()
        try env.fs.makeDirectories(directory)
        let database = try env.keyValueStores.open(path: directory)
        let map = BlockMap(database: database, cacheEntries: 1 << 16)
        do throws(VDError) {
            var changes = MapChanges(
                map: map, retainedEpochs: contents.snapshots.retainedEpochs, isClone: config.parent != nil)
            changes.scrubResults = contents.results
            if var epoch = contents.tlogNumbers.first {
                let available = Set(contents.tlogNumbers)
                var done = 0
                while available.contains(epoch) {
                    let object = layout.tlogObject(epoch)
                    let tlog = try TLog.decode(try await backend.get(object), what: object)
                    guard tlog.volumeID == config.id, tlog.number == epoch else {
                        throw VDError(.corrupt, "\(object) belongs to another volume or epoch")
                    }
                    for record in tlog.records {
                        if case .scoSealed(let sco, let length, let crc) = record { contents.routerSCOs[sco] = (length, crc) }
                    }
                    try changes.add(tlog: tlog)
                    try changes.finish(checkpoint: MapCheckpoint(sco: epoch.next, offset: 0, chainCRC: 0))
                    contents.lastEpoch = epoch
                    epoch = epoch.next
                    done += 1
                    if done % 64 == 0 { progress("replayed \(done) TLogs of \(volume)") }
                }
            }
        } catch {
            database.close()
            try? env.keyValueStores.destroy(path: directory)
            try? env.fs.removeTree(directory)
            throw error
        }
        return NamespaceReplay(
            layout: layout, backend: backend, contents: contents, map: map, database: database, directory: directory,
            env: env)
    }

    private init(
        layout: VolumeLayout, backend: any ObjectStore, contents: NamespaceContents, map: BlockMap,
        database: any KeyValueStore, directory: String, env: Environment
    ) {
        self.layout = layout
        self.backend = backend
        self.contents = contents
        self.map = map
        self.database = database
        self.directory = directory
        self.env = env
    }

    /// Removes the temporary map.
    package func close() {
        database.close()
        try? env.keyValueStores.destroy(path: directory)
        try? env.fs.removeTree(directory)
    }

    /// Every live cluster version (see the file comment).
    package func liveVersions() throws(VDError) -> [LiveVersion] {
        var live: [LiveVersion] = []
        try map.forEachLiveVersion(snapshotEpochs: contents.snapshots.snapshots.map(\.epoch)) {
            (address, value, _) throws(VDError) in
            live.append(LiveVersion(address: address, epoch: value.epoch, location: value.location!))
        }
        return live
    }

    /// The bytes of a whole SCO object (decompressed when it is stored compressed).
    package func readSCO(_ sco: SCONumber) async throws(VDError) -> ByteBuffer {
        let object = layout.scoObject(sco)
        let bytes = try await backend.get(object)
        guard CompressedSCOHeader.isCompressed(bytes) else { return bytes }
        let header = try CompressedSCOHeader.decode(bytes, what: object)
        guard let index = bytes.getSlice(at: bytes.readerIndex + Int(header.indexOffset), length: header.indexBytes) else {
            throw VDError(.corrupt, "\(object): the compressed SCO is shorter than its index")
        }
        let offsets = try CompressedSCO.decodeIndex(index, header: header, what: object)
        let body = bytes.getSlice(
            at: bytes.readerIndex + Int(offsets[0]), length: Int(offsets[offsets.count - 1] - offsets[0]))!
        return try CompressedSCO.decompress(body, range: 0..<header.originalLength, offsets: offsets, what: object)
    }
}

/// Reading namespace metadata objects (shared with the router).
package enum NamespaceObjects {
    /// The newest snapshot table on the backend (nil when there is none).
    package static func loadSnapshotTable(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) -> SnapshotTable? {
        let names = try await backend.list(prefix: layout.snapshotsPrefix).map(\.name)
        for name in names.sorted(by: >) {
            do throws(VDError) {
                return try MetadataRecord.decode(
                    SnapshotTable.self, from: try await backend.get(name), kind: .snapshotTable, what: name)
            } catch where error.code == .corrupt || error.code == .notFound {
                continue
            }
        }
        return nil
    }
}
