// Per-volume metrics: counters and latency histograms of what a volume does, through swift-metrics (the process
// chooses the backend: `vd serve` exports them for Prometheus; without a bootstrapped backend they cost nothing).
//
// Names (each with the label volume="NAME"):
//   vd_volume_reads_total, vd_volume_read_bytes_total, vd_volume_read_duration_seconds (histogram)
//   vd_volume_writes_total, vd_volume_write_bytes_total, vd_volume_write_duration_seconds
//   vd_volume_flushes_total, vd_volume_flush_duration_seconds
//   vd_volume_fdatasyncs_total, vd_volume_fdatasync_duration_seconds   (group commits, seals, zero-ahead)
//   vd_volume_uploads_total, vd_volume_upload_bytes_total, vd_volume_upload_duration_seconds   (SCOs and TLogs)
//   vd_volume_seals_total, vd_volume_seal_duration_seconds
//   vd_volume_throttles_total, vd_volume_throttle_duration_seconds   (writes held back by upload back-pressure)
//   vd_volume_errors_total{operation="read|write|flush"}
// A latency is the time from the engine receiving a request to its reply, without the NBD transport.

import CoreMetrics
import VolumeCore

struct VolumeMetrics: Sendable {
    struct Operation: Sendable {
        let count: Counter
        let bytes: Counter?
        let duration: Timer
        let errors: Counter?

        init(_ name: String, plural: String? = nil, volume: String, bytes: Bool, errors: Bool) {
            let dimensions = [("volume", volume)]
            count = Counter(label: "vd_volume_\(plural ?? name + "s")_total", dimensions: dimensions)
            self.bytes = bytes ? Counter(label: "vd_volume_\(name)_bytes_total", dimensions: dimensions) : nil
            duration = Timer(
                label: "vd_volume_\(name)_duration_seconds", dimensions: dimensions, preferredDisplayUnit: .seconds)
            self.errors =
                errors
                ? Counter(label: "vd_volume_errors_total", dimensions: dimensions + [("operation", name)]) : nil
        }

        /// Records one operation that started at `start` and ended now.
        func record(since start: MonotonicInstant, now: MonotonicInstant, bytes: Int = 0, failed: Bool = false) {
            count.increment()
            if let counter = self.bytes, bytes > 0 { counter.increment(by: bytes) }
            duration.record(start.duration(to: now))
            if failed { errors?.increment() }
        }
    }

    let read: Operation
    let write: Operation
    let flush: Operation
    let fdatasync: Operation
    let upload: Operation
    let seal: Operation
    let throttle: Operation

    init(volume: VolumeName) {
        let name = volume.rawValue
        read = Operation("read", volume: name, bytes: true, errors: true)
        write = Operation("write", volume: name, bytes: true, errors: true)
        flush = Operation("flush", plural: "flushes", volume: name, bytes: false, errors: true)
        fdatasync = Operation("fdatasync", volume: name, bytes: false, errors: false)
        upload = Operation("upload", volume: name, bytes: true, errors: false)
        seal = Operation("seal", volume: name, bytes: false, errors: false)
        throttle = Operation("throttle", volume: name, bytes: false, errors: false)
    }
}

extension Timer {
    func record(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}
