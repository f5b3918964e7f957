// Backend URLs: what parses, and the message for each way of getting one wrong.

import Foundation
import ObjectStore
import Testing
import VolumeCore

@Suite("Backend URLs")
struct BackendURLTests {
    let credentials = ["AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret-example"]

    @Test func fileURL() throws {
        #expect(try BackendSpec.parse("file:///var/lib/vd/objects/", environment: [:]) == .local(directory: "/var/lib/vd/objects"))
        #expect(try BackendSpec.parse("file:///", environment: [:]) == .local(directory: "/"))
        #expect(try BackendSpec.parse("file:///a%20b", environment: [:]) == .local(directory: "/a b"))
    }

    @Test func s3URL() throws {
        let spec = try BackendSpec.parse(
            "s3://my-bucket?endpoint=127.0.0.1:7480&scheme=http&style=path", environment: credentials)
        guard case .s3(let configuration) = spec else {
            Issue.record("not s3: \(spec)")
            return
        }
        #expect(configuration.bucket == "my-bucket")
        #expect(configuration.endpoint == "127.0.0.1:7480")
        #expect(configuration.scheme == .http)
        #expect(configuration.uriStyle == .path)
        #expect(configuration.accessKeyID == "AKIDEXAMPLE")
        #expect(configuration.secretAccessKey == S3Secret("secret-example"))
        #expect(!spec.description.contains("secret-example"))

        let virtual = try BackendSpec.parse("s3://bucket.example/?endpoint=s3.example.com&style=virtual-host", environment: credentials)
        guard case .s3(let other) = virtual else { return }
        #expect(other.scheme == .https)
        #expect(other.uriStyle == .virtualHost)
        #expect(other.endpoint == "s3.example.com")
        #expect(other.signature == .v4 && other.region == "us-east-1" && other.createOnly && !other.insecureSkipVerify)

        let full = try BackendSpec.parse(
            "s3://bucket?endpoint=h:443&region=eu-west-1&signature=v4&ca_file=/etc/vd/ca.pem&create_only=false",
            environment: credentials)
        guard case .s3(let v4) = full else { return }
        #expect(v4.region == "eu-west-1" && v4.caFile == "/etc/vd/ca.pem" && !v4.createOnly)
        #expect(full.description.contains("signature v4, region eu-west-1"))
        let legacy = try BackendSpec.parse(
            "s3://bucket?endpoint=h:80&scheme=http&signature=v2", environment: credentials)
        guard case .s3(let v2) = legacy else { return }
        #expect(v2.signature == .v2)
        let insecure = try BackendSpec.parse(
            "s3://bucket?endpoint=h:443&signature=v2&insecure_skip_verify=true", environment: credentials)
        guard case .s3(let v2s) = insecure else { return }
        #expect(v2s.insecureSkipVerify && v2s.scheme == .https)
    }

    @Test(arguments: [
        ("s3://?endpoint=127.0.0.1:7480", "no bucket"),
        ("s3://bucket", "no endpoint"),
        ("ftp://bucket", "unknown scheme 'ftp'"),
        ("bucket", "no scheme"),
        ("s3://bucket?endpoint=127.0.0.1:99999", "bad port '99999'"),
        ("s3://bucket?endpoint=127.0.0.1:http", "bad port 'http'"),
        ("s3://bucket?endpoint=:80", "has no host"),
        ("s3://bucket?endpoint=h:80&scheme=gopher", "scheme must be http or https"),
        ("s3://bucket?endpoint=h:80&style=sideways", "style must be path or virtual-host"),
        ("s3://bucket?endpoint=h:80&colour=x", "unknown parameter 'colour'"),
        ("s3://bucket?endpoint=h:80&signature=v3", "signature must be v4 or v2"),
        ("s3://bucket?endpoint=h:80&signature=v2", "cannot verify the server's certificate"),
        ("s3://bucket?endpoint=h:80&scheme=http&signature=v2&ca_file=/ca.pem", "ca_file needs signature=v4"),
        ("s3://bucket?endpoint=h:80&ca_file=ca.pem", "ca_file must be an absolute path"),
        ("s3://bucket?endpoint=h:80&insecure_skip_verify=maybe", "insecure_skip_verify must be true or false"),
        ("s3://bucket?endpoint=h:80&region=", "the region '' must be a name"),
        ("s3://bucket/path/inside?endpoint=h:80", "not a bucket name"),
        ("s3://key:secret@bucket?endpoint=h:80", "credentials do not belong in the URL"),
        ("s3://b?endpoint=h:80", "must be 3 to 63 characters"),
        ("file://relative/dir", "absolute path"),
    ])
    func malformed(url: String, expected: String) {
        do {
            _ = try BackendSpec.parse(url, environment: credentials)
            Issue.record("\(url) parsed")
        } catch {
            #expect(error.code == .configuration)
            #expect(error.message.contains(expected), "\(url): \(error.message)")
        }
    }

    @Test func missingCredentials() {
        for environment in [[:], ["AWS_ACCESS_KEY_ID": "AKIDEXAMPLE"], ["AWS_SECRET_ACCESS_KEY": "s"]] {
            do {
                _ = try BackendSpec.parse("s3://bucket?endpoint=h:80", environment: environment)
                Issue.record("parsed without credentials: \(environment.keys)")
            } catch {
                #expect(error.code == .configuration)
                #expect(error.message.contains("AWS_"), "\(error.message)")
            }
        }
    }

    @Test func factoryMakesStores() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vd-url-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let local = try makeObjectStore(try BackendSpec.parse("file://" + directory, environment: [:]))
        try await local.verifyAccess()
        #expect(local is LocalDirectoryStore)
        let s3 = try makeObjectStore(try BackendSpec.parse("s3://bucket?endpoint=127.0.0.1:9&scheme=http", environment: credentials))
        #expect(s3 is S3Store)
        (s3 as? S3Store)?.shutdown()
    }
}
