// The only place that talks to RocksDB's C API. Handles are closed explicitly (and asserted closed on deinit);
// every `char **errptr` is freed with rocksdb_free and turned into a VDError naming the database path.
// rocksdb_t is thread-safe, so a RocksDatabase may be shared across threads; write batches and iterators are not.

import CRocksDB
#if canImport(Glibc)
    @preconcurrency import Glibc
#endif
import Synchronization
package import VolumeCore

/// Options shared by the databases of one process (one block cache for all volumes).
package final class RocksEnvironment: @unchecked Sendable {
    fileprivate let cache: OpaquePointer
    fileprivate let tableOptions: OpaquePointer

    /// `blockCacheBytes`: the LRU cache shared by every database opened with this environment.
    package init(blockCacheBytes: Int = 64 << 20) {
        cache = rocksdb_cache_create_lru(blockCacheBytes)
        tableOptions = rocksdb_block_based_options_create()
        rocksdb_block_based_options_set_block_cache(tableOptions, cache)
        rocksdb_block_based_options_set_filter_policy(tableOptions, rocksdb_filterpolicy_create_bloom(10))
        // Partitioned index and filters: a lookup loads only the few KiB of filter and index it needs into the
        // cache. With whole-file filter blocks (MBs for a big map) every lookup of a new cluster re-read the entire
        // filter once it no longer fit a cache shard; writing 50 GiB ran at 35 MB/s, most of it copying filters.
        rocksdb_block_based_options_set_index_type(
            tableOptions, Int32(rocksdb_block_based_table_index_type_two_level_index_search))
        rocksdb_block_based_options_set_partition_filters(tableOptions, 1)
        rocksdb_block_based_options_set_metadata_block_size(tableOptions, 4096)
        rocksdb_block_based_options_set_cache_index_and_filter_blocks(tableOptions, 1)
        rocksdb_block_based_options_set_pin_top_level_index_and_filter(tableOptions, 1)
        rocksdb_block_based_options_set_pin_l0_filter_and_index_blocks_in_cache(tableOptions, 1)
    }

    deinit {
        rocksdb_block_based_options_destroy(tableOptions)
        rocksdb_cache_destroy(cache)
    }

    package static let shared = RocksEnvironment()
}

package struct RocksOptions: Sendable {
    /// Memtable size: the most map updates kept only in memory (they are replayed from the journal after a crash).
    package var writeBufferBytes: Int = 16 << 20
    /// With the write-ahead log off, un-flushed updates are lost on a crash; callers that can replay them from
    /// their own log (the volume journal) turn it off to save a system call per batch.
    package var disableWAL: Bool = true
    package init() {}
}

/// A RocksDB database.
package final class RocksDatabase: KeyValueStore, @unchecked Sendable {
    package let path: String
    private let handle: Mutex<OpaquePointer?>
    private let raw: OpaquePointer
    private let readOptions: OpaquePointer
    private let writeOptions: OpaquePointer
    private let options: OpaquePointer

    package init(path: String, options rocksOptions: RocksOptions = RocksOptions(), environment: RocksEnvironment = .shared)
        throws(VDError)
    {
        self.path = path
        let options = rocksdb_options_create()!
        rocksdb_options_set_create_if_missing(options, 1)
        rocksdb_options_set_write_buffer_size(options, rocksOptions.writeBufferBytes)
        rocksdb_options_set_max_write_buffer_number(options, 3)
        rocksdb_options_set_max_open_files(options, 256)
        rocksdb_options_set_keep_log_file_num(options, 2)
        rocksdb_options_set_max_log_file_size(options, 1 << 20)
        rocksdb_options_set_info_log_level(options, 3)  // WARN
        rocksdb_options_set_compression(options, 0)  // keys and locations do not compress usefully
        rocksdb_options_set_block_based_table_factory(options, environment.tableOptions)
        rocksdb_options_increase_parallelism(options, 2)
        var error: UnsafeMutablePointer<CChar>?
        let db = rocksdb_open(options, path, &error)
        if let error {
            let message = String(cString: error)
            rocksdb_free(error)
            rocksdb_options_destroy(options)
            if message.contains("lock") {
                throw VDError(.busy, "the map database \(path) is in use by another process: \(message)")
            }
            throw VDError(.io, "cannot open the map database \(path): \(message)")
        }
        guard let db else {
            rocksdb_options_destroy(options)
            throw VDError(.io, "cannot open the map database \(path)")
        }
        self.options = options
        raw = db
        handle = Mutex(db)
        readOptions = rocksdb_readoptions_create()
        writeOptions = rocksdb_writeoptions_create()
        rocksdb_writeoptions_disable_WAL(writeOptions, rocksOptions.disableWAL ? 1 : 0)
        rocksdb_writeoptions_set_sync(writeOptions, 0)
    }

    deinit {
        assert(handle.withLock { $0 } == nil, "RocksDatabase \(path) was not closed")
        close()
        rocksdb_readoptions_destroy(readOptions)
        rocksdb_writeoptions_destroy(writeOptions)
        rocksdb_options_destroy(options)
    }

    /// Flushes memtables (so the state survives a crash without the WAL) and closes the database.
    package func close() {
        let db = handle.withLock { handle -> OpaquePointer? in
            defer { handle = nil }
            return handle
        }
        guard let db else { return }
        _ = try? flushMemtable(db)
        rocksdb_close(db)
    }

    private var db: OpaquePointer {
        get throws(VDError) {
            guard handle.withLock({ $0 }) != nil else { throw VDError(.shutdown, "the map database \(path) is closed") }
            return raw
        }
    }

    private func check(_ error: UnsafeMutablePointer<CChar>?, _ what: String) throws(VDError) {
        guard let error else { return }
        let message = String(cString: error)
        rocksdb_free(error)
        throw VDError(message.contains("No space") ? .noSpace : .io, "map database \(path): \(what): \(message)")
    }

    /// The value of `key`, or nil.
    package func get(_ key: UnsafeRawBufferPointer) throws(VDError) -> [UInt8]? {
        var error: UnsafeMutablePointer<CChar>?
        var length = 0
        let value = rocksdb_get(
            try db, readOptions, key.baseAddress?.assumingMemoryBound(to: CChar.self), key.count, &length, &error)
        try check(error, "get")
        guard let value else { return nil }
        defer { rocksdb_free(value) }
        return [UInt8](UnsafeRawBufferPointer(start: value, count: length))
    }

    package func get(_ key: [UInt8]) throws(VDError) -> [UInt8]? {
        try VDError.catching { try key.withUnsafeBytes { try get($0) } }
    }

    package func put(_ key: [UInt8], _ value: [UInt8]) throws(VDError) {
        let batch = RocksWriteBatch()
        batch.put(key, value)
        try write(batch)
    }

    /// Applies a batch atomically.
    package func write(_ batch: RocksWriteBatch) throws(VDError) {
        var error: UnsafeMutablePointer<CChar>?
        rocksdb_write(try db, writeOptions, batch.raw, &error)
        try check(error, "write")
    }

    /// Persists the memtables to SST files (everything written so far survives a crash even without the WAL).
    package func flushMemtable() throws(VDError) {
        try flushMemtable(try db)
    }

    package func flush() throws(VDError) { try flushMemtable() }

    package func makeBatch() -> any KeyValueBatch { RocksWriteBatch() }

    package func write(_ batch: any KeyValueBatch) throws(VDError) {
        guard let batch = batch as? RocksWriteBatch else { preconditionFailure("a batch from another store") }
        try write(batch)
    }

    /// A consistent read view (a RocksDB snapshot).
    package func snapshot() throws(VDError) -> any KeyValueSnapshot {
        let db = try self.db
        guard let snapshot = rocksdb_create_snapshot(db) else { throw VDError(.io, "map database \(path): no snapshot") }
        return RocksSnapshot(database: self, snapshot: snapshot)
    }

    fileprivate func release(_ snapshot: OpaquePointer) {
        guard let db = handle.withLock({ $0 }) else { return }
        rocksdb_release_snapshot(db, snapshot)
    }

    fileprivate func get(_ key: [UInt8], options: OpaquePointer) throws(VDError) -> [UInt8]? {
        var error: UnsafeMutablePointer<CChar>?
        var length = 0
        let value = key.withUnsafeBytes { key in
            rocksdb_get(raw, options, key.baseAddress?.assumingMemoryBound(to: CChar.self), key.count, &length, &error)
        }
        try check(error, "get")
        guard let value else { return nil }
        defer { rocksdb_free(value) }
        return [UInt8](UnsafeRawBufferPointer(start: value, count: length))
    }

    private func flushMemtable(_ db: OpaquePointer) throws(VDError) {
        let flushOptions = rocksdb_flushoptions_create()
        defer { rocksdb_flushoptions_destroy(flushOptions) }
        rocksdb_flushoptions_set_wait(flushOptions, 1)
        var error: UnsafeMutablePointer<CChar>?
        rocksdb_flush(db, flushOptions, &error)
        try check(error, "flush")
    }

    /// Calls `body(key, value)` for keys in `[start, end)` in order until it returns false.
    package func scan(
        from start: [UInt8], to end: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError) {
        try scan(from: start, to: end, options: readOptions, body)
    }

    fileprivate func scan(
        from start: [UInt8], to end: [UInt8], options: OpaquePointer,
        _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError) {
        let iterator = rocksdb_create_iterator(try db, options)!
        defer { rocksdb_iter_destroy(iterator) }
        start.withUnsafeBytes { rocksdb_iter_seek(iterator, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        while rocksdb_iter_valid(iterator) != 0 {
            var keyLength = 0
            var valueLength = 0
            let key = UnsafeRawBufferPointer(start: rocksdb_iter_key(iterator, &keyLength), count: keyLength)
            if !end.isEmpty && Self.compare(key, end) >= 0 { break }
            let value = UnsafeRawBufferPointer(start: rocksdb_iter_value(iterator, &valueLength), count: valueLength)
            guard try body(key, value) else { break }
            rocksdb_iter_next(iterator)
        }
        var error: UnsafeMutablePointer<CChar>?
        rocksdb_iter_get_error(iterator, &error)
        try check(error, "scan")
    }

    static func compare(_ a: UnsafeRawBufferPointer, _ b: [UInt8]) -> Int {
        let n = min(a.count, b.count)
        for i in 0..<n where a[i] != b[i] { return a[i] < b[i] ? -1 : 1 }
        return a.count == b.count ? 0 : (a.count < b.count ? -1 : 1)
    }

    /// Destroys the database files at `path` (the database must be closed).
    package static func destroy(path: String) throws(VDError) {
        let options = rocksdb_options_create()
        defer { rocksdb_options_destroy(options) }
        var error: UnsafeMutablePointer<CChar>?
        rocksdb_destroy_db(options, path, &error)
        if let error {
            let message = String(cString: error)
            rocksdb_free(error)
            throw VDError(.io, "cannot destroy the map database \(path): \(message)")
        }
    }
}

/// A consistent read view: reads through it see the database as it was when it was taken.
final class RocksSnapshot: KeyValueSnapshot, @unchecked Sendable {
    private let database: RocksDatabase
    private let snapshot: OpaquePointer
    private let options: OpaquePointer
    private let released = Mutex(false)

    fileprivate init(database: RocksDatabase, snapshot: OpaquePointer) {
        self.database = database
        self.snapshot = snapshot
        options = rocksdb_readoptions_create()
        rocksdb_readoptions_set_snapshot(options, snapshot)
    }

    deinit {
        release()
        rocksdb_readoptions_destroy(options)
    }

    func get(_ key: [UInt8]) throws(VDError) -> [UInt8]? { try database.get(key, options: options) }

    func scan(
        from start: [UInt8], to end: [UInt8], _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws(VDError) -> Bool
    ) throws(VDError) {
        try database.scan(from: start, to: end, options: options, body)
    }

    func release() {
        let first = released.withLock { released -> Bool in
            defer { released = true }
            return !released
        }
        if first { database.release(snapshot) }
    }
}

/// Opens RocksDB databases (one per volume map).
package struct RocksStoreFactory: KeyValueStoreFactory {
    package let environment: RocksEnvironment
    package let options: RocksOptions
    package init(environment: RocksEnvironment = .shared, options: RocksOptions = RocksOptions()) {
        self.environment = environment
        self.options = options
    }
    package func open(path: String) throws(VDError) -> any KeyValueStore {
        try RocksDatabase(path: path, options: options, environment: environment)
    }
    package func destroy(path: String) throws(VDError) { try RocksDatabase.destroy(path: path) }
    package func exists(path: String) -> Bool {
        var st = stat()
        return stat(path + "/CURRENT", &st) == 0
    }
}

/// An atomic group of puts and deletes. Not thread-safe.
package final class RocksWriteBatch: KeyValueBatch {
    fileprivate let raw: OpaquePointer

    package init() { raw = rocksdb_writebatch_create() }
    deinit { rocksdb_writebatch_destroy(raw) }

    package var count: Int { Int(rocksdb_writebatch_count(raw)) }
    package func clear() { rocksdb_writebatch_clear(raw) }

    package func put(_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        rocksdb_writebatch_put(
            raw, key.baseAddress?.assumingMemoryBound(to: CChar.self), key.count,
            value.baseAddress?.assumingMemoryBound(to: CChar.self), value.count)
    }

    package func put(_ key: [UInt8], _ value: [UInt8]) {
        key.withUnsafeBytes { k in value.withUnsafeBytes { v in put(k, v) } }
    }

    package func delete(_ key: UnsafeRawBufferPointer) {
        rocksdb_writebatch_delete(raw, key.baseAddress?.assumingMemoryBound(to: CChar.self), key.count)
    }

    package func delete(_ key: [UInt8]) { key.withUnsafeBytes { delete($0) } }
}
