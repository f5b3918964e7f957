// Local TLog files: written whole (temporary file, fsync, rename, directory fsync) so a TLog file is either absent
// or complete, and verified in full whenever read.

package import FlashIO
package import NIOCore
package import VolumeCore

package enum TLogFiles {
    package static func fileName(_ number: SCONumber) -> String { number.hex + ".tlog" }

    /// Writes `tlog` durably as DIRECTORY/<number>.tlog.
    package static func write(_ tlog: TLog, directory: String, fs: any FileSystem) throws(VDError) {
        try tlog.encode().withUnsafeReadableBytes { (raw) throws(VDError) in
            try fs.replaceDurably(directory: directory, name: fileName(tlog.number), with: raw)
        }
    }

    /// Reads and verifies DIRECTORY/<number>.tlog; nil if absent.
    package static func read(_ number: SCONumber, directory: String, fs: any FileSystem) throws(VDError) -> TLog? {
        let path = directory + "/" + fileName(number)
        guard let bytes = try fs.readWholeFile(path) else { return nil }
        return try TLog.decode(ByteBuffer(bytes: bytes), what: path)
    }

    /// The bytes of a local TLog file (for upload).
    package static func readBytes(
        _ number: SCONumber, directory: String, fs: any FileSystem
    ) throws(VDError) -> ByteBuffer {
        let path = directory + "/" + fileName(number)
        guard let bytes = try fs.readWholeFile(path) else { throw VDError(.notFound, "\(path) does not exist") }
        return ByteBuffer(bytes: bytes)
    }
}
