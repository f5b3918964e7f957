// `vd scrub`: compacts SCOs that are mostly dead (their clusters were overwritten, or only deleted snapshots read
// them). It works from the backend namespace alone, so it can run on any node, from cron.
//
//  1. Takes the volume's scrub lease (NAME/scrub.lease): two scrubbers never act on one volume.
//  2. Removes what a killed earlier run left behind: SCOs it wrote but never described in a result.
//  3. Replays the namespace and finds every live cluster version (NamespaceReplay).
//  4. Picks SCOs whose live fraction is under the threshold (not the sources of results still pending), the most
//     dead first, within --max-bytes and --max-seconds.
//  5. Reads each (verifying every live cluster's CRC: corrupt data is reported, never copied), packs the live
//     clusters into new SCOs (numbers with the top bit set), uploads them.
//  6. Writes the scrub result (NAME/scrub/ID). The owning router applies it online and deletes the sources later.
//
// Safe to kill at any point: before the result exists nothing refers to the new SCOs (the next run removes them);
// after, the result is complete and the router applies it. Running it again does not repeat work: sources of
// pending results are skipped.

import BlockMap
package import FlashIO
import Foundation
package import Logging
import NIOCore
package import ObjectStore
import SnappyCodec
package import VolumeCore

package struct ScrubOptions: Sendable {
    /// SCOs whose live fraction is below this are rewritten.
    package var liveFractionThreshold: Double = 0.5
    /// Bytes of source SCOs processed at most per run.
    package var maxBytes: UInt64 = .max
    /// Stop picking new SCOs after this long.
    package var maxSeconds: Double = .infinity
    /// Bytes read from the backend per second at most (0: unlimited), so guests keep their I/O.
    package var rateBytesPerSecond: UInt64 = 0
    /// Size of the SCOs written.
    package var scoSizeBytes: UInt64 = Limits.scoSizeBytesDefault
    /// Compress the SCOs written (like the router does for this backend).
    package var compress = false
    package var leaseSeconds: Double = 300
    /// Cluster versions one result relocates at most (its size in memory and on the backend); a run stops there and
    /// the next one goes on.
    package var relocationsPerResultMax = 1 << 20
    /// Where the temporary replay map goes.
    package var workDirectory: String = "/tmp"
    package var dryRun = false
    package init() {}
}

/// What a run did, for the terminal and for `--json`.
package struct ScrubSummary: Codable, Sendable {
    package var volume: String
    package var scannedSCOs = 0
    package var scannedBytes: UInt64 = 0
    package var liveBytes: UInt64 = 0
    package var candidateSCOs = 0
    package var rewrittenSCOs = 0
    package var sourceBytes: UInt64 = 0
    package var copiedBytes: UInt64 = 0
    /// Bytes the backend gives back once the router applied the result (sources minus the copies).
    package var reclaimableBytes: UInt64 = 0
    package var resultID: UInt64?
    package var pendingResults = 0
    package var removedLeftovers = 0
    package var seconds: Double = 0
    package var stoppedBecause: String?

    package init(volume: String) { self.volume = volume }
}

package struct Scrubber {
    package let volume: VolumeName
    package let backend: any ObjectStore
    package let options: ScrubOptions
    package let logger: Logger
    package let env: Environment
    package let progress: @Sendable (String) -> Void

    package init(
        volume: VolumeName, backend: any ObjectStore, options: ScrubOptions, env: Environment, logger: Logger,
        progress: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.volume = volume
        self.backend = backend
        self.options = options
        self.env = env
        self.logger = logger
        self.progress = progress
    }

    package func run() async throws(VDError) -> ScrubSummary {
        let started = env.clock.now()
        func elapsedSeconds() -> Double { started.duration(to: env.clock.now()).seconds }
        var summary = ScrubSummary(volume: volume.rawValue)
        let layout = VolumeLayout(flashDirectory: "", namespace: volume.rawValue)
        let lease = try await ScrubLease.acquire(
            layout: layout, backend: backend, seconds: options.leaseSeconds, env: env)
        defer { env.tasks.spawn { [backend] in await lease.release(backend: backend) } }
        logger.info("scrub of \(volume): lease taken")
        env.tasks.failpoint("after-lease")

        let replay = try await NamespaceReplay.load(
            volume: volume, backend: backend, workDirectory: options.workDirectory, env: env, logger: logger,
            progress: progress)
        defer { replay.close() }
        let contents = replay.contents
        env.tasks.failpoint("after-replay")

        // Leftovers of a killed run: scrub SCOs that no result mentions, even now (looked up again: a run whose lease
        // ran out may still have written its result since the replay listed them).
        let described = Set(contents.results.values.flatMap { $0.created.map(\.sco) })
        let resultsNow = Set(
            try await backend.list(prefix: layout.scrubPrefix).compactMap { info -> UInt64? in
                let name = info.name.dropFirst(layout.scrubPrefix.count)
                return name.hasSuffix(".applied") ? nil : UInt64(name, radix: 16)
            })
        for (sco, _) in contents.scoObjects.sorted(by: { $0.key < $1.key })
        where ScrubResult.isScrubSCO(sco) && !described.contains(sco.rawValue)
            && !resultsNow.contains(ScrubResult.resultID(ofSCO: sco))
        {
            if !options.dryRun {
                logger.info("removing \(layout.scoObject(sco)), left by a scrub that never wrote its result")
                try await backend.delete(layout.scoObject(sco))
            }
            summary.removedLeftovers += 1
        }

        // Live bytes per SCO (memory: one counter per SCO).
        let liveCounts = try replay.liveClustersPerSCO()
        let clusterBytes = UInt64(contents.config.clusterSizeBytes)
        summary.liveBytes = UInt64(liveCounts.values.reduce(0, +)) * clusterBytes
        let pending = contents.pendingResults
        summary.pendingResults = pending.count
        let busy = Set(pending.flatMap { $0.sources + $0.created.map(\.sco) }).union(
            contents.results.values.filter { contents.appliedResults.contains($0.id) }.flatMap(\.sources))
        var candidates: [(sco: SCONumber, length: UInt64, liveBytes: UInt64)] = []
        for (sco, size) in contents.scoObjects where size > 0 {
            // Only SCOs a TLog of the replayed history names (or an applied scrub wrote) are settled.
            guard let info = contents.scoInfo(sco), !busy.contains(sco.rawValue) else { continue }
            if ScrubResult.isScrubSCO(sco),
                !contents.results.values.contains(where: {
                    contents.appliedResults.contains($0.id) && $0.created.contains { $0.sco == sco.rawValue }
                })
            {
                continue
            }
            summary.scannedSCOs += 1
            summary.scannedBytes += info.lengthBytes
            let liveBytes = UInt64(liveCounts[sco] ?? 0) * clusterBytes
            if Double(liveBytes) < options.liveFractionThreshold * Double(info.lengthBytes) {
                candidates.append((sco, info.lengthBytes, liveBytes))
            }
        }
        candidates.sort { Double($0.liveBytes) / Double($0.length) < Double($1.liveBytes) / Double($1.length) }
        summary.candidateSCOs = candidates.count
        if candidates.isEmpty || options.dryRun {
            summary.reclaimableBytes = candidates.reduce(0) { $0 + $1.length - min($1.length, $1.liveBytes) }
            summary.seconds = elapsedSeconds()
            summary.stoppedBecause = options.dryRun ? "dry run" : "nothing to scrub"
            return summary
        }

        // Copy live clusters out of the chosen SCOs. The result id is random and unused: a scrubber whose lease
        // expired while it ran, still writing, never writes over another run's objects.
        var resultID: UInt64 = 0
        while true {
            resultID = 1 + env.random.below(ScrubResult.idLimit - 1)
            let used =
                contents.results[resultID] != nil
                || contents.scoObjects.keys.contains {
                    ScrubResult.isScrubSCO($0) && ScrubResult.resultID(ofSCO: $0) == resultID
                }
            if !used, try await backend.head(layout.scrubResultObject(resultID)) == nil { break }
        }
        try replay.indexLiveVersions(in: Set(candidates.map(\.sco)))
        var writer = SCOPacker(
            volumeID: contents.config.id, clusterSizeBytes: contents.config.clusterSizeBytes, resultID: resultID,
            scoSizeBytes: options.scoSizeBytes)
        var relocations: [ScrubResult.Relocation] = []
        var sources: [UInt64] = []
        var created: [ScrubResult.CreatedSCO] = []
        let throttle = Throttle(bytesPerSecond: options.rateBytesPerSecond, clock: env.clock)
        for candidate in candidates {
            if summary.sourceBytes + candidate.length > options.maxBytes && !sources.isEmpty {
                summary.stoppedBecause = "--max-bytes reached"
                break
            }
            if elapsedSeconds() > options.maxSeconds {
                summary.stoppedBecause = "--max-seconds reached"
                break
            }
            try await lease.renewIfNeeded(backend: backend)
            let versions = try replay.liveVersions(in: candidate.sco)
            if relocations.count + versions.count > options.relocationsPerResultMax && !sources.isEmpty {
                summary.stoppedBecause = "the result is full (\(relocations.count) relocations); run again for the rest"
                break
            }
            if !versions.isEmpty {
                let bytes = try await replay.readSCO(candidate.sco)
                await throttle.account(UInt64(bytes.readableBytes))
                for version in versions {
                    let offset = Int(version.location.offset)
                    guard offset + Int(clusterBytes) <= bytes.readableBytes,
                        let cluster = bytes.getSlice(at: bytes.readerIndex + offset, length: Int(clusterBytes))
                    else {
                        throw VDError(
                            .corrupt,
                            "\(layout.scoObject(candidate.sco)) is shorter than the cluster the map places at offset \(offset)"
                        )
                    }
                    guard CRC32C.checksum(cluster) == version.location.crc else {
                        throw VDError(
                            .corrupt,
                            "volume \(volume) cluster \(version.address): checksum mismatch in \(layout.scoObject(candidate.sco)) at offset \(offset); not copied (run vd check)"
                        )
                    }
                    if let full = writer.add(address: version.address, cluster: cluster, crc: version.location.crc) {
                        created.append(try await upload(full, layout: layout))
                        env.tasks.failpoint("after-sco-upload")
                    }
                    relocations.append(
                        ScrubResult.Relocation(
                            address: version.address, epoch: version.epoch, from: version.location,
                            to: writer.lastLocation!))
                }
            }
            sources.append(candidate.sco.rawValue)
            summary.sourceBytes += candidate.length
            summary.copiedBytes += UInt64(versions.count) * clusterBytes
            summary.rewrittenSCOs += 1
            progress(
                "scrub \(volume): \(summary.rewrittenSCOs)/\(candidates.count) SCOs, \(ByteSize.format(summary.sourceBytes)) processed"
            )
        }
        if let last = writer.finish() { created.append(try await upload(last, layout: layout)) }
        env.tasks.failpoint("before-result")
        // Only the lease holder publishes: a run that lost its lease leaves its SCOs for the next run to remove.
        try await lease.verifyHeld(backend: backend)

        var result = ScrubResult(
            id: resultID, volumeID: contents.config.id, createdAt: env.clock.wallNow(), sources: sources,
            created: created, relocations: relocations,
            sourceBytes: summary.sourceBytes, copiedBytes: summary.copiedBytes)
        result.historyEpoch = contents.lastEpoch?.rawValue
        result.historyTag = contents.lastEpoch.flatMap { contents.generations.tag(ofEpoch: $0.rawValue) }
        try await backend.put(
            layout.scrubResultObject(resultID), data: try MetadataRecord.encode(result, kind: .scrubResult))
        env.tasks.failpoint("after-result")
        summary.resultID = resultID
        let createdBytes = created.reduce(0) { $0 + $1.lengthBytes }
        summary.reclaimableBytes = summary.sourceBytes > createdBytes ? summary.sourceBytes - createdBytes : 0
        summary.seconds = elapsedSeconds()
        return summary
    }

    private func upload(_ sco: PackedSCO, layout: VolumeLayout) async throws(VDError) -> ScrubResult.CreatedSCO {
        let crc = CRC32C.checksum(sco.bytes)
        let data =
            options.compress
            ? CompressedSCO.compress(sco.bytes, volumeID: sco.volumeID, number: sco.number, originalCRC: crc)
            : sco.bytes
        try await backend.put(layout.scoObject(sco.number), data: data)
        return ScrubResult.CreatedSCO(sco: sco.number.rawValue, lengthBytes: UInt64(sco.bytes.readableBytes), crc: crc)
    }
}

/// A finished SCO written by the scrubber.
struct PackedSCO {
    var number: SCONumber
    var volumeID: VolumeID
    var bytes: ByteBuffer
}

/// Packs clusters into SCOs in the journal format (header, chained batches, seal marker), so the SCOs a scrub
/// writes are self-describing like any other.
struct SCOPacker {
    let volumeID: VolumeID
    let clusterSizeBytes: UInt32
    let resultID: UInt64
    let scoSizeBytes: UInt64
    private var index = 0
    private var current:
        (number: SCONumber, bytes: ByteBuffer, chain: UInt32, entries: [BatchEntry], payloads: ByteBuffer)?
    private(set) var lastLocation: ClusterLocation?

    init(volumeID: VolumeID, clusterSizeBytes: UInt32, resultID: UInt64, scoSizeBytes: UInt64) {
        self.volumeID = volumeID
        self.clusterSizeBytes = clusterSizeBytes
        self.resultID = resultID
        self.scoSizeBytes = scoSizeBytes
    }

    /// Adds a cluster; returns an SCO that became full.
    mutating func add(address: ClusterAddress, cluster: ByteBuffer, crc: UInt32) -> PackedSCO? {
        var finished: PackedSCO?
        let needed = UInt64(SCOFormat.blockBytes) * 2 + UInt64(clusterSizeBytes)
        if let open = current,
            UInt64(open.bytes.readableBytes + SCOFormat.blockBytes + open.payloads.readableBytes) + needed
                > scoSizeBytes
        {
            finished = finish()
        }
        if current == nil {
            let number = ScrubResult.scoNumber(result: resultID, index: index)
            index += 1
            let header = SCOHeader(volumeID: volumeID, sco: number, clusterSizeBytes: clusterSizeBytes, epoch: 0)
                .encode()
            current = (number, header, BatchHeader.storedCRC(of: header), [], ByteBuffer())
        }
        if current!.entries.count == BatchHeader.entriesMax { flushBatch() }
        let offset = UInt64(current!.bytes.readableBytes + SCOFormat.blockBytes + current!.payloads.readableBytes)
        current!.entries.append(.data(address: address, crc: crc))
        var payload = cluster
        current!.payloads.writeBuffer(&payload)
        lastLocation = ClusterLocation(sco: current!.number, offset: UInt32(offset), crc: crc)
        return finished
    }

    private mutating func flushBatch() {
        guard var open = current, !open.entries.isEmpty else { return }
        let header = BatchHeader(
            volumeID: volumeID, sco: open.number, offset: UInt64(open.bytes.readableBytes), previousCRC: open.chain,
            entries: open.entries)
        let encoded = header.encode()
        open.chain = BatchHeader.storedCRC(of: encoded)
        open.bytes.writeImmutableBuffer(encoded)
        open.bytes.writeBuffer(&open.payloads)
        open.payloads = ByteBuffer()
        open.entries = []
        current = open
    }

    /// Seals and returns the SCO under construction, if any.
    mutating func finish() -> PackedSCO? {
        flushBatch()
        guard var open = current else { return nil }
        let marker = BatchHeader(
            volumeID: volumeID, sco: open.number, offset: UInt64(open.bytes.readableBytes), previousCRC: open.chain,
            flags: BatchHeader.flagSealed, entries: [])
        open.bytes.writeImmutableBuffer(marker.encode())
        current = nil
        return PackedSCO(number: open.number, volumeID: volumeID, bytes: open.bytes)
    }
}

/// Spreads backend reads over time.
actor Throttle {
    let bytesPerSecond: UInt64
    let clock: any VDClock
    private let started: MonotonicInstant
    private var bytes: UInt64 = 0
    init(bytesPerSecond: UInt64, clock: any VDClock) {
        self.bytesPerSecond = bytesPerSecond
        self.clock = clock
        started = clock.now()
    }

    func account(_ count: UInt64) async {
        guard bytesPerSecond > 0 else { return }
        bytes += count
        let due = Double(bytes) / Double(bytesPerSecond)
        let elapsed = started.duration(to: clock.now()).seconds
        if due > elapsed { await clock.sleep(for: .seconds(double: due - elapsed)) }
    }
}
