// Making writes durable: group-commit flushes and sealing.
//
// Flush: a flush covers every write replied before it. It records the write generation, and one flusher at a time
// fdatasyncs the open journal (and any rolled journal not yet known durable); flushes arriving meanwhile wait for
// the next round, so many flushes share one fdatasync. A failed fdatasync is fatal for the volume's writes (after
// such a failure Linux may have dropped the dirty pages, so a retry could falsely succeed): writes and flushes fail
// from then on, reads continue.
//
// Seal: after a roll, the old journal is fdatasynced, scanned and verified end to end, its TLog written (temporary
// file, fsync, rename), the file trimmed to its length, the map persisted, and the SCO queued for upload.

import BlockMap
import FlashIO
import Logging
import NIOCore
import NIOPosix
import SCOCache
import Synchronization
import TransactionLog
package import VolumeCore

struct SyncState {
    var syncedGeneration: UInt64 = 0
    /// A flusher is running a round (only one at a time).
    var inFlight = false
    var waiters: [(generation: UInt64, continuation: UnsafeContinuation<SyncSignal, Never>)] = []
}

/// What a waiting flush is told.
enum SyncSignal {
    case done(Result<Void, VDError>)
    /// Run the next round yourself (the previous runner handed over).
    case run
}

extension Volume {
    package func flush() async throws(VDError) {
        let (target, failure) = writer.withLock { ($0.writtenGeneration, $0.failure) }
        if let failure, failure.code != .shutdown { throw failure }
        try await syncThrough(target)
    }

    /// Waits until every write of generation `target` or older is on stable storage. Group commit: one flusher at a
    /// time runs an fdatasync round (off the event loops, on the blocking pool); flushes that arrive meanwhile wait
    /// and are all served by the next round.
    func syncThrough(_ target: UInt64) async throws(VDError) {
        let signal: SyncSignal = await withUnsafeContinuation { continuation in
            let immediate = syncState.withLock { state -> SyncSignal? in
                if state.syncedGeneration >= target { return .done(.success(())) }
                if !state.inFlight {
                    state.inFlight = true
                    return .run
                }
                state.waiters.append((target, continuation))
                return nil
            }
            if let immediate { continuation.resume(returning: immediate) }
        }
        switch signal {
        case .done(let result): try result.get()
        case .run: try await runSyncRound(target: target)
        }
    }

    /// One fdatasync round by the current runner; then hands the runner role to a flush still waiting, if any.
    private func runSyncRound(target: UInt64) async throws(VDError) {
        let (generation, files) = writer.withLock { state in
            (state.writtenGeneration, state.unsyncedFiles + [state.currentFile])
        }
        precondition(generation >= target, "a flush waits for a write generation that does not exist yet")
        var failure: VDError?
        do {
            try await blocking { () throws(VDError) in
                for file in files {
                    do throws(VDError) {
                        try file.dataSync()
                    } catch {
                        throw VDError(
                            error.code == .noSpace ? .noSpace : .io,
                            "cannot make writes durable (fdatasync \(file.path)): \(error.message)")
                    }
                }
            }
        } catch {
            failure = VDError(error.code, "volume \(config.name): \(error.message)")
        }
        if let failure {
            markFailed(failure)
        } else {
            writer.withLock { state in
                state.unsyncedFiles.removeAll { synced in
                    synced !== state.currentFile && files.contains { $0 === synced }
                }
            }
        }
        let (ready, next) = syncState.withLock {
            state -> ([UnsafeContinuation<SyncSignal, Never>], UnsafeContinuation<SyncSignal, Never>?) in
            if failure == nil { state.syncedGeneration = max(state.syncedGeneration, generation) }
            var ready: [UnsafeContinuation<SyncSignal, Never>] = []
            var remaining: [(generation: UInt64, continuation: UnsafeContinuation<SyncSignal, Never>)] = []
            for waiter in state.waiters {
                if failure != nil || waiter.generation <= state.syncedGeneration {
                    ready.append(waiter.continuation)
                } else {
                    remaining.append(waiter)
                }
            }
            if remaining.isEmpty {
                state.inFlight = false
                state.waiters = []
                return (ready, nil)
            }
            state.waiters = Array(remaining.dropFirst())
            return (ready, remaining[0].continuation)
        }
        let result: Result<Void, VDError> = failure.map { .failure($0) } ?? .success(())
        for continuation in ready { continuation.resume(returning: .done(result)) }
        next?.resume(returning: .run)
        try result.get()
    }

    /// Stops writes for good after a failure that may have lost acknowledged data on local flash.
    func markFailed(_ error: VDError) {
        let first = writer.withLock { state -> Bool in
            guard state.failure == nil || state.failure?.code == .shutdown else { return false }
            state.failure = error
            return true
        }
        if first { logger.critical("writes to volume \(config.name) are stopped: \(error)") }
    }

    /// Runs blocking file work off the cooperative threads (the router's I/O thread pool).
    func blocking<T: Sendable>(_ body: @escaping @Sendable () throws(VDError) -> T) async throws(VDError) -> T {
        try await env.tasks.blocking(body)
    }

    /// Seals a rolled journal (see the file comment) and queues it for upload. `tableVersion`: the snapshot table
    /// version the epoch's TLog may depend on (uploaded before it).
    func seal(_ sco: SCONumber, epoch: UInt64, file: FlashFile, tableVersion: UInt64) async {
        let config = self.config
        let layout = self.layout
        let map = self.map
        let fs = env.fs
        do {
            let length = try await blocking { () throws(VDError) -> UInt64 in
                try file.dataSync()
                // Every header and payload is read back and verified: what goes to the backend, and the CRC its
                // TLog records, are what flash really holds.
                let scan = try JournalScanner.scan(
                    file: file, volumeID: config.id, sco: sco, clusterSizeBytes: config.clusterSizeBytes)
                guard scan.isSealed, scan.header.epoch == epoch else {
                    throw VDError(
                        .corrupt,
                        "SCO \(sco.hex) of volume \(config.name) does not verify up to its seal marker (\(file.path)): local flash returned different data than was written"
                    )
                }
                let tlog = TLog(
                    volumeID: config.id, number: SCONumber(epoch), clusterSizeBytes: config.clusterSizeBytes,
                    records: scan.tlogRecords())
                try TLogFiles.write(tlog, directory: layout.tlogDirectory, fs: fs)
                try file.truncate(to: scan.validLength)
                file.dropCache()
                var update = MapUpdate()
                update.metadata.append((MapChanges.epochBytesKey(sco), [UInt8](littleEndian64: scan.validLength)))
                try map.apply(update)
                try map.persist()
                return scan.validLength
            }
            writer.withLock { state in state.unsyncedFiles.removeAll { $0 === file } }
            cache.sealed(cacheKey(sco), footprintBytes: length)
            queueUpload(epoch: SCONumber(epoch), sco: sco, lengthBytes: length, tableVersion: tableVersion)
        } catch {
            markFailed(VDError(error.code, "cannot seal SCO \(sco.hex) of volume \(config.name): \(error.message)"))
        }
    }
}
