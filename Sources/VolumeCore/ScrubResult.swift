// A scrub result: what one `vd scrub` run did to a volume's namespace. It lists the SCOs whose live clusters were
// copied (the sources), the SCOs it wrote, and one relocation per copied cluster version. The owning router applies
// it through its journal (a `scrubApplied` entry, so a replay of the TLogs applies it again in the same place of the
// history); the sources are deleted only after that entry is on the backend. Results stay in the namespace: a
// restart from the backend needs them to replay.

public import FoundationEssentials

public struct ScrubResult: Codable, Sendable, Hashable {
    public struct CreatedSCO: Codable, Sendable, Hashable {
        public var sco: UInt64
        public var lengthBytes: UInt64
        public var crc: UInt32
        public init(sco: UInt64, lengthBytes: UInt64, crc: UInt32) {
            self.sco = sco
            self.lengthBytes = lengthBytes
            self.crc = crc
        }
    }

    /// One cluster version moved: (address, epoch) was at (fromSCO, fromOffset), now at (toSCO, toOffset).
    public struct Relocation: Sendable, Hashable {
        public var address: UInt64
        public var epoch: UInt64
        public var from: ClusterLocation
        public var to: ClusterLocation
        public init(address: UInt64, epoch: UInt64, from: ClusterLocation, to: ClusterLocation) {
            self.address = address
            self.epoch = epoch
            self.from = from
            self.to = to
        }
    }

    public var id: UInt64
    public var volumeID: VolumeID
    public var createdAt: Date
    public var sources: [UInt64]
    public var created: [CreatedSCO]
    /// Relocations, flattened: address, epoch, from SCO, from offset, to SCO, to offset, CRC (7 numbers each).
    public var relocationTable: [UInt64]
    /// Bytes of the sources, and of the live data copied out of them.
    public var sourceBytes: UInt64
    public var copiedBytes: UInt64
    /// The last epoch of the history the scrub replayed and the generation tag of its TLog (nil: untagged). The
    /// owner applies the result only if its own history has that TLog (the scrub's history is a prefix of the
    /// owner's): a scrub that replayed a fenced owner's TLogs must not decide what is dead. Absent in results of
    /// earlier versions (treated as untagged).
    public var historyEpoch: UInt64?
    public var historyTag: UInt64?

    public init(
        id: UInt64, volumeID: VolumeID, createdAt: Date = Date(), sources: [UInt64], created: [CreatedSCO],
        relocations: [Relocation], sourceBytes: UInt64, copiedBytes: UInt64
    ) {
        self.id = id
        self.volumeID = volumeID
        self.createdAt = createdAt
        self.sources = sources
        self.created = created
        self.relocationTable = relocations.flatMap {
            [
                $0.address, $0.epoch, $0.from.sco.rawValue, UInt64($0.from.offset), $0.to.sco.rawValue,
                UInt64($0.to.offset),
                UInt64($0.from.crc),
            ]
        }
        self.sourceBytes = sourceBytes
        self.copiedBytes = copiedBytes
    }

    public var relocations: [Relocation] {
        stride(from: 0, to: relocationTable.count - 6, by: 7).map { i in
            let t = relocationTable
            let crc = UInt32(truncatingIfNeeded: t[i + 6])
            return Relocation(
                address: t[i], epoch: t[i + 1],
                from: ClusterLocation(sco: SCONumber(t[i + 2]), offset: UInt32(truncatingIfNeeded: t[i + 3]), crc: crc),
                to: ClusterLocation(sco: SCONumber(t[i + 4]), offset: UInt32(truncatingIfNeeded: t[i + 5]), crc: crc))
        }
    }

    /// Numbers of SCOs written by scrubs have the top bit set, so they never meet the router's own numbers.
    public static let scoNumberBase: UInt64 = 1 << 63

    /// The number of the `index`-th SCO written by result `id`.
    public static func scoNumber(result id: UInt64, index: Int) -> SCONumber {
        SCONumber(scoNumberBase | (id << 20) | UInt64(index))
    }

    public static func isScrubSCO(_ sco: SCONumber) -> Bool { sco.rawValue & scoNumberBase != 0 }

    /// The result that wrote scrub SCO `sco`.
    public static func resultID(ofSCO sco: SCONumber) -> UInt64 { (sco.rawValue & ~scoNumberBase) >> 20 }

    /// Result ids are random below this (they must fit in an SCO number beside the base bit and the index).
    public static let idLimit: UInt64 = 1 << 40
}
