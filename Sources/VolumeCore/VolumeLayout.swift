// Where a volume's pieces live: its local flash directory and its namespace on the backend.
//
//   FLASH/NAME/map/          RocksDB map
//   FLASH/NAME/sco/HEX.sco   SCO journals (open) and sealed SCOs
//   FLASH/NAME/tlog/HEX.tlog TLogs of sealed SCOs
//   backend: NAME/volume, NAME/sco/HEX, NAME/tlog/HEX[.GENERATION], NAME/snapshots/VERSION, NAME/scrub/ID[.applied],
//            NAME/scrub.lease, NAME/owner/VERSION, NAME/generations/GENERATION (GenerationChain)

package struct VolumeLayout: Sendable {
    package var flashDirectory: String
    package var namespace: String

    package init(flashDirectory: String, namespace: String) {
        self.flashDirectory = flashDirectory
        self.namespace = namespace
    }

    package var mapDirectory: String { flashDirectory + "/map" }
    package var scoDirectory: String { flashDirectory + "/sco" }
    package var tlogDirectory: String { flashDirectory + "/tlog" }
    package func scoPath(_ sco: SCONumber) -> String { scoDirectory + "/" + sco.hex + ".sco" }
    /// Backend data kept locally after a read (sparse copies of evicted or never-local SCOs).
    package var fetchedDirectory: String { flashDirectory + "/fetched" }
    package func fetchedPath(_ sco: SCONumber) -> String { fetchedDirectory + "/" + sco.hex + ".sco" }

    package var configObject: String { namespace + "/volume" }
    package var scoPrefix: String { namespace + "/sco/" }
    package var tlogPrefix: String { namespace + "/tlog/" }
    package var snapshotsPrefix: String { namespace + "/snapshots/" }
    /// Scrub results (NAME/scrub/<id>), their applied markers (<id>.applied) and the scrub lease.
    package var scrubPrefix: String { namespace + "/scrub/" }
    package func scrubResultObject(_ id: UInt64) -> String { scrubPrefix + SCONumber(id).hex }
    package func scrubAppliedObject(_ id: UInt64) -> String { scrubResultObject(id) + ".applied" }
    package var scrubLeaseObject: String { namespace + "/scrub.lease" }
    package func scoObject(_ sco: SCONumber) -> String { scoPrefix + sco.hex }
    /// The TLog of an epoch before any tagged generation (see `GenerationChain.tlogObject` for the rest).
    package func tlogObject(_ sco: SCONumber) -> String { tlogPrefix + sco.hex }
    /// The TLog of an epoch written by generation `tag` (nil: an untagged generation, the plain name).
    package func tlogObject(_ epoch: SCONumber, tag: UInt64?) -> String {
        guard let tag else { return tlogObject(epoch) }
        return tlogPrefix + epoch.hex + "." + SCONumber(tag).hex
    }
    /// Epoch and generation tag of a TLog object name (nil: not a TLog name).
    package func parseTLogObject(_ name: String) -> (epoch: UInt64, tag: UInt64?)? {
        guard name.hasPrefix(tlogPrefix) else { return nil }
        let rest = name.dropFirst(tlogPrefix.count)
        if rest.count == 16 { return SCONumber(hex: rest).map { ($0.rawValue, nil) } }
        let parts = rest.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, let epoch = SCONumber(hex: parts[0]), let tag = SCONumber(hex: parts[1]),
            tag.rawValue >= GenerationChain.firstTagged
        else { return nil }
        return (epoch.rawValue, tag.rawValue)
    }
    package var generationsPrefix: String { namespace + "/generations/" }
    /// The volume's DTL mode, peer and state (read by a taker): versions NAME/dtl-state/N, each written create-only
    /// after the newest (a `SequencedRecord`), so a delayed PUT of an older state never replaces a newer one.
    package var dtlRecordPrefix: String { namespace + "/dtl-state/" }
    /// The single, overwritten DTL record of volumes written before the versioned one: read only while no version
    /// exists, deleted once the first version is written.
    package var legacyDTLObject: String { namespace + "/dtl" }
    package func generationObject(_ generation: UInt64) -> String { generationsPrefix + SCONumber(generation).hex }

    /// Parses the numbers of objects named PREFIX + 16 hex digits.
    package static func numbers(in names: [String], prefix: String) -> [SCONumber] {
        names.compactMap { name -> SCONumber? in
            guard name.hasPrefix(prefix) else { return nil }
            return SCONumber(hex: name.dropFirst(prefix.count))
        }.sorted()
    }

    /// Parses local file names HEX.EXT.
    package static func numbers(inFiles names: [String], suffix: String) -> [SCONumber] {
        names.compactMap { name -> SCONumber? in
            guard name.hasSuffix(suffix) else { return nil }
            return SCONumber(hex: name.dropLast(suffix.count))
        }.sorted()
    }
}
