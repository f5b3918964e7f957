// A router cut off from the bucket by the network, not from its clients: `vd serve` runs in a network namespace
// whose only way out is a veth pair to the host, where a proxy forwards to the S3 server (Ceph RGW from
// tools/s3/with-rgw.sh). The NBD client talks to it over its Unix socket (file system, not network). Taking the
// veth link down partitions the router from the bucket: it must stop acknowledging writes on the volume within its
// lease (3 s), and serve again once the link is back.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized, .disabled(if: S3Server.isSkipped, "VD_SKIP_S3=1")) struct PartitionIntegrationTests {
    @Test func aRouterPartitionedFromTheBucketStopsAcknowledgingWithinItsLease() async throws {
        let s3 = try S3Server.require()
        let directory = try TemporaryDirectory("vd-netns")
        defer { directory.remove() }
        let network = try VethNamespace(prefix: "vdp", subnet: 213)
        defer { network.remove() }

        // The bucket as the namespace sees it: a proxy on the host's end of the veth pair.
        let proxy = try await S3FaultProxy.start(upstream: s3.endpoint, listenHost: network.hostAddress)
        defer { Task { await proxy.stop() } }
        let bucket = try await s3.makeBucket()
        let config = directory.path + "/vd.toml"
        try """
        default_backend = "s3"
        [backends.s3]
        url = "\(s3.url(bucket: bucket, endpoint: proxy.endpoint))"
        [cluster]
        node = "node-a"
        lease_seconds = 3
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let a = try VDServer(
            dataDirectory: directory.path + "/a", extraArguments: ["--config", config], environment: s3.vdEnvironment)
        a.launcher = network.launcher
        defer { _ = try? a.stop() }
        let created = try a.cli(["volume", "create", "vol1", "--size", "64M", "--config", config])
        #expect(created.succeeded, "\(created.output)\(created.error)")
        try a.start()
        func write(_ pattern: String, at offset: String) throws -> Bool {
            let result = try ProcessRunner.run(
                "qemu-io", ["-f", "raw", "-c", "write -P \(pattern) \(offset) 64k", "-c", "flush", a.uri("vol1")],
                timeoutSeconds: 30)
            return result.succeeded && !result.output.contains("failed")
        }
        #expect(try write("0x11", at: "0"), "\(a.output)")

        // Partition: the router's link to the bucket goes down; its client (Unix socket) is not affected.
        try network.setLink(up: false)
        let cut = Date()
        var refusedAfter: Double?
        while Date().timeIntervalSince(cut) < 20 {
            if !(try write("0x22", at: "64k")) {
                refusedAfter = Date().timeIntervalSince(cut)
                break
            }
            usleep(200_000)
        }
        let seconds = try #require(refusedAfter, "writes must fail once the lease ran out: \(a.output)")
        print("partitioned router refused writes after \(String(format: "%.2f", seconds)) s (lease 3 s)")
        #expect(seconds < 3 + 1.5, "refused within the lease (and one check interval)")
        // (The renewal itself may still be waiting for its S3 request to time out: the lease ends by this router's own
        // clock, not by a failed request.)

        // The link comes back: renewals go through and the router serves the volume again.
        try network.setLink(up: true)
        var back = false
        let healed = Date()
        while Date().timeIntervalSince(healed) < 30 {
            if try write("0x33", at: "128k") {
                back = true
                break
            }
            usleep(250_000)
        }
        #expect(back, "\(a.output)")
        let read = try ProcessRunner.run("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x11 0 64k", a.uri("vol1")])
        #expect(read.succeeded && !read.output.contains("failed"), "\(read.output)")
    }
}
