// A volume as its backend namespace alone describes it: its configuration, snapshot table, scrub results and the
// contiguous prefix of its TLogs, replayed into a temporary RocksDB map with the same code the router uses
// (MapChanges). What the scrubber and `vd check` reason about.
//
// Liveness: a cluster version is live when the volume reads it now (the current value) or a snapshot that exists
// reads it (a history version whose epoch is at or below the snapshot and whose successor is after it). Nothing
// else is ever read again, so nothing else needs to be kept. One more case: the snapshot table is read after the
// TLogs and may record a rollback whose TLog is not stored yet (the table goes up first). That rollback makes what
// its target read current again, so its target counts as a snapshot here even when the snapshot itself was deleted
// since (without that, a scrub deleted the SCOs of the versions a rollback had just restored: seed 1325).

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
    /// Which owner generation wrote which epochs; TLogs named with another generation (a fenced owner's) are
    /// `foreignTLogs`, never part of the history.
    package var generations = GenerationChain()
    package var foreignTLogs: [String] = []
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
        Set(
            results.values.filter { appliedResults.contains($0.id) && appliedInHistory.contains($0.id) }.flatMap(
                \.sources))
    }

    /// Length and CRC of any SCO the history knows (router or scrub-written).
    package func scoInfo(_ sco: SCONumber) -> (lengthBytes: UInt64, crc: UInt32)? {
        if let info = routerSCOs[sco] { return info }
        for result in results.values {
            if let created = result.created.first(where: { $0.sco == sco.rawValue }) {
                return (created.lengthBytes, created.crc)
            }
        }
        return nil
    }

    /// Epochs whose readers keep versions live: every snapshot, and the target of every rollback the replayed TLogs
    /// do not reach yet (it makes what its target read current again; see the file comment).
    package var liveEpochs: [UInt64] {
        // `>=`: a rollback in the last replayed epoch counts as pending too (costs nothing but a little space until
        // the next run, and covers a record whose entry landed one epoch later).
        let replayed = lastEpoch?.rawValue ?? 0
        let pending = snapshots.rollbacks.filter { $0.atEpoch >= replayed }.map(\.toEpoch)
        return Array(Set(snapshots.snapshots.map(\.epoch) + pending)).sorted()
    }

    /// Results not yet applied: their sources must not be touched and their new SCOs are not referenced yet.
    package var pendingResults: [ScrubResult] {
        results.values.filter { !appliedResults.contains($0.id) }.sorted { $0.id < $1.id }
    }
}

package final class NamespaceReplay: @unchecked Sendable {
    package let layout: VolumeLayout
    package let backend: any ObjectStore
    package let contents: NamespaceContents
    package let map: BlockMap
    private let database: any KeyValueStore
    private let directory: String
    private let env: Environment

    /// Loads and replays the namespace of `volume` into a temporary map under `workDirectory`. `parentAddresses`:
    /// for a replay that reads through a clone's parent (a backend view of the clone), what the parent may hold, so
    /// the clone's unmaps hide it exactly as the router's own replay does (the scrubber and the check never read
    /// through a parent and leave it nil).
    package static func load(
        volume: VolumeName, backend: any ObjectStore, workDirectory: String, env: Environment, logger: Logger,
        parentAddresses: ((ClusterAddress, ClusterAddress) throws(VDError) -> [ClusterAddress])? = nil,
        progress: @escaping @Sendable (String) -> Void
    ) async throws(VDError) -> NamespaceReplay {
        let layout = VolumeLayout(flashDirectory: "", namespace: volume.rawValue)
        let config = try await NamespaceObjects.loadConfig(of: volume, backend: backend)
        var contents = NamespaceContents(config: config, snapshots: SnapshotTable())
        // TLogs first, then what they may depend on: a TLog is uploaded only after the snapshot table version and
        // the scrub results it relies on, so reading those afterwards sees at least what every listed TLog needs.
        let tlogNames = try await backend.list(prefix: layout.tlogPrefix).map(\.name)
        // The chain after the listing: a TLog of a generation is uploaded only after that generation's start.
        contents.generations = try await NamespaceObjects.loadGenerationChain(layout: layout, backend: backend)
        contents.tlogNumbers = contents.generations.historyTLogs(in: tlogNames, layout: layout).sorted().map {
            SCONumber($0)
        }
        contents.foreignTLogs = contents.generations.foreignTLogs(in: tlogNames, layout: layout)
        for info in try await backend.list(prefix: layout.scoPrefix) {
            if let number = SCONumber(hex: info.name.dropFirst(layout.scoPrefix.count)) {
                contents.scoObjects[number] = info.sizeBytes
            }
        }
        // Results are kept without their relocation tables (what the scrubber and the check reason about is small);
        // the replay loads a result's relocations only when a TLog applies it.
        let (resultIDs, applied) = try await NamespaceObjects.listScrubResults(layout: layout, backend: backend)
        contents.appliedResults = applied
        for id in resultIDs {
            var result = try await NamespaceObjects.loadScrubResult(
                id, layout: layout, backend: backend, volumeID: config.id)
            result.relocationTable = []
            contents.results[id] = result
        }
        if let table = try await NamespaceObjects.loadSnapshotTable(layout: layout, backend: backend) {
            contents.snapshots = table
        }

        let directory = workDirectory + "/replay-" + env.random.hexToken()
        try env.fs.makeDirectories(directory)
        let database = try env.keyValueStores.open(path: directory)
        let map = BlockMap(database: database, cacheEntries: 1 << 16)
        do throws(VDError) {
            var changes = MapChanges(
                map: map, retainedEpochs: contents.snapshots.retainedEpochs, isClone: config.parent != nil)
            changes.parentAddresses = parentAddresses
            if var epoch = contents.tlogNumbers.first {
                let available = Set(contents.tlogNumbers)
                var done = 0
                while available.contains(epoch) {
                    let object = contents.generations.tlogObject(epoch.rawValue, layout: layout)
                    let tlog = try await NamespaceObjects.getVerified(object, backend: backend) {
                        (bytes) throws(VDError) in
                        try TLog.decode(bytes, what: object)
                    }
                    guard tlog.volumeID == config.id, tlog.number == epoch else {
                        throw VDError(.corrupt, "\(object) belongs to another volume or epoch")
                    }
                    var applies: [UInt64] = []
                    for record in tlog.records {
                        if case .scoSealed(let sco, let length, let crc) = record {
                            contents.routerSCOs[sco] = (length, crc)
                        }
                        if case .scrubApplied(let id) = record {
                            contents.appliedInHistory.insert(id)
                            applies.append(id)
                        }
                    }
                    changes.scrubResults = try await NamespaceObjects.resultsApplied(
                        by: applies, known: [:], layout: layout, backend: backend, volumeID: config.id)
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

    /// Live cluster versions per SCO (see the file comment), counted in one pass over the map.
    package func liveClustersPerSCO() throws(VDError) -> [SCONumber: Int] {
        var counts: [SCONumber: Int] = [:]
        try map.forEachLiveVersion(snapshotEpochs: contents.liveEpochs) {
            (_, value, _) throws(VDError) in
            counts[value.location!.sco, default: 0] += 1
        }
        return counts
    }

    /// Writes an index of the live versions in `scos` into the replay's own store (one pass over the map, memory
    /// bounded whatever their number), for `liveVersions(in:)`.
    package func indexLiveVersions(in scos: Set<SCONumber>) throws(VDError) {
        var batch = database.makeBatch()
        try map.forEachLiveVersion(snapshotEpochs: contents.liveEpochs) {
            (address, value, _) throws(VDError) in
            let location = value.location!
            guard scos.contains(location.sco) else { return }
            batch.put(
                Self.indexKey(location.sco, offset: location.offset),
                Self.indexValue(address, value.epoch, location.crc))
            if batch.count >= 65536 {
                try database.write(batch)
                batch = database.makeBatch()
            }
        }
        try database.write(batch)
    }

    /// The live versions of `sco` (indexed by `indexLiveVersions`), in offset order.
    package func liveVersions(in sco: SCONumber) throws(VDError) -> [LiveVersion] {
        var versions: [LiveVersion] = []
        try database.scan(from: Self.indexKey(sco, offset: 0), to: Self.indexKey(sco.next, offset: 0)) {
            (key, value) throws(VDError) -> Bool in
            guard key.count == 13, value.count == 20 else {
                throw VDError(.corrupt, "scrub index entry of the wrong size")
            }
            let offset = UInt32(bigEndian: key.loadUnaligned(fromByteOffset: 9, as: UInt32.self))
            let address = UInt64(littleEndian: value.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
            let epoch = UInt64(littleEndian: value.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            let crc = UInt32(littleEndian: value.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
            versions.append(
                LiveVersion(
                    address: address, epoch: epoch, location: ClusterLocation(sco: sco, offset: offset, crc: crc)))
            return true
        }
        return versions
    }

    /// Index keys sort by SCO then offset ("l" is not a key prefix the map uses).
    static func indexKey(_ sco: SCONumber, offset: UInt32) -> [UInt8] {
        var key = [UInt8](repeating: UInt8(ascii: "l"), count: 13)
        key.withUnsafeMutableBytes {
            $0.storeBytes(of: sco.rawValue.bigEndian, toByteOffset: 1, as: UInt64.self)
            $0.storeBytes(of: offset.bigEndian, toByteOffset: 9, as: UInt32.self)
        }
        return key
    }

    static func indexValue(_ address: ClusterAddress, _ epoch: UInt64, _ crc: UInt32) -> [UInt8] {
        var value = [UInt8](repeating: 0, count: 20)
        value.withUnsafeMutableBytes {
            $0.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
            $0.storeBytes(of: epoch.littleEndian, toByteOffset: 8, as: UInt64.self)
            $0.storeBytes(of: crc.littleEndian, toByteOffset: 16, as: UInt32.self)
        }
        return value
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
        guard let index = bytes.getSlice(at: bytes.readerIndex + Int(header.indexOffset), length: header.indexBytes)
        else {
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
    /// The volume's configuration object (`.notFound` naming the backend when there is none).
    package static func loadConfig(
        of volume: VolumeName, backend: any ObjectStore
    ) async throws(VDError) -> VolumeConfig {
        let layout = VolumeLayout(flashDirectory: "", namespace: volume.rawValue)
        do {
            return try await getVerified(layout.configObject, backend: backend) { (bytes) throws(VDError) in
                try MetadataRecord.decode(
                    VolumeConfig.self, from: bytes, kind: .volumeConfig, what: layout.configObject)
            }
        } catch  where error.code == .notFound {
            throw VDError(.notFound, "the backend (\(backend.description)) has no volume named \(volume)")
        }
    }

    /// The volume's generation chain (empty when no owner ever started a tagged generation), verified.
    package static func loadGenerationChain(
        layout: VolumeLayout, backend: any ObjectStore
    ) async throws(VDError) -> GenerationChain {
        var starts: [GenerationStart] = []
        for info in try await backend.list(prefix: layout.generationsPrefix) {
            guard let generation = SCONumber(hex: info.name.dropFirst(layout.generationsPrefix.count)) else { continue }
            let start = try await getVerified(info.name, backend: backend) { (bytes) throws(VDError) in
                try MetadataRecord.decode(GenerationStart.self, from: bytes, kind: .generationStart, what: info.name)
            }
            guard start.generation == generation.rawValue, start.generation >= GenerationChain.firstTagged else {
                throw VDError(.corrupt, "\(info.name) describes generation \(start.generation)")
            }
            starts.append(start)
        }
        let chain = try GenerationChain.linked(starts, what: layout.generationsPrefix)
        try chain.validate(what: layout.generationsPrefix)
        return chain
    }

    /// Writes the start of a generation (create-only: an existing start is never replaced) and returns the one that
    /// is on the backend (this one, or the one an earlier attempt of the same owner wrote).
    package static func startGeneration(
        _ start: GenerationStart, layout: VolumeLayout, backend: any ObjectStore
    ) async throws(VDError) -> GenerationStart {
        let name = layout.generationObject(start.generation)
        do {
            try await backend.put(name, data: try MetadataRecord.encode(start, kind: .generationStart))
            return start
        } catch  where error.code == .alreadyExists {
            return try await getVerified(name, backend: backend) { (bytes) throws(VDError) in
                try MetadataRecord.decode(GenerationStart.self, from: bytes, kind: .generationStart, what: name)
            }
        }
    }

    /// The ids of the scrub results in a namespace, and which are marked applied (names only: nothing downloaded).
    package static func listScrubResults(
        layout: VolumeLayout, backend: any ObjectStore
    ) async throws(VDError)
        -> (ids: [UInt64], applied: Set<UInt64>)
    {
        var ids: [UInt64] = []
        var applied: Set<UInt64> = []
        for info in try await backend.list(prefix: layout.scrubPrefix) {
            let name = info.name.dropFirst(layout.scrubPrefix.count)
            if name.hasSuffix(".applied"), let id = UInt64(name.dropLast(".applied".count), radix: 16) {
                applied.insert(id)
            } else if let id = UInt64(name, radix: 16) {
                ids.append(id)
            }
        }
        return (ids.sorted(), applied)
    }

    /// One scrub result, verified and checked to belong to the volume.
    package static func loadScrubResult(
        _ id: UInt64, layout: VolumeLayout, backend: any ObjectStore, volumeID: VolumeID
    )
        async throws(VDError) -> ScrubResult
    {
        let name = layout.scrubResultObject(id)
        let result = try await getVerified(name, backend: backend) { (bytes) throws(VDError) in
            try MetadataRecord.decode(ScrubResult.self, from: bytes, kind: .scrubResult, what: name)
        }
        guard result.volumeID == volumeID, result.id == id else {
            throw VDError(.corrupt, "\(name) belongs to another volume or result")
        }
        return result
    }

    /// The scrub results that `records` apply and `known` lacks, loaded (replays need exactly those).
    package static func resultsApplied(
        by ids: [UInt64], known: [UInt64: ScrubResult], layout: VolumeLayout, backend: any ObjectStore,
        volumeID: VolumeID
    ) async throws(VDError) -> [UInt64: ScrubResult] {
        var loaded: [UInt64: ScrubResult] = [:]
        for id in ids where known[id] == nil && loaded[id] == nil {
            loaded[id] = try await loadScrubResult(id, layout: layout, backend: backend, volumeID: volumeID)
        }
        return loaded
    }

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
            } catch  where error.code == .corrupt && attempt < attempts {
                continue
            }
        }
    }

    /// The newest snapshot table on the backend (nil when there is none). A table that does not verify is an error:
    /// an older version could lack snapshots, and whatever relies on the table (a scrub) would then lose their data.
    package static func loadSnapshotTable(
        layout: VolumeLayout, backend: any ObjectStore
    ) async throws(VDError) -> SnapshotTable? {
        for _ in 0..<3 {
            let names = try await backend.list(prefix: layout.snapshotsPrefix).map(\.name)
            guard let newest = names.max() else { return nil }
            do throws(VDError) {
                return try await getVerified(newest, backend: backend) { (bytes) throws(VDError) in
                    try MetadataRecord.decode(SnapshotTable.self, from: bytes, kind: .snapshotTable, what: newest)
                }
            } catch  where error.code == .notFound {
                continue  // replaced by a newer version meanwhile: list again
            }
        }
        throw VDError(.backend, "the snapshot table of \(layout.namespace) keeps changing while it is read")
    }
}
