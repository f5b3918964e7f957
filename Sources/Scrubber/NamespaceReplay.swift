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
    /// Scrub results whose `scrubApplied` entry is in the replayed history.
    package var appliedInHistory: Set<UInt64> = []

    /// Router SCOs no TLog of the history names: uploads of epochs not stored yet (numbers above every SCO of the
    /// history) or garbage an earlier life of the volume left (below: that epoch number now has another SCO).
    package func unreferencedRouterSCOs() -> (inFlight: [SCONumber], orphans: [SCONumber]) {
        let highest = routerSCOs.keys.max() ?? SCONumber(0)
        let unreferenced = scoObjects.keys.filter { !ScrubResult.isScrubSCO($0) && routerSCOs[$0] == nil }.sorted()
        return (unreferenced.filter { $0 > highest }, unreferenced.filter { $0 < highest })
    }

    /// Sources of results applied in the history and marked applied: deleted, or being deleted.
    package var deletedSources: Set<UInt64> {
        Set(results.values.filter { appliedResults.contains($0.id) && appliedInHistory.contains($0.id) }.flatMap(\.sources))
    }

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
        // TLogs first, then what they may depend on: a TLog is uploaded only after the snapshot table version and
        // the scrub results it relies on, so reading those afterwards sees at least what every listed TLog needs.
        contents.tlogNumbers = VolumeLayout.numbers(in: try await backend.list(prefix: layout.tlogPrefix).map(\.name), prefix: layout.tlogPrefix)
        for info in try await backend.list(prefix: layout.scoPrefix) {
            if let number = SCONumber(hex: info.name.dropFirst(layout.scoPrefix.count)) { contents.scoObjects[number] = info.sizeBytes }
        }
        for info in try await backend.list(prefix: layout.scrubPrefix) {
            let name = info.name.dropFirst(layout.scrubPrefix.count)
            if name.hasSuffix(".applied"), let id = UInt64(name.dropLast(".applied".count), radix: 16) {
                contents.appliedResults.insert(id)
            } else if let id = UInt64(name, radix: 16) {
                let result = try await NamespaceObjects.getVerified(info.name, backend: backend) { (bytes) throws(VDError) in
                    try MetadataRecord.decode(ScrubResult.self, from: bytes, kind: .scrubResult, what: info.name)
                }
                guard result.volumeID == config.id, result.id == id else {
                    throw VDError(.corrupt, "\(info.name) belongs to another volume or result")
                }
                contents.results[id] = result
            }
        }
        if let table = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: backend) { contents.snapshots = table }

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
                    let tlog = try await NamespaceObjects.getVerified(object, backend: backend) { (bytes) throws(VDError) in
                        try TLog.decode(bytes, what: object)
                    }
                    guard tlog.volumeID == config.id, tlog.number == epoch else {
                        throw VDError(.corrupt, "\(object) belongs to another volume or epoch")
                    }
                    for record in tlog.records {
                        if case .scoSealed(let sco, let length, let crc) = record { contents.routerSCOs[sco] = (length, crc) }
                        if case .scrubApplied(let id) = record { contents.appliedInHistory.insert(id) }
                    }
                    try changes.add(tlog: tlog)
                    try changes.finish(checkpoint: MapCheckpoint(epoch: epoch.next.rawValue, offset: 0, chainCRC: 0))
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

    /// The bytes of a whole SCO object (decompressed when it is stored compressed). `crc`: the CRC32C its history
    /// recorded; a read that does not match is repeated (bytes may be damaged on the way) before it is reported.
    package func readSCO(_ sco: SCONumber, crc: UInt32? = nil) async throws(VDError) -> ByteBuffer {
        let object = layout.scoObject(sco)
        return try await NamespaceObjects.getVerified(object, backend: backend) { (bytes) throws(VDError) in
            let data = try Self.decodeSCO(bytes, object: object)
            if let crc, CRC32C.checksum(data) != crc {
                throw VDError(.corrupt, "\(object) does not match the checksum its history recorded")
            }
            return data
        }
    }

    static func decodeSCO(_ bytes: ByteBuffer, object: String) throws(VDError) -> ByteBuffer {
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
    /// Reads an object and decodes it; a decoding that fails verification (`.corrupt`) is retried a few times,
    /// since bytes can be damaged on the way, then reported. Never falls back to anything else.
    package static func getVerified<T>(
        _ name: String, backend: any ObjectStore, attempts: Int = 4, _ decode: (ByteBuffer) throws(VDError) -> T
    ) async throws(VDError) -> T {
        var attempt = 0
        while true {
            attempt += 1
            do throws(VDError) {
                return try decode(try await backend.get(name))
            } catch where error.code == .corrupt && attempt < attempts {
                continue
            }
        }
    }

    /// The newest snapshot table on the backend (nil when there is none). A table that does not verify is an error:
    /// an older version could lack snapshots, and whatever relies on the table (a scrub) would then lose their data.
    package static func loadSnapshotTable(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) -> SnapshotTable? {
        for _ in 0..<3 {
            let names = try await backend.list(prefix: layout.snapshotsPrefix).map(\.name)
            guard let newest = names.max() else { return nil }
            do throws(VDError) {
                return try await getVerified(newest, backend: backend) { (bytes) throws(VDError) in
                    try MetadataRecord.decode(SnapshotTable.self, from: bytes, kind: .snapshotTable, what: newest)
                }
            } catch where error.code == .notFound {
                continue  // replaced by a newer version meanwhile: list again
            }
        }
        throw VDError(.backend, "the snapshot table of \(layout.namespace) keeps changing while it is read")
    }
}
