// The snapshot table of a volume: the local copy (FLASH/NAME/snapshots, replaced atomically and durably on every
// change) and its uploads to the backend (NAME/snapshots/<version>). A TLog that depends on a table version (a
// snapshot or a rollback in its epoch) is uploaded only after that version (see Uploader), so the backend namespace
// alone describes every snapshot its history needs.
//
// Owns: the table and the version known to be on the backend.

import FlashIO
import Logging
import NIOCore
import ObjectStore
import Synchronization
import VolumeCore

final class SnapshotCatalog: Sendable {
    static let fileName = "snapshots"

    private struct State {
        var table: SnapshotTable
        var uploadedVersion: UInt64
    }

    private let state: Mutex<State>
    private let layout: VolumeLayout
    private let fs: any FileSystem
    private let volumeName: VolumeName
    private let logger: Logger
    /// Called after every change (the uploader wakes up).
    private let changed: @Sendable () -> Void

    init(
        table: SnapshotTable, uploadedVersion: UInt64, layout: VolumeLayout, fs: any FileSystem, volumeName: VolumeName,
        logger: Logger, changed: @escaping @Sendable () -> Void
    ) {
        state = Mutex(State(table: table, uploadedVersion: uploadedVersion))
        self.layout = layout
        self.fs = fs
        self.volumeName = volumeName
        self.logger = logger
        self.changed = changed
    }

    var table: SnapshotTable { state.withLock { $0.table } }
    var uploadedVersion: UInt64 { state.withLock { $0.uploadedVersion } }
    var needsUpload: Bool { state.withLock { $0.table.version > $0.uploadedVersion } }

    /// Changes the table, saves it locally (atomically, durably) and queues it for upload.
    func update(_ change: (inout SnapshotTable) throws(VDError) -> Void) throws(VDError) {
        try state.withLock { (state) throws(VDError) in
            var table = state.table
            try change(&table)
            table.version += 1
            try Self.save(table, layout: layout, fs: fs)
            state.table = table
        }
        changed()
    }

    static func save(_ table: SnapshotTable, layout: VolumeLayout, fs: any FileSystem) throws(VDError) {
        try MetadataRecord.encode(table, kind: .snapshotTable).withUnsafeReadableBytes { (raw) throws(VDError) in
            try fs.replaceDurably(directory: layout.flashDirectory, name: fileName, with: raw)
        }
    }

    static func loadLocal(layout: VolumeLayout, fs: any FileSystem) throws(VDError) -> SnapshotTable? {
        let path = layout.flashDirectory + "/" + fileName
        guard let bytes = try fs.readWholeFile(path) else { return nil }
        return try MetadataRecord.decode(
            SnapshotTable.self, from: ByteBuffer(bytes: bytes), kind: .snapshotTable, what: path)
    }

    /// Uploads the table if it changed since the last upload, then removes older copies (keeping one). False when
    /// the upload failed (retried by the caller).
    func uploadIfNeeded(to backend: any ObjectStore) async -> Bool {
        let (table, uploaded) = state.withLock { ($0.table, $0.uploadedVersion) }
        guard table.version > uploaded else { return true }
        do throws(VDError) {
            let object = layout.snapshotsPrefix + SCONumber(table.version).hex
            try await backend.put(object, data: try MetadataRecord.encode(table, kind: .snapshotTable))
            state.withLock { $0.uploadedVersion = max($0.uploadedVersion, table.version) }
            let old = try await backend.list(prefix: layout.snapshotsPrefix).map(\.name).sorted().dropLast(2)
            for name in old { try await backend.delete(name) }
            return true
        } catch {
            logger.warning("cannot upload the snapshot table of \(volumeName): \(error); retrying")
            return false
        }
    }
}
