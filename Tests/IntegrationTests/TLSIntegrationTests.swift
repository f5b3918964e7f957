// NBD over TLS with real clients: qemu-img/qemu-io with tls-creds-x509 and nbdinfo with nbds://. A client without
// TLS is refused cleanly where TLS is required, and vd refuses to listen on TCP beyond loopback without TLS.

import Foundation
import Testing
import VolumeTesting

@Suite(.serialized) struct TLSIntegrationTests {
    func makeCertificates(in directory: String) throws {
        let result = try TestCertificates.make(in: directory)
        #expect(result.succeeded, "\(result.error)")
    }

    @Test func tlsClientsWorkAndPlainClientsAreRefused() throws {
        let directory = try TemporaryDirectory("vd-tls")
        defer { directory.remove() }
        let certificates = directory.path + "/pki"
        try FileManager.default.createDirectory(atPath: certificates, withIntermediateDirectories: true)
        try makeCertificates(in: certificates)
        let config = directory.path + "/vd.toml"
        try """
        [nbd.tls]
        certificate = "\(certificates)/server-cert.pem"
        key = "\(certificates)/server-key.pem"
        client_ca = "\(certificates)/ca-cert.pem"
        required_on_unix_socket = true
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let server = try VDServer(dataDirectory: directory.path + "/data", extraArguments: ["--config", config])
        #expect(try server.cli(["volume", "create", "vol1", "--size", "32M", "--config", config]).succeeded)
        try server.start()
        defer { _ = try? server.stop() }
        let socket = server.socketPath

        // libnbd over TLS.
        let info = try ProcessRunner.run(
            "nbdinfo", ["--json", "nbds+unix:///vol1?socket=\(socket)&tls-certificates=\(certificates)"])
        #expect(info.succeeded, "\(info.error)")
        #expect(info.output.contains("\"TLS\": true"), "\(info.output)")

        // qemu over TLS: write, then read back.
        let object = "tls-creds-x509,id=tls0,dir=\(certificates),endpoint=client"
        let image =
            "driver=nbd,server.type=unix,server.path=\(socket),export=vol1,tls-creds=tls0,tls-hostname=localhost"
        let io = try ProcessRunner.run(
            "qemu-io",
            ["--object", object, "--image-opts", image, "-c", "write -P 0x5c 0 1M", "-c", "read -P 0x5c 0 1M"])
        #expect(io.succeeded && !io.output.contains("failed"), "\(io.output)\(io.error)")
        let qinfo = try ProcessRunner.run("qemu-img", ["info", "--object", object, "--image-opts", image])
        #expect(qinfo.succeeded && qinfo.output.contains("33554432"), "\(qinfo.output)\(qinfo.error)")

        // Without TLS: refused, with a message, and the server carries on.
        let plain = try ProcessRunner.run("nbdinfo", ["nbd+unix:///vol1?socket=\(socket)"])
        #expect(!plain.succeeded)
        #expect(server.output.contains("requires TLS") || plain.error.contains("not supported"), "\(plain.error)")
        let plainQemu = try ProcessRunner.run("qemu-img", ["info", "nbd+unix:///vol1?socket=\(socket)"])
        #expect(!plainQemu.succeeded)
        // A client certificate from another CA is refused too.
        let stranger = directory.path + "/stranger"
        try FileManager.default.createDirectory(atPath: stranger, withIntermediateDirectories: true)
        try makeCertificates(in: stranger)
        try FileManager.default.removeItem(atPath: stranger + "/ca-cert.pem")
        try FileManager.default.copyItem(atPath: certificates + "/ca-cert.pem", toPath: stranger + "/ca-cert.pem")
        let wrongClient = try ProcessRunner.run(
            "nbdinfo", ["nbds+unix:///vol1?socket=\(socket)&tls-certificates=\(stranger)"])
        #expect(!wrongClient.succeeded)
        let again = try ProcessRunner.run(
            "nbdinfo", ["--size", "nbds+unix:///vol1?socket=\(socket)&tls-certificates=\(certificates)"])
        #expect(again.succeeded && again.output.contains("33554432"), "\(again.error)")
    }

    @Test func tcpBeyondLoopbackNeedsTLS() throws {
        let directory = try TemporaryDirectory("vd-tcp")
        defer { directory.remove() }
        let server = try VDServer(dataDirectory: directory.path + "/data", extraArguments: ["--nbd-tcp", "0.0.0.0:0"])
        #expect(throws: TestToolError.self) { try server.start(timeoutSeconds: 20) }
        #expect(server.output.contains("without authentication") && server.output.contains("TLS"), "\(server.output)")
        // Loopback TCP without TLS is allowed.
        let loopback = try VDServer(
            dataDirectory: directory.path + "/data2", extraArguments: ["--nbd-tcp", "127.0.0.1:0"])
        try loopback.start()
        _ = try? loopback.stop()
    }
}
