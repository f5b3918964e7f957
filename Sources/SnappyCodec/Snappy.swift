// The only wrapper of libsnappy. Compresses and decompresses independent blocks; a block that does not shrink is
// reported as such so the caller can store it raw.

import CSnappy
package import VolumeCore

package enum Snappy {
    /// Compresses `input` into `output` (which must hold `maxCompressedLength(input.count)` bytes); returns the
    /// compressed length.
    package static func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int {
        var length = output.count
        let status = snappy_compress(
            input.baseAddress?.assumingMemoryBound(to: CChar.self), input.count,
            output.baseAddress?.assumingMemoryBound(to: CChar.self), &length)
        precondition(status == SNAPPY_OK, "snappy_compress failed with an output buffer of the documented size")
        return length
    }

    package static func maxCompressedLength(_ inputLength: Int) -> Int { snappy_max_compressed_length(inputLength) }

    /// Decompresses `input` into `output`, which must be exactly the uncompressed size; `.corrupt` otherwise.
    package static func decompress(
        _ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String
    ) throws(VDError) {
        var length = 0
        guard
            snappy_uncompressed_length(input.baseAddress?.assumingMemoryBound(to: CChar.self), input.count, &length)
                == SNAPPY_OK, length == output.count
        else { throw .corrupt("\(what()): compressed block is damaged (bad length)") }
        var written = output.count
        guard
            snappy_uncompress(
                input.baseAddress?.assumingMemoryBound(to: CChar.self), input.count,
                output.baseAddress?.assumingMemoryBound(to: CChar.self), &written) == SNAPPY_OK, written == output.count
        else { throw .corrupt("\(what()): compressed block is damaged") }
    }
}
