// Backends by name: each configured URL becomes one object store, created on first use and shared.

import Foundation
package import ObjectStore
import Synchronization
package import VolumeCore
import VolumeRouter

package final class ConfiguredBackends: BackendResolver {
    private let urls: [String: String]
    package let defaultBackendName: String
    private let stores = Mutex<[String: any ObjectStore]>([:])

    package init(configuration: VDConfiguration) {
        urls = configuration.backendURLs
        defaultBackendName = configuration.defaultBackend
    }

    package func store(named name: String) throws(VDError) -> any ObjectStore {
        if let store = stores.withLock({ $0[name] }) { return store }
        guard let url = urls[name] else {
            throw VDError(
                .configuration, "backend '\(name)' is not configured; known backends: \(urls.keys.sorted().joined(separator: ", "))")
        }
        let store = try Self.makeStore(url: url)
        return stores.withLock { stores in
            if let existing = stores[name] { return existing }
            stores[name] = store
            return store
        }
    }

    /// Creates the object store a backend URL names.
    package static func makeStore(url: String) throws(VDError) -> any ObjectStore {
        if url.hasPrefix("file://") {
            let path = String(url.dropFirst("file://".count))
            guard path.hasPrefix("/") else {
                throw VDError(.configuration, "backend URL '\(url)' must name an absolute directory: file:///DIR")
            }
            return try LocalDirectoryStore(root: path)
        }
        throw VDError(.configuration, "backend URL '\(url)' is not supported; use file:///DIR")
    }
}
