// The compressed form of an SCO on the backend. The SCO is cut into 4096-byte chunks (its header and batch headers
// are 4096 bytes and payloads are 4096-aligned, so no chunk straddles two things); each chunk is compressed on its
// own with snappy, or stored raw when that does not shrink it. An index of chunk offsets lets a reader turn any
// 4096-aligned range of the original SCO into one range GET of the compressed object: reading one cluster never
// downloads the whole SCO.
//
//   header (4096 B): magic "VDSCOZ01", version, chunk size, volume id, SCO number, original length, original CRC,
//                    chunk count, index offset, index CRC, header CRC
//   chunks, back to back
//   index: (chunk count + 1) little-endian UInt64 offsets; chunk i is [offset[i], offset[i+1]), raw iff 4096 long
//
// Everything is verified: the header and index by their CRCs, each decompressed cluster by the map's CRC.

package import NIOCore
package import VolumeCore

package struct CompressedSCOHeader: Sendable, Hashable {
    package static let headerBytes = 4096
    package static let chunkBytes = 4096
    package static let version: UInt16 = 1
    static let magic: [UInt8] = Array("VDSCOZ01".utf8)

    package var volumeID: VolumeID
    package var sco: SCONumber
    package var originalLength: UInt64
    package var originalCRC: UInt32
    package var chunkCount: UInt64
    package var indexOffset: UInt64
    package var indexCRC: UInt32

    package var indexBytes: Int { Int(chunkCount + 1) * 8 }

    /// Whether `bytes` (the first bytes of an object) start a compressed SCO.
    package static func isCompressed(_ bytes: ByteBuffer) -> Bool {
        bytes.readableBytes >= 8 && Array(bytes.readableBytesView.prefix(8)) == magic
    }

    func encode() -> ByteBuffer {
        var b = ByteBuffer.zeroes(Self.headerBytes)
        b.setBytes(Self.magic, at: 0)
        b.setInteger(Self.version, at: 8, endianness: .little)
        b.setInteger(UInt32(Self.chunkBytes), at: 12, endianness: .little)
        b.setInteger(volumeID.high, at: 16, endianness: .little)
        b.setInteger(volumeID.low, at: 24, endianness: .little)
        b.setInteger(sco.rawValue, at: 32, endianness: .little)
        b.setInteger(originalLength, at: 40, endianness: .little)
        b.setInteger(originalCRC, at: 48, endianness: .little)
        b.setInteger(chunkCount, at: 56, endianness: .little)
        b.setInteger(indexOffset, at: 64, endianness: .little)
        b.setInteger(indexCRC, at: 72, endianness: .little)
        let crc = b.withUnsafeReadableBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<(Self.headerBytes - 4)])) }
        b.setInteger(crc, at: Self.headerBytes - 4, endianness: .little)
        return b
    }

    package static func decode(_ b: ByteBuffer, what: String) throws(VDError) -> CompressedSCOHeader {
        guard b.readableBytes >= headerBytes, isCompressed(b) else { throw .corrupt("\(what): not a compressed SCO") }
        let base = b.readerIndex
        func u64(_ at: Int) -> UInt64 { b.getInteger(at: base + at, endianness: .little, as: UInt64.self)! }
        func u32(_ at: Int) -> UInt32 { b.getInteger(at: base + at, endianness: .little, as: UInt32.self)! }
        let version = b.getInteger(at: base + 8, endianness: .little, as: UInt16.self)!
        guard version == Self.version else { throw .corrupt("\(what): unsupported compressed SCO version \(version)") }
        let crc = b.withUnsafeReadableBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<(headerBytes - 4)])) }
        guard crc == u32(headerBytes - 4) else { throw .corrupt("\(what): compressed SCO header checksum mismatch") }
        guard u32(12) == UInt32(chunkBytes) else { throw .corrupt("\(what): unsupported chunk size \(u32(12))") }
        let header = CompressedSCOHeader(
            volumeID: VolumeID(high: u64(16), low: u64(24)), sco: SCONumber(u64(32)), originalLength: u64(40),
            originalCRC: u32(48), chunkCount: u64(56), indexOffset: u64(64), indexCRC: u32(72))
        guard header.originalLength == header.chunkCount * UInt64(chunkBytes) else {
            throw .corrupt("\(what): compressed SCO header is inconsistent (length \(header.originalLength), \(header.chunkCount) chunks)")
        }
        return header
    }
}

package enum CompressedSCO {
    /// Compresses a whole SCO held in memory (its length a multiple of 4096). Returns the object to store.
    package static func compress(_ sco: ByteBuffer, volumeID: VolumeID, number: SCONumber, originalCRC: UInt32)
        -> ByteBuffer
    {
        let object = try? compress(lengthBytes: sco.readableBytes, volumeID: volumeID, number: number) {
            (offset, into) throws(VDError) in
            sco.withUnsafeReadableBytes { raw in
                into.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + into.count)]))
            }
        }
        return object!
    }

    /// Bytes of the original read at a time by the streaming compressor.
    static let pieceBytes = 1 << 20

    /// Compresses an SCO of `lengthBytes` (a multiple of 4096) read piece by piece through `read(offset, into)`, so
    /// only the compressed object and one piece are in memory (uploads of large SCOs must not hold them whole).
    /// The original's CRC is computed on the way.
    package static func compress(
        lengthBytes: Int, volumeID: VolumeID, number: SCONumber,
        read: (_ offset: Int, _ into: UnsafeMutableRawBufferPointer) throws(VDError) -> Void
    ) throws(VDError) -> ByteBuffer {
        let chunk = CompressedSCOHeader.chunkBytes
        precondition(lengthBytes % chunk == 0, "SCO length must be a multiple of 4096")
        let chunkCount = lengthBytes / chunk
        let headerBytes = CompressedSCOHeader.headerBytes
        var object = ByteBufferAllocator().buffer(capacity: headerBytes + lengthBytes / 2 + (chunkCount + 1) * 8)
        object.writeWithUnsafeMutableBytes(minimumWritableBytes: headerBytes) { raw in
            UnsafeMutableRawBufferPointer(rebasing: raw[0..<headerBytes]).initializeMemory(as: UInt8.self, repeating: 0)
            return headerBytes
        }
        var offsets: [UInt64] = []
        offsets.reserveCapacity(chunkCount + 1)
        var position = UInt64(headerBytes)
        var originalCRC: UInt32 = 0
        let scratchLength = Snappy.maxCompressedLength(chunk)
        let piece = UnsafeMutableRawBufferPointer.allocate(byteCount: min(pieceBytes, max(lengthBytes, chunk)), alignment: 16)
        defer { piece.deallocate() }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: scratchLength, alignment: 16)
        defer { scratch.deallocate() }
        var pieceStart = 0
        while pieceStart < lengthBytes {
            let count = min(piece.count, lengthBytes - pieceStart)
            let input = UnsafeMutableRawBufferPointer(rebasing: piece[0..<count])
            try read(pieceStart, input)
            originalCRC = CRC32C.checksum(UnsafeRawBufferPointer(input), seed: originalCRC)
            for index in 0..<(count / chunk) {
                offsets.append(position)
                let source = UnsafeRawBufferPointer(rebasing: piece[(index * chunk)..<((index + 1) * chunk)])
                let length = Snappy.compress(source, into: scratch)
                if length < chunk {
                    object.writeBytes(UnsafeRawBufferPointer(rebasing: scratch[0..<length]))
                    position += UInt64(length)
                } else {
                    object.writeBytes(source)
                    position += UInt64(chunk)
                }
            }
            pieceStart += count
        }
        offsets.append(position)
        var index = ByteBufferAllocator().buffer(capacity: offsets.count * 8)
        for offset in offsets { index.writeInteger(offset, endianness: .little) }
        let header = CompressedSCOHeader(
            volumeID: volumeID, sco: number, originalLength: UInt64(lengthBytes), originalCRC: originalCRC,
            chunkCount: UInt64(chunkCount), indexOffset: position, indexCRC: CRC32C.checksum(index))
        object.writeBuffer(&index)
        object.setBuffer(header.encode(), at: object.readerIndex)
        return object
    }

    /// Decodes and verifies the chunk index.
    package static func decodeIndex(_ bytes: ByteBuffer, header: CompressedSCOHeader, what: String) throws(VDError)
        -> [UInt64]
    {
        guard bytes.readableBytes == header.indexBytes, CRC32C.checksum(bytes) == header.indexCRC else {
            throw .corrupt("\(what): compressed SCO index checksum mismatch")
        }
        var offsets: [UInt64] = []
        offsets.reserveCapacity(Int(header.chunkCount) + 1)
        var reader = bytes
        var previous = UInt64(CompressedSCOHeader.headerBytes)
        while let offset = reader.readInteger(endianness: .little, as: UInt64.self) {
            guard offset >= previous, offset <= header.indexOffset, offset - previous <= UInt64(CompressedSCOHeader.chunkBytes)
            else { throw .corrupt("\(what): compressed SCO index is inconsistent") }
            offsets.append(offset)
            previous = offset
        }
        guard offsets.first == UInt64(CompressedSCOHeader.headerBytes), offsets.last == header.indexOffset else {
            throw .corrupt("\(what): compressed SCO index does not cover the object")
        }
        return offsets
    }

    /// The compressed byte range holding original bytes `range` (4096-aligned).
    package static func objectRange(of range: Range<UInt64>, offsets: [UInt64]) -> Range<UInt64> {
        let chunk = UInt64(CompressedSCOHeader.chunkBytes)
        let first = Int(range.lowerBound / chunk)
        let end = Int((range.upperBound + chunk - 1) / chunk)
        return offsets[first]..<offsets[end]
    }

    /// Decompresses the chunks covering original `range` from `bytes` (the object bytes `objectRange(of:)`).
    package static func decompress(
        _ bytes: ByteBuffer, range: Range<UInt64>, offsets: [UInt64], what: String
    ) throws(VDError) -> ByteBuffer {
        let chunk = CompressedSCOHeader.chunkBytes
        let first = Int(range.lowerBound / UInt64(chunk))
        let end = Int((range.upperBound + UInt64(chunk) - 1) / UInt64(chunk))
        let base = offsets[first]
        guard UInt64(bytes.readableBytes) == offsets[end] - base else {
            throw .corrupt("\(what): got \(bytes.readableBytes) compressed bytes, expected \(offsets[end] - base)")
        }
        var out = ByteBufferAllocator().buffer(capacity: (end - first) * chunk)
        try bytes.withUnsafeReadableBytes { (raw) throws(VDError) in
            for index in first..<end {
                let start = Int(offsets[index] - base)
                let stop = Int(offsets[index + 1] - base)
                let input = UnsafeRawBufferPointer(rebasing: raw[start..<stop])
                if stop - start == chunk {
                    out.writeBytes(input)
                } else {
                    try out.writeWithUnsafeMutableBytes(minimumWritableBytes: chunk) { (output) throws(VDError) -> Int in
                        try Snappy.decompress(
                            input, into: UnsafeMutableRawBufferPointer(rebasing: output[0..<chunk]),
                            what: "\(what) chunk \(index)")
                        return chunk
                    }
                }
            }
        }
        return out
    }
}
