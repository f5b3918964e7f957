// `vd check`: verifies a volume's namespace on the backend.
//
//  - every TLog of the history decodes and verifies (the replay does that), and the history has no gap;
//  - every live cluster version resolves to an SCO object that exists and is not marked for deletion (a source of
//    an applied scrub result);
//  - every referenced SCO object has the length and CRC its TLog or scrub result recorded (unless --quick);
//    with --clusters, every live cluster's own CRC is checked as well;
//  - orphans: SCOs a killed scrub wrote but never described, and sources of applied results still present.
// `--repair` removes orphans and nothing else.

package import FlashIO
import Foundation
import NIOCore
package import ObjectStore
package import VolumeCore

package struct CheckReport: Codable, Sendable {
    package var volume: String
    package var tlogs = 0
    package var liveVersions = 0
    package var referencedSCOs = 0
    package var verifiedBytes: UInt64 = 0
    package var problems: [String] = []
    package var orphans: [String] = []
    package var removedOrphans: [String] = []
    /// Router SCOs above the last TLog: uploads in flight while a router runs (not orphans).
    package var inFlight: [String] = []
    package var clean: Bool { problems.isEmpty && orphans.count == removedOrphans.count }

    package init(volume: String) { self.volume = volume }
}

package struct NamespaceCheck {
    package var quick = false
    package var clusters = false
    package var repair = false
    package var workDirectory = "/tmp"
    package init() {}

    package func run(
        volume: VolumeName, backend: any ObjectStore, env: Environment, progress: @escaping @Sendable (String) -> Void
    ) async throws(VDError) -> CheckReport {
        var report = CheckReport(volume: volume.rawValue)
        let replay = try await NamespaceReplay.load(
            volume: volume, backend: backend, workDirectory: workDirectory, env: env, logger: .init(label: "vd check"),
            progress: progress)
        defer { replay.close() }
        let contents = replay.contents
        let layout = replay.layout
        report.tlogs = contents.lastEpoch.map { Int($0.rawValue - (contents.tlogNumbers.first?.rawValue ?? 1) + 1) } ?? 0
        if let last = contents.lastEpoch {
            let beyond = contents.tlogNumbers.filter { $0 > last.next }
            if !beyond.isEmpty {
                report.problems.append(
                    "the history stops at TLog \(last.hex) but later TLogs exist (\(beyond.map(\.hex).prefix(5).joined(separator: ", "))): a TLog is missing")
            }
        }
        let deleted = Set(contents.results.values.filter { contents.appliedResults.contains($0.id) }.flatMap(\.sources))
        let live = try replay.liveVersions()
        report.liveVersions = live.count
        var bySCO: [SCONumber: [LiveVersion]] = [:]
        for version in live { bySCO[version.location.sco, default: []].append(version) }
        report.referencedSCOs = bySCO.count
        for (sco, versions) in bySCO.sorted(by: { $0.key < $1.key }) {
            let object = layout.scoObject(sco)
            if deleted.contains(sco.rawValue) {
                report.problems.append("\(object) is marked for deletion but \(versions.count) live cluster(s) are in it")
            }
            guard contents.scoObjects[sco] != nil else {
                report.problems.append("\(object) is missing but \(versions.count) live cluster(s) are in it")
                continue
            }
            guard let info = contents.scoInfo(sco) else {
                report.problems.append("\(object) holds live clusters but no TLog or scrub result describes it")
                continue
            }
            if quick { continue }
            let bytes: ByteBuffer
            do {
                bytes = try await replay.readSCO(sco)
            } catch {
                report.problems.append("\(object) cannot be read: \(error.message)")
                continue
            }
            report.verifiedBytes += UInt64(bytes.readableBytes)
            if UInt64(bytes.readableBytes) != info.lengthBytes {
                report.problems.append("\(object) is \(bytes.readableBytes) bytes, its history says \(info.lengthBytes)")
            } else if CRC32C.checksum(bytes) != info.crc {
                report.problems.append("\(object) does not match the checksum its history recorded")
            }
            if clusters {
                let clusterBytes = Int(contents.config.clusterSizeBytes)
                for version in versions {
                    let offset = Int(version.location.offset)
                    guard let cluster = bytes.getSlice(at: bytes.readerIndex + offset, length: clusterBytes),
                        CRC32C.checksum(cluster) == version.location.crc
                    else {
                        report.problems.append(
                            "cluster \(version.address) (epoch \(version.epoch)) in \(object) at offset \(offset) does not verify")
                        continue
                    }
                }
            }
            progress("checked \(object)")
        }
        // Orphans.
        let described = Set(contents.results.values.flatMap { $0.created.map(\.sco) })
        for (sco, _) in contents.scoObjects.sorted(by: { $0.key < $1.key }) {
            let object = layout.scoObject(sco)
            if ScrubResult.isScrubSCO(sco) && !described.contains(sco.rawValue) {
                report.orphans.append(object)
            } else if deleted.contains(sco.rawValue) && bySCO[sco] == nil {
                report.orphans.append(object)
            } else if !ScrubResult.isScrubSCO(sco), let last = contents.lastEpoch, sco > last {
                report.inFlight.append(object)
            }
        }
        if repair {
            for object in report.orphans {
                try await backend.delete(object)
                report.removedOrphans.append(object)
            }
        }
        return report
    }
}
