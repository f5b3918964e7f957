// NBDExport
// What the NBD server serves: named exports, each a `BlockDevice`, found through a provider the embedding program
// implements (the volume router in `vd serve`, a fixed list in tests). The server asks the provider at every
// NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME, so exports can come and go while the server runs.

public import VolumeCore

/// One export: a name clients ask for and the device behind it.
public struct NBDExport: Sendable {
    /// The export name (`nbd+unix:///NAME?socket=...`). The empty name is the default export.
    public var name: String
    /// A line for humans, sent in `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` replies (may be empty).
    public var description: String
    /// The device served. Its `info` is read once when a client enters transmission.
    public var device: any BlockDevice
    /// Serve the export read-only even if the device is writable (snapshots, rollbacks in progress).
    public var readOnly: Bool

    /// An export of `device` under `name`.
    public init(name: String, description: String = "", device: any BlockDevice, readOnly: Bool = false) {
        self.name = name
        self.description = description
        self.device = device
        self.readOnly = readOnly
    }
}

/// A line of the export list (`NBD_OPT_LIST`).
public struct NBDExportListing: Sendable, Hashable {
    /// The export name, as clients pass it to NBD_OPT_GO.
    public var name: String
    /// A line for humans (may be empty).
    public var description: String
    /// A listing line.
    public init(name: String, description: String = "") {
        self.name = name
        self.description = description
    }
}

/// Finds exports by name. Called on the server's event loops: implementations must be quick and must not block.
public protocol NBDExportProvider: Sendable {
    /// The export called `name`, or nil if there is none (the client gets `NBD_REP_ERR_UNKNOWN`, or is disconnected
    /// if it used `NBD_OPT_EXPORT_NAME`). Return nil for an export that must not gain clients (being deleted or
    /// rolled back): together with `NBDServer.disconnectClients(export:)` that empties it.
    func export(named name: String) -> NBDExport?
    /// Every export a client may see in `NBD_OPT_LIST`.
    func exportList() -> [NBDExportListing]
}

/// A fixed set of exports.
public struct NBDStaticExportProvider: NBDExportProvider {
    /// The exports, looked up by exact name.
    public var exports: [NBDExport]
    /// The export served to clients asking for the empty (default) name, if any.
    public var defaultExportName: String?

    /// Serves `exports`; clients asking for the empty name get `defaultExportName`.
    public init(_ exports: [NBDExport], defaultExportName: String? = nil) {
        self.exports = exports
        self.defaultExportName = defaultExportName
    }

    /// The export with this name (the default export for the empty name).
    public func export(named name: String) -> NBDExport? {
        let wanted = name.isEmpty ? (defaultExportName ?? "") : name
        return exports.first { $0.name == wanted }
    }

    /// Every export, in the order given.
    public func exportList() -> [NBDExportListing] {
        exports.map { NBDExportListing(name: $0.name, description: $0.description) }
    }
}
