// Local TLog files: written whole (temporary file, fsync, rename, directory fsync) so a TLog file is either absent
// or complete, and verified in full whenever read.

import FlashIO
package import NIOCore
package import VolumeCore

package enum TLogFiles {
    package static func fileName(_ number: SCONumber) -> String { number.hex + ".tlog" }

    /// Writes `tlog` durably as DIRECTORY/<number>.tlog.
    package static func write(_ tlog: TLog, directory: String) throws(VDError) {
        try tlog.encode().withUnsafeReadableBytes { (raw) throws(VDError) in
            try FlashFile.replaceDurably(directory: directory, name: fileName(tlog.number), with: raw)
        }
    }

    /// Reads and verifies DIRECTORY/<number>.tlog; nil if absent.
    package static func read(_ number: SCONumber, directory: String) throws(VDError) -> TLog? {
        let path = directory + "/" + fileName(number)
        let file: FlashFile
        do throws(VDError) {
            file = try FlashFile(path: path, options: .readOnly)
        } catch where error.code == .notFound {
            return nil
        }
        defer { file.close() }
        let bytes = try file.readExactly(Int(try file.size()), at: 0)
        return try TLog.decode(ByteBuffer(bytes: bytes), what: path)
    }

    /// The bytes of a local TLog file (for upload).
    package static func readBytes(_ number: SCONumber, directory: String) throws(VDError) -> ByteBuffer {
        let path = directory + "/" + fileName(number)
        let file = try FlashFile(path: path, options: .readOnly)
        defer { file.close() }
        return ByteBuffer(bytes: try file.readExactly(Int(try file.size()), at: 0))
    }
}
