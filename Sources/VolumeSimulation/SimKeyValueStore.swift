// A simulated map store with RocksDB's durability when its write-ahead log is off (how VolumeDriver runs it):
// writes land in a memtable; `flush()` makes everything so far durable; the store may also flush on its own after
// any write (RocksDB flushes full memtables whenever it likes), always everything up to that write. A crash of the
// process that has it open, or a power loss, drops what was not flushed.
//
// The ordered map is a persistent treap (path copying), so "the durable state" and snapshots are O(1) copies.

package import VolumeCore

/// A persistent ordered map from byte strings to byte strings.
struct PersistentMap {
    final class Node {
        let key: [UInt8]
        let value: [UInt8]
        let priority: UInt64
        let left: Node?
        let right: Node?
        init(_ key: [UInt8], _ value: [UInt8], _ priority: UInt64, _ left: Node?, _ right: Node?) {
            self.key = key
            self.value = value
            self.priority = priority
            self.left = left
            self.right = right
        }
    }

    private(set) var root: Node?
    private(set) var count = 0

    static func compare(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int {
        let n = min(a.count, b.count)
        for i in 0..<n where a[i] != b[i] { return a[i] < b[i] ? -1 : 1 }
        return a.count == b.count ? 0 : (a.count < b.count ? -1 : 1)
    }

    static func compare(_ a: [UInt8], _ b: [UInt8]) -> Int {
        a.withUnsafeBytes { x in b.withUnsafeBytes { y in compare(x, y) } }
    }

    /// A deterministic priority from the key (FNV-1a, then mixed).
    static func priority(_ key: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in key {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        hash ^= hash >> 33
        hash = hash &* 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        return hash
    }

    func get(_ key: [UInt8]) -> [UInt8]? {
        var node = root
        while let current = node {
            let c = Self.compare(key, current.key)
            if c == 0 { return current.value }
            node = c < 0 ? current.left : current.right
        }
        return nil
    }

    mutating func put(_ key: [UInt8], _ value: [UInt8]) {
        var added = false
        root = Self.insert(root, key, value, Self.priority(key), &added)
        if added { count += 1 }
    }

    mutating func delete(_ key: [UInt8]) {
        var removed = false
        root = Self.remove(root, key, &removed)
        if removed { count -= 1 }
    }

    private static func insert(
        _ node: Node?, _ key: [UInt8], _ value: [UInt8], _ priority: UInt64, _ added: inout Bool
    )
        -> Node
    {
        guard let node else {
            added = true
            return Node(key, value, priority, nil, nil)
        }
        let c = compare(key, node.key)
        if c == 0 { return Node(key, value, node.priority, node.left, node.right) }
        if c < 0 {
            let left = insert(node.left, key, value, priority, &added)
            if left.priority > node.priority {
                return Node(
                    left.key, left.value, left.priority, left.left,
                    Node(node.key, node.value, node.priority, left.right, node.right))
            }
            return Node(node.key, node.value, node.priority, left, node.right)
        }
        let right = insert(node.right, key, value, priority, &added)
        if right.priority > node.priority {
            return Node(
                right.key, right.value, right.priority,
                Node(node.key, node.value, node.priority, node.left, right.left), right.right)
        }
        return Node(node.key, node.value, node.priority, node.left, right)
    }

    private static func remove(_ node: Node?, _ key: [UInt8], _ removed: inout Bool) -> Node? {
        guard let node else { return nil }
        let c = compare(key, node.key)
        if c == 0 {
            removed = true
            return merge(node.left, node.right)
        }
        if c < 0 {
            let left = remove(node.left, key, &removed)
            return removed ? Node(node.key, node.value, node.priority, left, node.right) : node
        }
        let right = remove(node.right, key, &removed)
        return removed ? Node(node.key, node.value, node.priority, node.left, right) : node
    }

    private static func merge(_ a: Node?, _ b: Node?) -> Node? {
        guard let a else { return b }
        guard let b else { return a }
        if a.priority > b.priority { return Node(a.key, a.value, a.priority, a.left, merge(a.right, b)) }
        return Node(b.key, b.value, b.priority, merge(a, b.left), b.right)
    }

    /// Visits keys in `[start, end)` in order (an empty `end`: no upper bound) until `body` returns false.
    func scan(
        from start: [UInt8], to end: [UInt8],
        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError) {
        var stack: [Node] = []
        var node = root
        // Descend to the first key >= start, keeping the path of nodes still to visit.
        while let current = node {
            if Self.compare(current.key, start) >= 0 {
                stack.append(current)
                node = current.left
            } else {
                node = current.right
            }
        }
        while let current = stack.popLast() {
            if !end.isEmpty && Self.compare(current.key, end) >= 0 { return }
            let more = try VDError.catching {
                try current.key.withUnsafeBytes { key in
                    try current.value.withUnsafeBytes { value in try body(key, value) }
                }
            }
            if !more { return }
            var next = current.right
            while let n = next {
                stack.append(n)
                next = n.left
            }
        }
    }
}

/// The durable state of every store of one simulated node, by path (survives crashes of the node's processes).
package final class SimKeyValueStores: KeyValueStoreFactory, @unchecked Sendable {
    let scheduler: SimScheduler
    /// Probability that the store flushes on its own after a write (RocksDB flushing a full memtable).
    package var autoFlushProbability: Double
    private var durable: [String: PersistentMap] = [:]
    private var open: [String: SimKeyValueStore] = [:]
    /// Every store ever opened (to free their contents when the run ends).
    private var opened: [SimKeyValueStore] = []

    package init(scheduler: SimScheduler, autoFlushProbability: Double = 0.05) {
        self.scheduler = scheduler
        self.autoFlushProbability = autoFlushProbability
    }

    package func open(path: String) throws(VDError) -> any KeyValueStore {
        if let existing = open[path], existing.isOpen {
            throw VDError(.busy, "the map database \(path) is in use by another process")
        }
        let process = scheduler.currentProcess
        let store = SimKeyValueStore(factory: self, path: path, state: durable[path] ?? PersistentMap(), owner: process)
        durable[path] = durable[path] ?? PersistentMap()
        open[path] = store
        opened.append(store)
        process?.whenKilled { [weak store] in store?.crash() }
        return store
    }

    package func destroy(path: String) throws(VDError) {
        if let existing = open[path], existing.isOpen { throw VDError(.busy, "the map database \(path) is open") }
        durable[path] = nil
        open[path] = nil
    }

    package func exists(path: String) -> Bool { durable[path] != nil }

    fileprivate func persist(_ path: String, _ state: PersistentMap) { durable[path] = state }

    /// Frees every store's contents (the run is over).
    package func releaseAll() {
        for store in opened { store.release() }
        opened = []
        open = [:]
        durable = [:]
    }

    /// Forgets every store whose path matches (their files were on a lost disk).
    package func forgetStores(where matches: (String) -> Bool) {
        for path in durable.keys.sorted() where matches(path) { durable[path] = nil }
        for path in open.keys.sorted() where matches(path) {
            open[path]?.crash()
            open[path] = nil
        }
    }

    /// A power loss: every open store loses its memtable (its owner's crash does the same).
    package func powerLoss() {
        for path in open.keys.sorted() { open[path]?.crash() }
        open = [:]
    }
}

final class SimKeyValueStore: KeyValueStore, @unchecked Sendable {
    let factory: SimKeyValueStores
    let path: String
    private var state: PersistentMap
    private(set) var isOpen = true
    let owner: SimProcess?

    init(factory: SimKeyValueStores, path: String, state: PersistentMap, owner: SimProcess?) {
        self.factory = factory
        self.path = path
        self.state = state
        self.owner = owner
    }

    private func check() throws(VDError) {
        guard isOpen else { throw VDError(.shutdown, "the map database \(path) is closed") }
        if let process = factory.scheduler.currentProcess, !process.isAlive {
            throw VDError(.io, "\(process.name) is gone")
        }
    }

    func get(_ key: [UInt8]) throws(VDError) -> [UInt8]? {
        try check()
        return state.get(key)
    }

    func get(_ key: UnsafeRawBufferPointer) throws(VDError) -> [UInt8]? { try get(Array(key)) }

    func makeBatch() -> any KeyValueBatch { SimBatch() }

    func write(_ batch: any KeyValueBatch) throws(VDError) {
        try check()
        guard let batch = batch as? SimBatch else { preconditionFailure("a batch from another store") }
        for (key, value) in batch.operations {
            if let value { state.put(key, value) } else { state.delete(key) }
        }
        if factory.scheduler.chance(factory.autoFlushProbability) { factory.persist(path, state) }
    }

    func scan(
        from start: [UInt8], to end: [UInt8],
        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError) {
        try check()
        try state.scan(from: start, to: end, body)
    }

    func snapshot() throws(VDError) -> any KeyValueSnapshot {
        try check()
        return SimSnapshot(state: state)
    }

    func flush() throws(VDError) {
        try check()
        factory.persist(path, state)
    }

    func close() {
        guard isOpen else { return }
        if owner?.isAlive ?? true { factory.persist(path, state) }
        isOpen = false
    }

    /// The memtable is gone: the store reopens at its durable state.
    func crash() { isOpen = false }

    func release() {
        isOpen = false
        state = PersistentMap()
    }
}

final class SimBatch: KeyValueBatch {
    var operations: [([UInt8], [UInt8]?)] = []
    func put(_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        operations.append((Array(key), Array(value)))
    }
    func delete(_ key: UnsafeRawBufferPointer) { operations.append((Array(key), nil)) }
    var count: Int { operations.count }
}

struct SimSnapshot: KeyValueSnapshot, @unchecked Sendable {
    let state: PersistentMap
    func get(_ key: [UInt8]) throws(VDError) -> [UInt8]? { state.get(key) }
    func scan(
        from start: [UInt8], to end: [UInt8],
        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError) {
        try state.scan(from: start, to: end, body)
    }
    func release() {}
}
