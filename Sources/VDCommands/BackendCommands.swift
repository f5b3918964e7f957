// `vd backend check`: is a backend usable (reachable, bucket present, credentials accepted)? Optionally creates the
// bucket. Says what to fix when it is not.

import ArgumentParser
import ObjectStore
import VolumeCore

struct BackendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backend",
        abstract: "Check object-store backends.",
        subcommands: [Check.self])

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check that a backend is reachable and usable (and create its bucket on request).",
            discussion: """
                NAME is a backend from the configuration, or a URL: file:///DIR or
                s3://BUCKET?endpoint=HOST:PORT&scheme=http (key and secret from AWS_ACCESS_KEY_ID and
                AWS_SECRET_ACCESS_KEY). Only AWS signature V2 stores work (Ceph RGW, MinIO in V2 mode, ...).
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Backend name or URL (default: default_backend).")
        var backend: String?

        @Flag(name: .long, help: "Create the S3 bucket if it does not exist.")
        var createBucket = false

        func run() async throws {
            let configuration = try global.load()
            let backends = ConfiguredBackends(configuration: configuration)
            let name = backend ?? configuration.defaultBackend
            let store = try backends.store(named: name)
            if createBucket, let s3 = store as? S3Store { try await s3.createBucketIfMissing() }
            try await store.verifyAccess()
            let compression = backends.compressesUploads(name) ? "compressed (snappy)" : "stored as they are"
            print("backend '\(name)' is usable: \(store.description); SCOs are \(compression)")
        }
    }
}
