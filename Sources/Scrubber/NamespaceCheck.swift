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
    /// Router SCOs above every SCO of the history (uploads in flight while a router runs), and SCOs of a scrub
    /// that is running: not orphans.
    package var inFlight: [String] = []
    package var notes: [String] = []
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
        report.tlogs =
            contents.lastEpoch.map { Int($0.rawValue - (contents.tlogNumbers.first?.rawValue ?? 1) + 1) } ?? 0
        if let last = contents.lastEpoch {
            let beyond = contents.tlogNumbers.filter { $0 > last.next }
            if !beyond.isEmpty {
                report.problems.append(
                    "the history stops at TLog \(last.hex) but later TLogs exist (\(beyond.map(\.hex).prefix(5).joined(separator: ", "))): a TLog is missing"
                )
            }
        }
        let deleted = contents.deletedSources
        // A router may finish a scrub result while the check runs (its history moved past the replay): a source it
        // deleted meanwhile is no problem of the namespace. Looked up once, on the first object found missing.
        var sourcesFinishedSince: Set<UInt64>?
        func finishedSince(_ sco: SCONumber) async throws(VDError) -> Bool {
            if sourcesFinishedSince == nil {
                var sources: Set<UInt64> = []
                let (ids, applied) = try await NamespaceObjects.listScrubResults(layout: layout, backend: backend)
                for id in ids where applied.contains(id) {
                    if let known = contents.results[id] {
                        sources.formUnion(known.sources)
                    } else {
                        sources.formUnion(
                            try await NamespaceObjects.loadScrubResult(
                                id, layout: layout, backend: backend, volumeID: contents.config.id
                            ).sources)
                    }
                }
                sourcesFinishedSince = sources
            }
            return sourcesFinishedSince!.contains(sco.rawValue)
        }
        let liveCounts = try replay.liveClustersPerSCO()
        report.liveVersions = liveCounts.values.reduce(0, +)
        report.referencedSCOs = liveCounts.count
        if clusters { try replay.indexLiveVersions(in: Set(liveCounts.keys)) }
        for (sco, count) in liveCounts.sorted(by: { $0.key < $1.key }) {
            let object = layout.scoObject(sco)
            if deleted.contains(sco.rawValue) {
                report.problems.append("\(object) is marked for deletion but \(count) live cluster(s) are in it")
            }
            guard contents.scoObjects[sco] != nil else {
                if try await finishedSince(sco) {
                    report.notes.append("\(object) was deleted by a scrub result the router finished during the check")
                } else {
                    report.problems.append("\(object) is missing but \(count) live cluster(s) are in it")
                }
                continue
            }
            guard let info = contents.scoInfo(sco) else {
                report.problems.append("\(object) holds live clusters but no TLog or scrub result describes it")
                continue
            }
            if quick { continue }
            let bytes: ByteBuffer
            do {
                bytes = try await replay.readSCO(sco, crc: info.crc)
            } catch  where error.code == .corrupt {
                // Read again without the check to say how it differs.
                if let raw = try? await replay.readSCO(sco), UInt64(raw.readableBytes) != info.lengthBytes {
                    report.problems.append(
                        "\(object) is \(raw.readableBytes) bytes, its history says \(info.lengthBytes)")
                } else {
                    report.problems.append(
                        "\(object) does not match the checksum its history recorded: \(error.message)")
                }
                continue
            } catch  where error.code == .notFound {
                if try await finishedSince(sco) {
                    report.notes.append("\(object) was deleted by a scrub result the router finished during the check")
                } else {
                    report.problems.append("\(object) cannot be read: \(error.message)")
                }
                continue
            } catch {
                report.problems.append("\(object) cannot be read: \(error.message)")
                continue
            }
            report.verifiedBytes += UInt64(bytes.readableBytes)
            if clusters {
                let clusterBytes = Int(contents.config.clusterSizeBytes)
                for version in try replay.liveVersions(in: sco) {
                    let offset = Int(version.location.offset)
                    guard let cluster = bytes.getSlice(at: bytes.readerIndex + offset, length: clusterBytes),
                        CRC32C.checksum(cluster) == version.location.crc
                    else {
                        report.problems.append(
                            "cluster \(version.address) (epoch \(version.epoch)) in \(object) at offset \(offset) does not verify"
                        )
                        continue
                    }
                }
            }
            progress("checked \(object)")
        }
        // Orphans. SCOs a scrub wrote but no result names yet may belong to a scrub that is running: they are
        // orphans only while nobody holds the scrub lease, which `--repair` takes before removing anything.
        let described = Set(contents.results.values.flatMap { $0.created.map(\.sco) })
        let (inFlight, routerOrphans) = contents.unreferencedRouterSCOs()
        report.inFlight = inFlight.map { layout.scoObject($0) }
        var scrubLeftovers: [String] = []
        for (sco, _) in contents.scoObjects.sorted(by: { $0.key < $1.key }) {
            let object = layout.scoObject(sco)
            if ScrubResult.isScrubSCO(sco) && !described.contains(sco.rawValue) {
                scrubLeftovers.append(object)
            } else if deleted.contains(sco.rawValue) && liveCounts[sco] == nil {
                report.orphans.append(object)
            }
        }
        report.orphans += routerOrphans.map { layout.scoObject($0) }
        // TLogs named with another generation than the chain gives their epoch: a fenced owner's late uploads.
        report.orphans += contents.foreignTLogs
        if !repair {
            report.orphans += scrubLeftovers
            return report
        }
        let lease: ScrubLease
        do {
            lease = try await ScrubLease.acquire(layout: layout, backend: backend, seconds: 60, env: env)
        } catch  where error.code == .busy {
            report.inFlight += scrubLeftovers
            report.notes.append("a scrub is running: its new SCOs are left alone (\(error.message))")
            for object in report.orphans {
                try await backend.delete(object)
                report.removedOrphans.append(object)
            }
            return report
        }
        // With the lease: a result written after the replay above would name these; look again.
        let results = Set(try await scrubResultIDs(layout: layout, backend: backend))
        var stillUndescribed: [String] = []
        for object in scrubLeftovers {
            if let sco = SCONumber(hex: object.dropFirst(layout.scoPrefix.count)),
                !results.contains(ScrubResult.resultID(ofSCO: sco))
            {
                stillUndescribed.append(object)
            }
        }
        report.orphans += stillUndescribed
        for object in report.orphans {
            try await backend.delete(object)
            report.removedOrphans.append(object)
        }
        await lease.release(backend: backend)
        return report
    }

    /// Ids of every scrub result in the namespace now.
    private func scrubResultIDs(layout: VolumeLayout, backend: any ObjectStore) async throws(VDError) -> [UInt64] {
        try await backend.list(prefix: layout.scrubPrefix).compactMap { info -> UInt64? in
            let name = info.name.dropFirst(layout.scrubPrefix.count)
            return name.hasSuffix(".applied") ? nil : UInt64(name, radix: 16)
        }
    }
}
