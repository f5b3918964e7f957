// Runtime options of a volume (from the router configuration; they may change between restarts, unlike the
// volume's identity and cluster size).

package import VolumeCore

package struct VolumeOptions: Sendable {
    /// An SCO is sealed and queued for upload when it reaches this size.
    package var scoSizeBytes: UInt64 = Limits.scoSizeBytesDefault
    /// Un-uploaded data (open journal plus sealed SCOs not yet on the backend) above which writes slow down; at
    /// this bound they wait for uploads.
    package var uploadPendingBytesMax: UInt64 = 2 << 30
    /// The open SCO is sealed once its first write is this old, bounding how much recent data exists only locally.
    package var uploadAgeSecondsMax: Double = 30
    /// SCO uploads in flight per volume (TLogs are uploaded one at a time, in order).
    package var uploadConcurrency: Int = 4
    /// First retry delay after a failed upload; doubles up to `uploadRetryDelaySecondsMax` (with jitter).
    package var uploadRetryDelaySeconds: Double = 0.5
    package var uploadRetryDelaySecondsMax: Double = 30
    /// Whole clusters of zeroes are stored as unmapped (thin) instead of as data.
    package var detectZeroes: Bool = true
    /// While the journal fills slowly, write zeroes ahead of it so flushes need no file-system metadata commit.
    package var zeroAhead: Bool = true
    /// SCOs are compressed (snappy, per 4 KiB chunk) on their way to the backend.
    package var compressUploads: Bool = false
    /// Reads from the backend fetch at least this much around the requested clusters (kept in the flash cache).
    package var readAheadBytes: UInt64 = 256 << 10
    /// How often the router looks for scrub results to apply.
    package var scrubPollSeconds: Double = 30
    /// How long after applying a scrub result its source SCOs stay (reads that looked up the old place just before
    /// still find it).
    package var scrubDeleteGraceSeconds: Double = 60
    /// Map entries cached in memory.
    package var mapCacheEntries: Int = 1 << 20
    /// The map is persisted after this many bytes of sealed journal, or this many seconds, whichever comes first
    /// (bounds the replay after a crash; see Volume.seal).
    package var mapPersistBytes: UInt64 = 1 << 30
    package var mapPersistSeconds: Double = 30
    /// Clusters per intermediate map apply of a large unmap, rollback or scrub application (not a setting users
    /// need; the simulation makes it small so those paths run on small volumes).
    package var mapChangeChunkClusters: Int = 65536
    /// Check invariants that cost a scan of the map (a deleted SCO holds no live cluster): the simulation turns
    /// this on; production does not pay for it.
    package var checkExpensiveInvariants = false

    package init() {}

    package func validate() throws(VDError) {
        guard scoSizeBytes >= Limits.scoSizeBytesMin, scoSizeBytes <= Limits.scoSizeBytesMax,
            scoSizeBytes % UInt64(SCOFormat.blockBytes) == 0
        else {
            throw VDError(
                .configuration,
                "sco_size \(ByteSize.format(scoSizeBytes)) must be a multiple of 4 KiB from \(ByteSize.format(Limits.scoSizeBytesMin)) to \(ByteSize.format(Limits.scoSizeBytesMax))"
            )
        }
        guard uploadPendingBytesMax >= 2 * scoSizeBytes else {
            throw VDError(
                .configuration,
                "upload max_pending (\(ByteSize.format(uploadPendingBytesMax))) must be at least twice sco_size (\(ByteSize.format(scoSizeBytes)))"
            )
        }
        guard uploadAgeSecondsMax > 0 else { throw VDError(.configuration, "upload max_age_seconds must be positive") }
        guard (1...64).contains(uploadConcurrency) else {
            throw VDError(.configuration, "upload concurrency must be 1 to 64")
        }
    }
}
