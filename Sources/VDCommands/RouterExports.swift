// The NBD exports of a running router: one per open volume, named after it, and a read-only export
// VOLUME@SNAPSHOT per snapshot (for backups while the volume is in use).

import NBDServer
import VolumeCore
import VolumeRouter

struct RouterExports: NBDExportProvider {
    let router: Router
    /// Volumes exported read-only (`nbd.read_only` in the configuration).
    var readOnly: Set<String> = []

    func export(named name: String) -> NBDExport? {
        let parts = name.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count <= 2, let volumeName = VolumeName(rawValue: String(parts[0])),
            let volume = router.volume(named: volumeName)
        else { return nil }
        if parts.count == 2 {
            guard let snapshot = volume.snapshotTable.snapshot(named: String(parts[1])) else { return nil }
            return NBDExport(
                name: name, description: "snapshot \(snapshot.name) of \(volume.name) (read-only)",
                device: SnapshotView(volume: volume, snapshot: snapshot), readOnly: true)
        }
        return NBDExport(
            name: name, description: description(volume), device: volume, readOnly: readOnly.contains(name))
    }

    func exportList() -> [NBDExportListing] {
        router.volumes.flatMap { volume in
            [NBDExportListing(name: volume.name.rawValue, description: description(volume))]
                + volume.snapshotTable.snapshots.map {
                    NBDExportListing(name: "\(volume.name)@\($0.name)", description: "snapshot of \(volume.name) (read-only)")
                }
        }
    }

    private func description(_ volume: Volume) -> String {
        let parent = volume.config.parent.map { ", clone of \($0.volume)@\($0.snapshot)" } ?? ""
        return "VolumeDriver volume \(volume.name), \(ByteSize.format(volume.config.sizeBytes))\(parent)"
    }
}
