// The data-safety issue's scenarios, each as a scripted simulation: the exact sequence of events (a crash at a named
// point, a full disk, a power loss right after a roll, a backend that refuses one kind of object) with the model
// checking every read and every recovery. Each of these failed before its fix (see docs/simulation.md).

import Foundation
import NIOCore
import Testing
import VolumeCore
import VolumeSimulation

@Suite struct DataSafetyScenarioTests {
    static let seeds: [UInt64] = [1, 2, 3]

    func expectPasses(_ report: SimulationReport, _ what: String) {
        #expect(
            report.passed,
            "\(what), seed \(report.seed): \(report.failure ?? "")\n\(report.trace.suffix(40).joined(separator: "\n"))")
    }

    /// Scenario 1: an SCO reached the backend before its TLog, then the node lost its flash. The restart must
    /// continue the epochs without a gap, never write over that object, and keep every write flushed afterwards.
    @Test(arguments: seeds) func anSCOWithoutItsTLogNeverMakesTheHistorySkipAnEpoch(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<2048)
            try script.flush()
            try script.wait(seconds: 20)  // sealed by age and stored
            let scos = script.store.names.filter { $0.hasPrefix("vol1/sco/") }.sorted()
            guard let last = scos.last, let number = UInt64(last.dropFirst("vol1/sco/".count), radix: 16) else {
                throw script.fail("nothing was uploaded")
            }
            let orphan = "vol1/sco/" + SCONumber(number + 1).hex
            let planted = script.store.peek(last)!
            script.store.plant(orphan, planted)
            script.trace("planted \(orphan) (a copy of \(last)): an SCO uploaded without its TLog")
            try script.crash(.flashLost)
            try script.write(sectors: 4096..<6144)
            try script.flush()
            try script.crash(.process)
            try script.write(sectors: 8192..<8200)
            try script.flush()
            try script.crash(.process)
            guard script.store.peek(orphan) == planted else { throw script.fail("\(orphan) was written over") }
            let tlogs = script.store.names.filter { $0.hasPrefix("vol1/tlog/") }.compactMap {
                UInt64($0.dropFirst("vol1/tlog/".count), radix: 16)
            }.sorted()
            guard tlogs == Array(1...UInt64(tlogs.count)) else { throw script.fail("the TLogs have a gap: \(tlogs)") }
        }
        expectPasses(report, "orphan SCO then flash lost")
    }

    /// Scenario 1, second way: a crash inside a roll (the next journal created, the old one not sealed yet).
    @Test(arguments: seeds) func aCrashInsideARollLosesNoFlushedWrite(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<512)
            try script.flush()
            script.arm("roll-after-next-journal")
            try script.snapshot("s1")
            try script.crash(.process)
            try script.write(sectors: 1024..<1536)
            try script.flush()
            try script.crash(.process)
            try script.write(sectors: 2048..<2056)
            try script.flush()
            try script.crash(.power)
        }
        expectPasses(report, "crash inside a roll")
    }

    /// Scenario 1, third way: the disk is full when the next journal is created.
    @Test(arguments: seeds) func aFullDiskWhileRollingLeavesNoGap(seed: UInt64) {
        let report = SimulationScript.run(seed: seed, tolerateErrors: true) { script in
            try script.write(sectors: 0..<512)
            try script.flush()
            script.fs.failNext["fallocate"] = (1, VDError(.noSpace, "fallocate: No space left on device"))
            try script.snapshot("s1")
            try script.crash(.process)
            try script.write(sectors: 1024..<1536)
            try script.flush()
            try script.crash(.process)
        }
        expectPasses(report, "ENOSPC while rolling")
    }

    /// Scenario 3: the roll's checkpoint (the map says the next epoch has begun) reaches durable storage, then the
    /// power goes before the old journal is synced. The map must not be trusted past what the journal kept.
    @Test(arguments: seeds) func theMapIsNeverTrustedAheadOfTheDurableJournal(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            script.maps.autoFlushProbability = 1  // every map write durable at once (RocksDB may flush any time)
            try script.write(sectors: 0..<64)
            try script.flush()
            try script.write(sectors: 0..<2048)  // not flushed: torn by the power loss
            script.arm("roll-after-checkpoint")
            try script.snapshot("s1")
            try script.crash(.power)
            try script.write(sectors: 4096..<4104)
            try script.flush()
            try script.crash(.process)
        }
        expectPasses(report, "map ahead of the journal")
    }

    /// Found by the simulation once it armed failpoints at random (seed 459 of 300 operations): a roll killed after
    /// its checkpoint leaves the old journal sealed in the page cache only; the restart found it sealed and wrote its
    /// TLog (a durable claim to its contents) without syncing it, so a power loss then left a TLog naming data the
    /// SCO no longer held, and that SCO went to the backend torn.
    @Test(arguments: seeds) func aRestartSyncsAJournalBeforeItsTLogClaimsIt(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<64)
            try script.flush()
            try script.write(sectors: 0..<2048)  // not flushed: only in the page cache
            script.arm("roll-after-checkpoint")
            try script.snapshot("s1")
            try script.crash(.process)
            try script.crash(.power)
            try script.write(sectors: 4096..<4104)
            try script.flush()
            try script.drainAndRestoreFromBackend()
        }
        expectPasses(report, "restart after a roll killed after its checkpoint, then a power loss")
    }

    /// Scenario 3, second way: a rollback applied to the map in steps, cut short by a power loss. Whatever the map
    /// kept must be what a replay of the durable journal gives (a restore from the backend rebuilds it that way).
    @Test(arguments: seeds) func aRollbackCutShortLeavesTheMapAsTheJournalSays(seed: UInt64) {
        let report = SimulationScript.run(seed: seed, mapChunkClusters: 16) { script in
            script.maps.autoFlushProbability = 1
            try script.write(sectors: 0..<4096)
            try script.flush()
            try script.snapshot("s1")
            try script.write(sectors: 0..<4096)
            try script.flush()
            script.arm("map-intermediate-apply")
            try script.rollback(to: "s1")
            try script.crash(.power)
            try script.drainAndRestoreFromBackend()
        }
        expectPasses(report, "rollback cut short")
    }

    /// Scenario 5: the snapshot table cannot be uploaded. TLogs that depend on it must wait for it, so a restore from
    /// the backend never lacks a snapshot of the history it restores.
    @Test(arguments: seeds) func aRestoreFromTheBackendKeepsEverySnapshotItsTLogsReach(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<1024)
            try script.flush()
            script.store.failingPrefixes = ["vol1/snapshots/"]
            try script.snapshot("s1")
            try script.write(sectors: 0..<1024)
            try script.flush()
            try script.wait(seconds: 30)
            // The node is lost (the backend answers again for its restart).
            script.store.failingPrefixes = []
            try script.crash(.flashLost)
            try script.wait(seconds: 30)
            try script.snapshot("s2")
            try script.wait(seconds: 30)
            try script.crash(.flashLost)
        }
        expectPasses(report, "snapshot table refused by the backend")
    }

    /// Scenario 6 (with 5): a scrub while the backend's snapshot table is stale must not treat what a snapshot reads
    /// as garbage.
    @Test(arguments: seeds) func aScrubNeverChangesWhatASnapshotReads(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<8192)
            try script.flush()
            script.store.failingPrefixes = ["vol1/snapshots/"]
            try script.snapshot("s1")
            try script.write(sectors: 0..<8192)
            try script.flush()
            try script.wait(seconds: 30)
            let scrubber = try script.startScrub()
            try script.runUntil { script.scrubDone(scrubber) }
            try script.wait(seconds: 60)  // the router applies the result and deletes the sources
            try script.verify()
            script.store.failingPrefixes = []
            try script.wait(seconds: 30)
            let again = try script.startScrub()
            try script.runUntil { script.scrubDone(again) }
            try script.wait(seconds: 60)
        }
        expectPasses(report, "scrub with a stale snapshot table")
    }

    /// Found by the simulation once clones moved between routers changed its trajectories (seed 1325 with
    /// ownership): a scrub replayed the TLogs up to just before a rollback, with the newer snapshot table the
    /// rollback had already uploaded (its target deleted since). It judged the versions the rollback makes current
    /// again dead, so its result left them out and the router deleted the SCOs they are in. A rollback the table
    /// records beyond the replayed TLogs keeps what its target reads live.
    @Test(arguments: seeds) func aScrubBeforeARollbackIsStoredKeepsWhatTheRollbackRestores(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<8192)
            try script.flush()
            try script.snapshot("s1")
            try script.write(sectors: 0..<4096)
            try script.flush()
            try script.wait(seconds: 30)
            script.store.failingPutPrefixes = ["vol1/tlog/"]
            try script.rollback(to: "s1")
            try script.deleteSnapshot("s1")
            try script.wait(seconds: 10)
            let scrubber = try script.startScrub()
            try script.runUntil { script.scrubDone(scrubber) }
            if let error = script.scrubError(scrubber) { throw script.fail("the scrub failed: \(error)") }
            script.store.failingPutPrefixes = []
            try script.wait(seconds: 60)  // the TLogs go up; the router applies the result and deletes the sources
            try script.verify()
            try script.drainAndRestoreFromBackend()
        }
        expectPasses(report, "scrub replayed before a rollback was stored")
    }

    /// Found by the torture run ("Bug B"): once the only snapshot is deleted, an unmap leaves an older version in the
    /// map's history that a later snapshot must never read.
    @Test(arguments: seeds) func aSnapshotAfterAnUnmapNeverReadsADeletedSnapshotsVersion(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<128)
            try script.snapshot("s1")
            try script.write(sectors: 0..<128)
            try script.deleteSnapshot("s1")
            try script.wait(seconds: 1)
            try script.trim(sectors: 0..<128)
            try script.snapshot("s2")
            try script.verify()
            try script.crash(.process)
        }
        expectPasses(report, "unmap after the only snapshot was deleted")
    }

    /// Found by the torture run on CI (seeds 24 and 4): an unmap with no snapshot left removed a cluster's key but
    /// left the versions a deleted snapshot had kept; a write after a later snapshot recreated the key, and that
    /// snapshot read the deleted snapshot's data where the volume had been trimmed. The crash right after the
    /// deletion stops the background pass that drops dead versions (as a crash, or a busy router, may in the field)
    /// and the map the restart opens still has them.
    @Test(arguments: seeds) func aTrimAfterASnapshotIsDeletedNeverLetsItsVersionsBack(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<128)
            try script.snapshot("s1")
            try script.write(sectors: 0..<128)
            try script.flush()
            try script.wait(seconds: 20)  // sealed by age: the map's checkpoint covers the overwrite
            try script.deleteSnapshot("s1")
            try script.crash(.process)
            try script.trim(sectors: 0..<128)
            try script.snapshot("s2")
            try script.write(sectors: 0..<128)
            try script.verify()
            try script.crash(.process)
        }
        expectPasses(report, "trim after a snapshot was deleted, then a snapshot and a write")
    }

    /// Found by the simulation (S7, seed 124 × 300): a lease record that does not verify was read as "no lease", so
    /// a second scrubber ran beside the first and its leftover removal deleted an SCO the first one's applied result
    /// had moved data to. Such a lease must read as held ("busy").
    @Test(arguments: seeds) func aDamagedScrubLeaseNeverLetsASecondScrubberIn(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            try script.write(sectors: 0..<16384)
            for start in stride(from: 0, to: 16384, by: 2048) { try script.write(sectors: start..<(start + 1024)) }
            try script.flush()
            try script.wait(seconds: 30)
            let first = try script.startScrub()
            try script.runUntil { script.store.peek("vol1/scrub.lease") != nil || script.scrubDone(first) }
            guard !script.scrubDone(first) else { throw script.fail("the scrub ended before its lease was damaged") }
            script.store.plant("vol1/scrub.lease", ByteBuffer(repeating: 0x5a, count: 300))
            script.trace("damaged vol1/scrub.lease")
            let second = try script.startScrub()
            try script.runUntil { script.scrubDone(second) }
            guard let error = script.scrubError(second), error.code == .busy else {
                throw script.fail(
                    "a second scrubber was let in beside the first: \(script.scrubError(second).map { "\($0)" } ?? "it ran")"
                )
            }
            try script.runUntil { script.scrubDone(first) }
            try script.wait(seconds: 60)
            try script.verify()
        }
        expectPasses(report, "damaged scrub lease")
    }

    /// Scenario 4: `vd check --repair` while a scrub runs must leave the scrub's new SCOs alone.
    @Test(arguments: seeds) func checkRepairLeavesARunningScrubAlone(seed: UInt64) {
        let report = SimulationScript.run(seed: seed) { script in
            // Half of every SCO stays live: the scrub copies several MiB and uploads its new SCOs one by one (with
            // less, it wrote a single SCO right before its result and the check never overlapped it).
            try script.write(sectors: 0..<16384)
            for start in stride(from: 0, to: 16384, by: 2048) { try script.write(sectors: start..<(start + 1024)) }
            try script.flush()
            try script.wait(seconds: 30)
            let scrubber = try script.startScrub()
            try script.runUntil {
                script.store.names.contains { $0.hasPrefix("vol1/sco/8") } || script.scrubDone(scrubber)
            }
            try script.check(repair: true)
            try script.runUntil { script.scrubDone(scrubber) }
            try script.wait(seconds: 60)
            try script.verify()
            try script.check(repair: false)
        }
        expectPasses(report, "check --repair during a scrub")
    }
}
