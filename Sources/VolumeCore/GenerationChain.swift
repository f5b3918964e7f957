// Which generation of owners wrote which epochs of a volume's history (scale-out ownership, docs/design.md
// "Generations").
//
// Every change of owner bumps the volume's generation (OwnerLease). The router that starts serving generation G >= 2
// writes NAME/generations/<G> = {G, firstEpoch F} before it accepts a write: "the history's epochs from F on are the
// ones generation G writes". Its TLogs are named NAME/tlog/<epoch>.<G> (generations 0 and 1, and volumes that never
// had an owner record, keep NAME/tlog/<epoch>), its SCO numbers start at G << 40, and its snapshot table versions at
// G << 40. An owner that was fenced (generation g < G) may still upload: its TLogs for epochs >= F are named with g,
// which is not the generation the chain gives those epochs, so no restore, scrub or check ever reads them; its SCOs
// and table versions have numbers below G << 40 and no TLog of the history names them; create-only writes keep it
// from replacing anything. F is one past the last epoch the new owner found on the backend after writing its owner
// record: a TLog the fenced owner stored before that listing is history (and the new owner continues after it), one
// stored after it is not.
//
// A start may itself be late: an owner that took generation G, stalled before writing its start, and meanwhile lost
// the volume to generation G+1 (whose owner did not see G's start) would otherwise rewrite the history G+1 already
// serves. So each start names the start it follows (`previous`, the newest of the chain its writer read), and the
// chain is the list walked from the highest generation back through `previous`: a late start is on no walk and
// counts for nothing (its generation's TLogs are foreign like any fenced owner's).

/// NAME/generations/<G hex>: generation G writes the history from `firstEpoch` on.
public struct GenerationStart: Codable, Sendable, Equatable {
    public var generation: UInt64
    public var firstEpoch: UInt64
    /// The node that started it (for people reading it).
    public var node: String
    /// The start this one follows: the newest of the chain its writer read (nil: none).
    public var previous: UInt64?

    public init(generation: UInt64, firstEpoch: UInt64, node: String, previous: UInt64? = nil) {
        self.generation = generation
        self.firstEpoch = firstEpoch
        self.node = node
        self.previous = previous
    }
}

public struct GenerationChain: Sendable, Equatable {
    /// Generations that name their objects (0: no owner records; 1: the first owner keeps the plain names).
    public static let firstTagged: UInt64 = 2
    /// SCO numbers and snapshot table versions of generation G start at G << shift.
    public static let shift: UInt64 = 40
    /// Generations fit below the scrub SCOs' top bit.
    public static let maximumGeneration: UInt64 = (1 << (63 - shift)) - 1

    /// Sorted by generation; first epochs never decrease.
    public private(set) var starts: [GenerationStart]

    public init(_ starts: [GenerationStart] = []) {
        self.starts = starts.sorted { $0.generation < $1.generation }
    }

    /// The chain of every start found under NAME/generations/: from the highest generation back through `previous`;
    /// starts on no such walk (written late, by an owner that had lost the volume) are left out. A late start can only
    /// be left out, never missing from a walk: a `previous` naming no start found, or not an older generation, is
    /// damage (`.corrupt`), never a reason to drop the rest of the history.
    public static func linked(_ found: [GenerationStart], what: String) throws(VDError) -> GenerationChain {
        let byGeneration = Dictionary(found.map { ($0.generation, $0) }, uniquingKeysWith: { first, _ in first })
        var chain: [GenerationStart] = []
        var next = found.map(\.generation).max()
        while let generation = next, let start = byGeneration[generation] {
            chain.append(start)
            guard let previous = start.previous else { break }
            guard previous < generation, byGeneration[previous] != nil else {
                throw .corrupt(
                    "\(what): generation \(generation) follows generation \(previous), which is not an older start on the backend"
                )
            }
            next = previous
        }
        return GenerationChain(chain)
    }

    /// Starts found that are not on the chain (late ones).
    public func unlinked(_ found: [GenerationStart]) -> [GenerationStart] {
        found.filter { start(of: $0.generation) == nil }
    }

    /// Checks that first epochs never decrease along the generations (each continues its predecessor's history).
    public func validate(what: String) throws(VDError) {
        for (a, b) in zip(starts, starts.dropFirst()) where b.firstEpoch < a.firstEpoch {
            throw .corrupt(
                "\(what): generation \(b.generation) starts at epoch \(b.firstEpoch), before generation \(a.generation) (\(a.firstEpoch))"
            )
        }
    }

    public var newest: GenerationStart? { starts.last }

    public func start(of generation: UInt64) -> GenerationStart? { starts.first { $0.generation == generation } }

    /// The generation that writes `epoch` of the history (0 when no tagged generation covers it).
    public func generation(ofEpoch epoch: UInt64) -> UInt64 {
        starts.last { $0.firstEpoch <= epoch }?.generation ?? 0
    }

    /// The tag a TLog of `epoch` carries in its name (nil: the plain name).
    public func tag(ofEpoch epoch: UInt64) -> UInt64? {
        let generation = generation(ofEpoch: epoch)
        return generation >= Self.firstTagged ? generation : nil
    }

    public mutating func add(_ start: GenerationStart) {
        precondition(self.start(of: start.generation) == nil, "generation \(start.generation) started twice")
        starts.append(start)
        starts.sort { $0.generation < $1.generation }
    }

    /// The first SCO number (and snapshot table version) generation `generation` may use.
    public static func numberBase(of generation: UInt64) -> UInt64 {
        precondition(generation <= maximumGeneration, "generation \(generation) out of range")
        return generation >= firstTagged ? generation << shift : 0
    }

    /// The TLog objects of a listing that belong to the history this chain describes, by epoch. Others (a fenced
    /// owner's late uploads, names that do not parse) are left out.
    package func historyTLogs(in names: [String], layout: VolumeLayout) -> Set<UInt64> {
        var epochs: Set<UInt64> = []
        for name in names {
            guard let (epoch, tag) = layout.parseTLogObject(name) else { continue }
            if tag == self.tag(ofEpoch: epoch) { epochs.insert(epoch) }
        }
        return epochs
    }

    /// TLog objects in a listing that are not part of the history (named with another generation than the chain
    /// gives their epoch): uploads of a fenced owner.
    package func foreignTLogs(in names: [String], layout: VolumeLayout) -> [String] {
        names.filter { name in
            guard let (epoch, tag) = layout.parseTLogObject(name) else { return false }
            return tag != self.tag(ofEpoch: epoch)
        }.sorted()
    }

    package func tlogObject(_ epoch: UInt64, layout: VolumeLayout) -> String {
        layout.tlogObject(SCONumber(epoch), tag: tag(ofEpoch: epoch))
    }
}
