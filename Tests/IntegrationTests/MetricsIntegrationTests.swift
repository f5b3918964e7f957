// The metrics users scrape: `vd serve --metrics-listen` serves GET /metrics (Prometheus text) on TCP, and only that;
// the counters and histograms move with the I/O a real client does.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct MetricsIntegrationTests {
    /// The value of the sample `name{labels}` in Prometheus text, or nil when absent.
    static func sample(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1).split(separator: " ")[0])
        }
        return nil
    }

    @Test func tcpMetricsCountWritesReadsFlushesUploadsAndBackendRequests() throws {
        let directory = try TemporaryDirectory("vd-metrics")
        defer { directory.remove() }
        let server = try VDServer(
            dataDirectory: directory.path + "/data", extraArguments: ["--metrics-listen", "127.0.0.1:0"])
        #expect(try server.cli(["volume", "create", "vol1", "--size", "64M"]).succeeded)
        try server.start()
        defer { _ = try? server.stop() }
        // The banner names the port the system chose.
        let banner = server.output.split(separator: "\n").first { $0.contains("metrics: http://") }
        let url = try #require(
            banner.flatMap { line in line.split(separator: " ").first { $0.hasPrefix("http://") } }.map(String.init))
        #expect(url.hasPrefix("http://127.0.0.1:") && url.hasSuffix("/metrics"))

        let io = try ProcessRunner.run(
            "qemu-io",
            [
                "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x11 2M 4k", "-c", "flush", "-c",
                "read -P 0x5a 0 1M", "-c", "read -P 0x11 2M 4k", server.uri("vol1"),
            ])
        #expect(io.succeeded && !io.output.contains("failed"), "\(io.output)\(io.error)")
        // A snapshot seals the journal: its SCO and TLog go to the backend.
        #expect(try server.cli(["snapshot", "create", "vol1", "s1"]).succeeded)
        var text = ""
        let deadline = Date().addingTimeInterval(30)
        repeat {
            let scrape = try ProcessRunner.run("/usr/bin/curl", ["-sf", url])
            #expect(scrape.succeeded, "\(scrape.error)")
            text = scrape.output
            if (Self.sample(text, "vd_volume_uploads_total{volume=\"vol1\"}") ?? 0) >= 2 { break }
            usleep(200_000)
        } while Date() < deadline

        let volume = "{volume=\"vol1\"}"
        #expect(Self.sample(text, "vd_volume_writes_total\(volume)") == 2, "\(text)")
        #expect(Self.sample(text, "vd_volume_write_bytes_total\(volume)") == Double((1 << 20) + 4096))
        #expect((Self.sample(text, "vd_volume_reads_total\(volume)") ?? 0) >= 2)
        #expect((Self.sample(text, "vd_volume_read_bytes_total\(volume)") ?? 0) >= Double((1 << 20) + 4096))
        #expect((Self.sample(text, "vd_volume_flushes_total\(volume)") ?? 0) >= 1)
        #expect((Self.sample(text, "vd_volume_fdatasyncs_total\(volume)") ?? 0) >= 1)
        #expect((Self.sample(text, "vd_volume_uploads_total\(volume)") ?? 0) >= 2, "SCO and TLog uploaded")
        #expect((Self.sample(text, "vd_volume_seals_total\(volume)") ?? 0) >= 1)
        // Latency histograms: every write falls in the +Inf bucket and the count matches.
        #expect(Self.sample(text, "vd_volume_write_duration_seconds_count\(volume)") == 2)
        #expect(Self.sample(text, "vd_volume_write_duration_seconds_bucket{volume=\"vol1\",le=\"+Inf\"}") == 2)
        #expect(
            (Self.sample(text, "vd_backend_requests_total{backend=\"local\",operation=\"put\"}") ?? 0) >= 2,
            "backend PUTs counted")
        #expect(text.contains("vd_backend_request_duration_seconds_bucket"))
        #expect(Self.sample(text, "vd_volume_errors_total{volume=\"vol1\",operation=\"write\"}") == 0)
        // The gauges the management socket always served are there too.
        #expect(Self.sample(text, "vd_volume_size_bytes\(volume)") == Double(64 << 20))

        // The TCP port serves metrics only: the management API is not reachable through it.
        let api = try ProcessRunner.run(
            "/usr/bin/curl",
            [
                "-s", "-o", "/dev/null", "-w", "%{http_code}",
                url.replacingOccurrences(of: "/metrics", with: "/v1/volumes"),
            ])
        #expect(api.output == "404", "\(api.output)")
        let delete = try ProcessRunner.run(
            "/usr/bin/curl",
            [
                "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE",
                url.replacingOccurrences(of: "/metrics", with: "/v1/volumes/vol1"),
            ])
        #expect(delete.output == "404")
        #expect(try server.cli(["volume", "list"]).output.contains("vol1"))
    }
}
