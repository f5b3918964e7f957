// A read-only view of a volume as it was at a snapshot: the NBD export VOLUME@SNAPSHOT, for backups while the
// volume is in use. Reads check that the snapshot still exists, so a view of a deleted snapshot fails instead of
// returning data the scrubber may have reclaimed.

package import NIOCore
package import VolumeCore

package final class SnapshotView: BlockDevice {
    package let volume: Volume
    package let snapshotID: UInt64
    package let snapshotName: String
    package let epoch: UInt64

    package init(volume: Volume, snapshot: SnapshotRecord) {
        self.volume = volume
        snapshotID = snapshot.id
        snapshotName = snapshot.name
        epoch = snapshot.epoch
    }

    package var info: BlockDeviceInfo {
        var info = volume.info
        info.isReadOnly = true
        info.supportsTrim = false
        info.supportsWriteZeroes = false
        return info
    }

    /// The snapshots older than this one: what changed since each.
    package var dirtyBitmaps: [String] {
        volume.snapshotTable.snapshots.filter { $0.epoch < epoch }.map(\.name)
    }

    package func dirtyExtents(bitmap: String, offset: UInt64, length: UInt32) async throws(VDError) -> [DirtyExtent] {
        try checkExists()
        let extents = try await volume.dirtyExtents(since: bitmap, to: epoch, offset: offset, length: length)
        try checkExists()
        return extents
    }

    private func checkExists() throws(VDError) {
        guard volume.snapshotTable.snapshots.contains(where: { $0.id == snapshotID }) else {
            throw VDError(.notFound, "snapshot \(snapshotName) of \(volume.name) was deleted")
        }
    }

    private var readOnly: VDError { VDError(.readOnly, "\(volume.name)@\(snapshotName) is a read-only snapshot") }

    // Checked again after the read: a deletion during it may have dropped versions the read looked up later (it
    // would have read older data there), so a snapshot deleted meanwhile gives an error, never a mix.
    package func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
        try checkExists()
        let data = try await volume.read(offset: offset, length: length, atEpoch: epoch)
        try checkExists()
        return data
    }

    package func readSparse(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData {
        try checkExists()
        let data = try await volume.readSparse(offset: offset, length: length, atEpoch: epoch)
        try checkExists()
        return data
    }

    package func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) { throw readOnly }
    package func flush() async throws(VDError) {}
    package func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError) { throw readOnly }
    package func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {
        throw readOnly
    }

    package func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] {
        try checkExists()
        try checkRange(offset: offset, length: UInt64(length))
        return try await volume.allocation(offset: offset, length: UInt64(length), atEpoch: epoch)
    }
}
