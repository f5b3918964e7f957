// Backends by name: each configured URL becomes one object store, created on first use and shared. A name that is
// itself a URL (`--backend 's3://BUCKET?endpoint=...'`) works too; credentials for s3:// come from
// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, never from the URL or the registration.

import Foundation
package import ObjectStore
import Synchronization
package import VolumeCore
import VolumeRouter

package final class ConfiguredBackends: BackendResolver {
    private let urls: [String: String]
    private let compression: [String: Bool]
    package let defaultBackendName: String
    private let stores = Mutex<[String: any ObjectStore]>([:])

    package init(configuration: VDConfiguration) {
        urls = configuration.backendURLs
        compression = configuration.backendCompression
        defaultBackendName = configuration.defaultBackend
    }

    /// The URL a backend name stands for (a URL stands for itself).
    package func url(of name: String) throws(VDError) -> String {
        if name.contains("://") { return name }
        guard let url = urls[name] else {
            throw VDError(
                .configuration, "backend '\(name)' is not configured; known backends: \(urls.keys.sorted().joined(separator: ", ")) (or give a URL: file:///DIR, s3://BUCKET?endpoint=HOST:PORT)")
        }
        return url
    }

    package func spec(of name: String) throws(VDError) -> BackendSpec {
        try BackendSpec.parse(try url(of: name), environment: ProcessInfo.processInfo.environment)
    }

    package func store(named name: String) throws(VDError) -> any ObjectStore {
        if let store = stores.withLock({ $0[name] }) { return store }
        // Every request is counted and timed for the metrics (cheap: a few atomics per request).
        let store = InstrumentedObjectStore(try makeObjectStore(try spec(of: name)), name: name)
        return stores.withLock { stores in
            if let existing = stores[name] { return existing }
            stores[name] = store
            return store
        }
    }

    /// SCOs are compressed on the way to S3 by default and stored as they are in a local directory (where they
    /// are hard links of the cache), unless the configuration says otherwise.
    package func compressesUploads(_ name: String) -> Bool {
        if let configured = compression[name] { return configured }
        guard let spec = try? spec(of: name) else { return false }
        if case .s3 = spec { return true }
        return false
    }
}
