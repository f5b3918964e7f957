// Closing a volume: stop taking writes, make everything replied durable, optionally seal the open journal and wait
// until the backend holds everything (a drain, so the volume can move to another node), then stop the background
// work and close the map.

import BlockMap
import Logging
import SCOCache
import Synchronization
import VolumeCore

/// How a close ended.
package struct CloseResult: Sendable {
    /// Every write is on the backend (only meaningful for a drain).
    package var drained: Bool
    /// What was still not on the backend when a drain timed out.
    package var unstoredBytes: UInt64
    package var pendingSCOs: Int
    /// The owner record was released (only after a drain whose final seal succeeded and reached the backend).
    package var released = false
}

extension Volume {
    /// Closes the volume. With `drainTimeoutSeconds`, seals the open journal and waits up to that long for the
    /// backend to hold everything.
    package func close(drainTimeoutSeconds: Double? = nil, releaseTo node: String? = nil) async -> CloseResult {
        // 1. New writes fail; the journal leader finishes what was queued (a barrier through it waits for that).
        journal.refuseWrites(VDError(.shutdown, "volume \(config.name) is closing"))
        do throws(VDError) { try await journal.submit(.barrier, whileClosing: true) } catch {}
        while journal.isBusy {
            // Only after a fatal failure (the barrier was refused): wait for the leader directly.
            await env.clock.sleep(for: .milliseconds(1))
        }
        // 2. Everything replied becomes durable.
        do throws(VDError) {
            try await flusher.syncThrough(journal.writtenGeneration)
        } catch {
            logger.error("final sync of volume \(config.name) failed: \(error)")
        }
        // ... and on the DTL peer (or the mirror degrades and records it), before anything can be lost with this node.
        await flushAndStopMirror()
        var drained = false
        var sealed = false
        if let timeout = drainTimeoutSeconds {
            // 3. Seal the open journal (through the leader, like any roll) and wait for the uploads.
            do throws(VDError) {
                try await journal.submit(.roll, whileClosing: true)
                sealed = true
            } catch {
                logger.error("cannot seal the open SCO of \(config.name): \(error)")
            }
            let deadline = env.clock.now() + .milliseconds(Int64(timeout * 1000))
            let lastSealed = SCONumber(journal.openEpoch - 1)
            while env.clock.now() < deadline {
                // Every sealed epoch and the newest snapshot table (a deletion may have changed only the table).
                if uploader.storedThrough >= lastSealed && !catalog.needsUpload {
                    drained = true
                    break
                }
                await env.clock.sleep(for: .milliseconds(50))
            }
        }
        // 4. Stop background work and wait for it.
        uploader.stop()
        let tasks = background.withLock { tasks -> [Task<Void, Never>] in
            defer { tasks = [] }
            return tasks
        }
        for task in tasks { await task.value }
        await journal.stop()
        await stopMirror()
        let status = uploadStatus
        do throws(VDError) { try map.persist() } catch {
            logger.error("cannot persist the map of \(config.name): \(error)")
        }
        map.close()
        parent?.detach()
        var result = CloseResult(
            drained: drained || (drainTimeoutSeconds != nil && status.pendingSCOs == 0 && status.unstoredBytes <= 8192),
            unstoredBytes: status.unstoredBytes, pendingSCOs: status.pendingSCOs)
        // Another router takes a released volume from the backend alone: release only when the final seal went
        // through and its epoch is stored (never on the small-remainder tolerance above).
        if drained && sealed { result.released = await releaseOwnership(to: node) }
        ownerLease?.stopRenewing()
        return result
    }
}
