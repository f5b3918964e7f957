// The file-system operations VolumeDriver's storage engine uses on local flash, behind one interface: the real one
// (`PosixFileSystem`, through Syscall) and a simulated one (VolumeSimulation) that keeps what the page cache holds
// apart from what is durable, so a simulated power loss drops every unsynced write, creation and rename.
//
// Durability rules the engine must follow (the simulation enforces exactly these, nothing more):
// - file data is durable after `dataSync()`/`sync()` of that file;
// - a created, renamed or removed name is durable after `syncDirectory` of its directory.

package import VolumeCore

package protocol FileSystem: Sendable {
    func open(_ path: String, options: FlashFile.Options) throws(VDError) -> FlashFile
    func rename(_ from: String, _ to: String) throws(VDError)
    /// Removes a file; a missing file is not an error.
    func unlinkIfPresent(_ path: String) throws(VDError)
    /// Creates a directory and its parents (like `mkdir -p`), durably (each new entry's parent is synced).
    func makeDirectories(_ path: String) throws(VDError)
    /// Makes the directory's entries (creations, renames, removals) durable.
    func syncDirectory(_ path: String) throws(VDError)
    /// Names in a directory (without "." and ".."), unsorted. A missing directory lists as empty.
    func listDirectory(_ path: String) throws(VDError) -> [String]
    /// Removes a file or a directory tree; missing is not an error.
    func removeTree(_ path: String) throws(VDError)
    func fileExists(_ path: String) -> Bool
    /// Takes the exclusive lock of a data directory (one owner at a time) or throws `.busy` naming its holder.
    func lockDirectory(_ directory: String, holder: String) throws(VDError) -> any DirectoryLockHandle
    /// Whether paths name real files: other code may open them (a local object store links sealed SCOs) and Linux
    /// AIO can read them with O_DIRECT. False for a simulated file system.
    var pathsAreReal: Bool { get }
}

extension FileSystem {
    package func open(_ path: String) throws(VDError) -> FlashFile { try open(path, options: []) }

    /// Replaces the file `directory/name` with `bytes` durably and atomically: written to `name.tmp`, synced, renamed
    /// over the target, then the directory synced. A crash leaves the old file or the new one, never a mix; a
    /// failure removes the temporary file.
    package func replaceDurably(directory: String, name: String, with bytes: UnsafeRawBufferPointer) throws(VDError) {
        let target = directory + "/" + name
        let temporary = target + ".tmp"
        try unlinkIfPresent(temporary)
        let file = try open(temporary, options: [.create, .truncate])
        do throws(VDError) {
            try file.write(bytes, at: 0)
            try file.sync()
            file.close()
            try rename(temporary, target)
            try syncDirectory(directory)
        } catch {
            file.close()
            try? unlinkIfPresent(temporary)
            throw error
        }
    }

    /// The whole content of a file, or nil when it does not exist.
    package func readWholeFile(_ path: String) throws(VDError) -> [UInt8]? {
        let file: FlashFile
        do throws(VDError) {
            file = try open(path, options: .readOnly)
        } catch  where error.code == .notFound {
            return nil
        }
        defer { file.close() }
        return try file.readExactly(Int(try file.size()), at: 0)
    }
}

/// The real file system.
package struct PosixFileSystem: FileSystem {
    package init() {}
    package func open(_ path: String, options: FlashFile.Options) throws(VDError) -> FlashFile {
        try FlashFile(path: path, options: options)
    }
    package func rename(_ from: String, _ to: String) throws(VDError) { try Syscall.rename(from, to) }
    package func unlinkIfPresent(_ path: String) throws(VDError) { try Syscall.unlinkIfPresent(path) }
    package func makeDirectories(_ path: String) throws(VDError) { try Syscall.makeDirectories(path) }
    package func syncDirectory(_ path: String) throws(VDError) { try Syscall.syncDirectory(path) }
    package func listDirectory(_ path: String) throws(VDError) -> [String] { try Syscall.listDirectory(path) }
    package func removeTree(_ path: String) throws(VDError) { try Syscall.removeTree(path) }
    package func fileExists(_ path: String) -> Bool { Syscall.fileExists(path) }
    package func lockDirectory(_ directory: String, holder: String) throws(VDError) -> any DirectoryLockHandle {
        try DirectoryLock(directory: directory, holder: holder)
    }
    package var pathsAreReal: Bool { true }
}

/// Everything the storage engine takes from the world (see VolumeCore/Environment.swift).
package struct Environment: Sendable {
    package var fs: any FileSystem
    package var clock: any VDClock
    package var random: any RandomSource
    package var tasks: any TaskRunner
    package var keyValueStores: any KeyValueStoreFactory

    package init(
        fs: any FileSystem, clock: any VDClock, random: any RandomSource, tasks: any TaskRunner,
        keyValueStores: any KeyValueStoreFactory
    ) {
        self.fs = fs
        self.clock = clock
        self.random = random
        self.tasks = tasks
        self.keyValueStores = keyValueStores
    }
}
