// The model the simulation checks every read against: for every 512-byte sector of every device (volume, clone,
// snapshot), which contents a read may return. Contents are write ids; a sector written by write `w` holds bytes
// generated from (w, sector), so a read tells which write it saw (id 0: zeroes).
//
// Per sector the model keeps the writes since the last point known to be stored on the backend, each with the
// sequence number of its reply and the epoch the journal was in when it was replied. From them:
// - a read (no write to that sector in flight) sees the last replied write;
// - after a process crash, the same (every replied write survives);
// - after a power loss, the last write a completed flush covered or any later one, and all sectors together form a
//   prefix (a write replied before another was issued survives if that one did);
// - after a restart from the backend alone, the last write in an epoch the backend held, or any later one.
// Writes in flight at a crash may or may not have landed. After a crash the volume is read whole, and what it
// returned becomes the model (checked to be allowed first).

import Foundation
import VolumeCore

/// The bytes of sector `sector` as write `id` wrote them.
package enum SectorPattern {
    package static let sectorBytes = 512

    package static func fill(_ raw: UnsafeMutableRawBufferPointer, id: UInt32, sector: UInt64) {
        precondition(raw.count == sectorBytes)
        guard id != 0 else {
            raw.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        // Word 0 holds the write id and the sector; the others mix them with the word's index.
        let first = UInt64(id) << 32 | (sector & 0xffff_ffff)
        let mixed = first &* 0x9E37_79B9_7F4A_7C15
        raw.storeBytes(of: first.littleEndian, toByteOffset: 0, as: UInt64.self)
        var step: UInt64 = 0
        for index in 1..<(sectorBytes / 8) {
            step &+= 0xBF58_476D_1CE4_E5B9
            raw.storeBytes(of: (mixed ^ step).littleEndian, toByteOffset: index * 8, as: UInt64.self)
        }
    }

    /// Which write's bytes these are (nil: neither zeroes nor any write's bytes). Four words are checked (the first,
    /// with the id and the sector, and three spread over the sector): sectors tear whole, and the engine's own CRCs
    /// check every byte of a cluster; what this must catch is data of the wrong write or the wrong place.
    package static func identify(_ raw: UnsafeRawBufferPointer, sector: UInt64) -> UInt32? {
        precondition(raw.count == sectorBytes)
        let first = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let id = UInt32(truncatingIfNeeded: first >> 32)
        if id == 0 {
            let probes = [8, 256, 504].map {
                UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: $0, as: UInt64.self))
            }
            return first == 0 && probes.allSatisfy { $0 == 0 } ? 0 : nil
        }
        guard first & 0xffff_ffff == sector & 0xffff_ffff else { return nil }
        let mixed = first &* 0x9E37_79B9_7F4A_7C15
        for index in [1, 32, 63] {
            let expected = mixed ^ (UInt64(index) &* 0xBF58_476D_1CE4_E5B9)
            if UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self)) != expected {
                return nil
            }
        }
        return id
    }
}

/// One replied write of a sector.
struct SectorWrite: Equatable {
    var id: UInt32
    /// Reply order (global).
    var replySeq: UInt64
    /// Issue order (global): writes replied before this one was issued are before it in the journal.
    var issueSeq: UInt64
    /// The journal's open epoch when the reply came (the write is in this epoch or an earlier one).
    var epochAtReply: UInt64
    /// Written with FUA: durable once replied, whatever flush came or did not.
    var durable = false
}

/// What one writable device (a volume or a clone) may contain.
package struct DeviceModel {
    package let name: String
    package let sectorCount: Int
    /// The content the backend is known to hold (before every write in `writes`).
    var storedFloor: [UInt32]
    /// Replied writes per sector since `storedFloor`, oldest first.
    var writes: [Int: [SectorWrite]] = [:]
    /// Writes in flight per sector (at most one: the workload never overlaps in-flight operations).
    var inFlight: [Int: UInt32] = [:]

    init(name: String, sectorCount: Int, initial: [UInt32]? = nil) {
        self.name = name
        self.sectorCount = sectorCount
        storedFloor = initial ?? [UInt32](repeating: 0, count: sectorCount)
    }

    /// What a read returns now.
    func current(_ sector: Int) -> UInt32 { writes[sector]?.last?.id ?? storedFloor[sector] }

    var currentContents: [UInt32] { (0..<sectorCount).map(current) }

    mutating func replied(_ sector: Int, _ write: SectorWrite) {
        writes[sector, default: []].append(write)
        inFlight[sector] = nil
    }

    /// After a clean drain: everything replied is on the backend.
    mutating func allStored() {
        for (sector, list) in writes { storedFloor[sector] = list.last!.id }
        writes = [:]
    }

    /// The contents after a crash were read back and accepted: they are the model from now on. Later writes that
    /// did not survive are forgotten; `stored`: the contents came from the backend.
    mutating func adopt(_ observed: [UInt32], stored: Bool) {
        inFlight = [:]
        if stored {
            storedFloor = observed
            writes = [:]
            return
        }
        for sector in 0..<sectorCount where current(sector) != observed[sector] {
            if var list = writes[sector], let index = list.lastIndex(where: { $0.id == observed[sector] }) {
                list.removeSubrange((index + 1)...)
                writes[sector] = list
            } else {
                // The floor (or a write in flight at the crash, which now counts as replied).
                writes[sector] = [SectorWrite(id: observed[sector], replySeq: 0, issueSeq: 0, epochAtReply: 0)]
                if observed[sector] == storedFloor[sector] { writes[sector] = nil }
            }
        }
    }
}

/// A frozen device (a snapshot): exact contents, except sectors whose write was in flight when it was taken.
package struct SnapshotModel {
    package let volume: String
    package let name: String
    var contents: [UInt32]
    var ambiguous: [Int: Set<UInt32>]
    /// The snapshot was replied to (it must exist until deleted).
    var confirmed = false
    /// Epoch of the snapshot (known once replied).
    var epoch: UInt64 = 0
    /// Deleted (replied): it must not be readable, except that a restart from the backend may bring it back.
    var deleted = false

    func allowed(_ sector: Int) -> Set<UInt32> { ambiguous[sector] ?? [contents[sector]] }

    mutating func resolve(_ sector: Int, _ value: UInt32) {
        contents[sector] = value
        ambiguous[sector] = nil
    }
}
