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
                s3://BUCKET?endpoint=HOST:PORT&scheme=https&region=us-east-1 (key and secret from AWS_ACCESS_KEY_ID
                and AWS_SECRET_ACCESS_KEY). Requests are signed with AWS signature V4 unless the URL says
                signature=v2 (older stores; libs3). For S3 it also reports whether the store refuses to overwrite an
                object on a create-only write (If-None-Match: *), which VolumeDriver uses for every object.
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
            if createBucket, let s3 = store.unwrapped as? S3Store { try await s3.createBucketIfMissing() }
            try await store.verifyAccess()
            let compression = backends.compressesUploads(name) ? "compressed (snappy)" : "stored as they are"
            print("backend '\(name)' is usable: \(store.description); SCOs are \(compression)")
            if let s3 = store.unwrapped as? S3Store {
                print("  signature \(s3.configuration.signature.rawValue) accepted")
                if s3.configuration.signature == .v2 {
                    print("  conditional writes: not available with signature v2 (libs3 cannot send If-None-Match)")
                } else if try await s3.probeConditionalWrites() {
                    print("  conditional writes: yes (an existing object is never overwritten)")
                } else {
                    print(
                        "  conditional writes: NO: the store overwrites on If-None-Match: * (or does not implement "
                            + "it); one writer per volume must then be ensured by other means")
                }
            }
        }
    }
}
