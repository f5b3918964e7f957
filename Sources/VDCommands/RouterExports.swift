// The NBD exports of a running router: one per open volume, named after it.

import NBDServer
import VolumeCore
import VolumeRouter

struct RouterExports: NBDExportProvider {
    let router: Router

    func export(named name: String) -> NBDExport? {
        guard let volumeName = VolumeName(rawValue: name), let volume = router.volume(named: volumeName) else { return nil }
        return NBDExport(name: name, description: description(volume), device: volume)
    }

    func exportList() -> [NBDExportListing] {
        router.volumes.map { NBDExportListing(name: $0.name.rawValue, description: description($0)) }
    }

    private func description(_ volume: Volume) -> String {
        "VolumeDriver volume \(volume.name), \(ByteSize.format(volume.config.sizeBytes))"
    }
}
