#!/usr/bin/env python3
"""Applies one named mutation (a reverted data-safety fix or a broken invariant) to the Sources of a checkout, for
the mutation check in docs/simulation.md. Usage: apply.py MUTATION [REPO]  (REPO defaults to this checkout).
Each replacement must match exactly once: a mutation that no longer applies fails loudly."""
import os, sys
REPO = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
S = os.path.join(REPO, "Sources") + "/"
def sub(path, old, new, count=1):
    p = S + path
    t = open(p).read()
    n = t.count(old)
    if n != count:
        sys.exit(f"{path}: expected {count} of {old!r}, found {n}")
    t = t.replace(old, new)
    open(p, "w").write(t)

m = sys.argv[1]
if m == "M1":
    sub("VolumeRouter/Volume+Open.swift", "let epoch = (lastEpoch ?? 0) + 1\n        let sco = highestSCO.next",
        "let epoch = max(lastEpoch ?? 0, highestSCO.rawValue) + 1\n        let sco = highestSCO.next")
elif m == "M2":
    sub("VolumeRouter/Volume+Open.swift", "let sco = highestSCO.next\n        let (file, headerCRC)",
        "let sco = SCONumber((lastEpoch ?? 0) + 1)\n        let (file, headerCRC)")
elif m == "M2b":
    sub("VolumeRouter/Journal.swift", '        precondition(!fs.fileExists(path), "SCO number \\(sco.hex) is used again")\n', "")
elif m == "M3":
    sub("BlockMap/BlockMap.swift", "try view.scan(from: Self.currentKey(start)", "try database.scan(from: Self.currentKey(start)")
    sub("BlockMap/BlockMap.swift", "try view.scan(from: Self.historyKey(start, epoch: .max)", "try database.scan(from: Self.historyKey(start, epoch: .max)")
elif m == "M4":
    sub("VolumeRouter/Volume+Open.swift", "guard lastEpochComplete, checkpoint.offset <= blockBytes", "guard checkpoint.offset <= blockBytes")
elif m == "M5":
    sub("BlockMap/MapChanges.swift", """        if let dirtyCheckpoint, intermediate {
            update.metadata.append((MapCheckpoint.key, dirtyCheckpoint.encode()))
        }
""", "")
elif m == "M6" or m == "M7":
    p = S + "Scrubber/NamespaceCheck.swift"
    t = open(p).read()
    start = t.index("        let lease: ScrubLease\n        do {\n            lease = try await ScrubLease.acquire(")
    end_marker = "        await lease.release(backend: backend)\n        return report\n    }\n"
    end = t.index(end_marker, start) + len(end_marker)
    t = t[:start] + """        report.orphans += scrubLeftovers
        for object in report.orphans {
            try await backend.delete(object)
            report.removedOrphans.append(object)
        }
        return report
    }
""" + t[end:]
    open(p, "w").write(t)
    if m == "M7":
        sub("VolumeRouter/ScrubApplier.swift", "guard try await createdSCOsAreThere(result) else { continue }", "")
elif m == "M8":
    sub("VolumeRouter/Uploader.swift", """guard !state.stopping, state.scoUploaded.contains(next), let sealed = state.sealed[next],
                sealed.tableVersion <= uploadedTable
            else { return nil }""", """guard !state.stopping, state.scoUploaded.contains(next), let sealed = state.sealed[next]
            else { return nil }""")
    sub("VolumeRouter/Uploader.swift", "|| (state.scoUploaded.contains(next) && (state.sealed[next]?.tableVersion ?? 0) <= uploadedTable)",
        "|| (state.scoUploaded.contains(next))")
elif m == "M9":
    sub("Scrubber/ScrubLease.swift", """        } catch  where error.code == .corrupt {
            throw VDError(
                .busy,
                "the scrub lease \\(layout.scrubLeaseObject) does not verify (\\(error.message)); if no scrub of \\(layout.namespace) runs, delete that object"
            )
        }""", """        } catch  where error.code == .corrupt {
            return nil
        }""")
elif m == "M10":
    sub("VolumeRouter/Volume+Open.swift", """            guard let tlog = try TLogFiles.read(SCONumber(epoch), directory: layout.tlogDirectory, fs: env.fs),
                let sealed = tlog.records.lazy.compactMap({ record -> (SCONumber, UInt64)? in
                    if case .scoSealed(let sco, let length, _) = record { return (sco, length) }
                    return nil
                }).last
            else {
                throw VDError(.corrupt, "local TLog of epoch \\(epoch) of volume \\(config.name) names no SCO")
            }
            result.append((SCONumber(epoch), (sealed.0, sealed.1)))""", """            guard let tlog = try TLogFiles.read(SCONumber(epoch), directory: layout.tlogDirectory, fs: env.fs),
                let sealed = tlog.records.lazy.compactMap({ record -> (SCONumber, UInt64)? in
                    if case .scoSealed(let sco, let length, _) = record { return (sco, length) }
                    return nil
                }).last
            else {
                throw VDError(.corrupt, "local TLog of epoch \\(epoch) of volume \\(config.name) names no SCO")
            }
            let file = try env.fs.open(layout.scoPath(sealed.0), options: .readOnly)
            defer { file.close() }
            let fileSize = try file.size()
            result.append((SCONumber(epoch), (sealed.0, fileSize)))""")
elif m == "M11":
    sub("VolumeRouter/Volume.swift", "guard !isLocalOnly(sco) else { throw .corrupt(message) }",
        "guard !isLocalOnly(sco) && !ScrubResult.isScrubSCO(sco) else { throw .corrupt(message) }")
elif m == "M12":
    sub("VolumeSimulation/SimFileSystem.swift", "_ = try directory(components(path)[...], create: true, durably: true)",
        "_ = try directory(components(path)[...], create: true, durably: false)")
elif m == "M13":
    sub("VolumeRouter/Journal.swift", """            try file.sync()
            try fs.syncDirectory(layout.scoDirectory)
            return (file, BatchHeader.storedCRC(of: header))""", """            try file.sync()
            return (file, BatchHeader.storedCRC(of: header))""")
elif m == "M14":
    sub("VolumeRouter/Journal.swift", """        let result: Result<Void, VDError>
        do {
            try await perform([own] + followers.map(\\.request))
            result = .success(())
        } catch {
            result = .failure(error)
        }
        for follower in followers { follower.continuation.resume(returning: .done(result)) }
""", """        for follower in followers { follower.continuation.resume(returning: .done(.success(()))) }
        let result: Result<Void, VDError>
        do {
            try await perform([own] + followers.map(\\.request))
            result = .success(())
        } catch {
            result = .failure(error)
        }
""")
elif m == "M15":
    sub("VolumeRouter/Journal.swift", "shared.withLock { ($0.writtenGeneration, $0.unsyncedFiles + [$0.currentFile]) }",
        "shared.withLock { ($0.writtenGeneration, [$0.currentFile]) }")
elif m == "M16":
    sub("VolumeRouter/Volume+Snapshots.swift", "guard successor == .max || (openEpoch > 0 && successor < openEpoch - 1) else { return }",
        "guard successor + 1 < openEpoch else { return }")
elif m == "M17":
    sub("BlockMap/BlockMap.swift", """        guard let current = try current(address) else { return nil }
        if current.epoch <= epoch { return current }
""", """        if let current = try current(address), current.epoch <= epoch { return current }
""")
    sub("BlockMap/BlockMap.swift", "if currentEpochs[address] != nil && readBySnapshot(value.epoch, successor: next) {",
        "if readBySnapshot(value.epoch, successor: next) {")
elif m == "M18":
    sub("VolumeRouter/Volume+Durability.swift", """                let scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes)
                guard scan.isSealed, scan.header.epoch == epoch else {""", """                let scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes,
                    verifyPayloads: false)
                guard scan.isSealed, scan.header.epoch == epoch else {""")
elif m == "M19":
    sub("BlockMap/MapChanges.swift", "                if !keepTombstones { removed.insert(written) }\n", "")
elif m == "M20":
    sub("VolumeRouter/Volume+Open.swift", """            } else {
                // Sealed before a process crash, maybe only in the page cache: durable before a TLog claims it.
                try file.dataSync()
            }""", "            }")
elif m == "M21":
    # The journal's mirror block moves ahead of the pwritev (the overlap docs/performance.md tried and dropped).
    p = S + "VolumeRouter/Journal.swift"
    t = open(p).read()
    start = t.index("        // Mirrored only once written here")
    end = t.index("        let startCheckpoint = MapCheckpoint(")
    block = t[start:end]
    open(p, "w").write(t[:start] + t[end:])
    sub("VolumeRouter/Journal.swift", "        let written = pending.endOffset - pending.startOffset\n", "")
    sub("VolumeRouter/Journal.swift", "        await reserveJournal(start, pending.endOffset)\n",
        "        await reserveJournal(start, pending.endOffset)\n"
        "        let written = pending.endOffset - pending.startOffset\n" + block)
elif m == "M22":
    # The CRC the journal derives for a mirrored range from its batches' CRCs is wrong (one cluster's is off).
    sub("VolumeRouter/Journal.swift", "crc = CRC32C.combine(crc, clusterCRC, lengthB:", "crc = CRC32C.combine(crc, clusterCRC ^ 1, lengthB:")
else:
    sys.exit("unknown " + m)
print("applied", m)
