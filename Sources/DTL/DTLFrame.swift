// The distributed transaction log's wire format: frames between a volume's owner and its DTL
// peer. The owner mirrors its journal (the open SCO of each epoch) byte for byte: a frame carries a range of one
// journal file at its offset, so the peer's copy is the journal itself, and the batches in it verify with the same
// checks recovery applies to local journals (magic, CRC, chain, own offset, SCO number, volume).
//
// Frame (little-endian): a 64-byte header, then `payloadBytes` of payload.
//
//   0  magic "VDDTLFR1"       8  version u16      10 kind u16        12 payloadBytes u32
//   16 volume id (16 B)       32 generation u64   40 epoch u64       48 value u64 (SCO number, epoch or count)
//   56 payload CRC32C u32     60 header CRC32C u32 (of bytes 0..<60)
//
// Every frame is verified (magic, version, both CRCs, a payload bound) before anything reads its fields.

public import NIOCore
public import VolumeCore

public enum DTLFrameKind: UInt16, Sendable, CaseIterable {
    /// Owner -> peer: bytes of the journal of `epoch` (SCO `value`) at the offset in the first 8 payload bytes.
    case append = 1
    /// Owner -> peer: make everything appended so far durable; answered by `synced` with the same `value`.
    case sync = 2
    /// Peer -> owner: everything appended before the matching `sync` (same `value`) is durable.
    case synced = 3
    /// Owner -> peer: the backend holds every epoch through `value`; their journals may go.
    case trim = 4
    /// Taker -> peer: send the journals of every epoch after `value`.
    case fetch = 5
    /// Peer -> taker: one journal (SCO `value` of `epoch`); the payload is its bytes from offset 0.
    case journal = 6
    /// Peer -> taker: no more journals follow (`value` = how many were sent).
    case fetchDone = 7
    /// Peer -> owner: a request was refused; the payload is the message (UTF-8).
    case refused = 8
    /// Client -> peer, first on every connection: the payload is the cluster token (UTF-8).
    case hello = 9
    /// Peer -> owner: the appends of this connection through the `value`-th are written (in the peer's page cache).
    case received = 10
    /// Owner -> peer: drop every journal held for the volume (the owner is about to send again everything the
    /// backend lacks: a catch-up starts with it, so the peer never mixes an earlier life's journals with the new).
    case reset = 11
}

public struct DTLFrame: Sendable, Hashable {
    public static let headerBytes = 64
    public static let version: UInt16 = 1
    /// The largest payload a frame may carry (a journal is at most an SCO: 1 GiB).
    public static let payloadBytesMax = 1 << 30
    static let magic: [UInt8] = Array("VDDTLFR1".utf8)

    public var kind: DTLFrameKind
    public var volumeID: VolumeID
    /// The owner generation that wrote it: a peer refuses appends of a generation older than one it has seen.
    public var generation: UInt64
    public var epoch: UInt64
    public var value: UInt64
    public var payload: ByteBuffer

    public init(
        kind: DTLFrameKind, volumeID: VolumeID, generation: UInt64, epoch: UInt64 = 0, value: UInt64 = 0,
        payload: ByteBuffer = ByteBuffer()
    ) {
        self.kind = kind
        self.volumeID = volumeID
        self.generation = generation
        self.epoch = epoch
        self.value = value
        self.payload = payload
    }

    /// An append of `bytes` at `offset` of the journal of `epoch` (SCO `sco`).
    public static func append(
        volumeID: VolumeID, generation: UInt64, epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer
    ) -> DTLFrame {
        var payload = ByteBufferAllocator().buffer(capacity: 8 + bytes.readableBytes)
        payload.writeInteger(offset, endianness: .little)
        payload.writeImmutableBuffer(bytes)
        return DTLFrame(
            kind: .append, volumeID: volumeID, generation: generation, epoch: epoch, value: sco.rawValue,
            payload: payload)
    }

    /// An append whose payload already starts with the journal offset (8 bytes, little-endian): no copy.
    public static func append(
        volumeID: VolumeID, generation: UInt64, epoch: UInt64, sco: SCONumber, prefixedPayload: ByteBuffer
    ) -> DTLFrame {
        precondition(prefixedPayload.readableBytes >= 8, "an append payload starts with its offset")
        return DTLFrame(
            kind: .append, volumeID: volumeID, generation: generation, epoch: epoch, value: sco.rawValue,
            payload: prefixedPayload)
    }

    /// A buffer for an append's payload: the offset, then `capacity` bytes to be written after it.
    public static func appendPayload(offset: UInt64, capacity: Int) -> ByteBuffer {
        var payload = ByteBufferAllocator().buffer(capacity: 8 + capacity)
        payload.writeInteger(offset, endianness: .little)
        return payload
    }

    /// For an append: the journal offset and the bytes.
    public func appended() throws(VDError) -> (offset: UInt64, bytes: ByteBuffer) {
        guard kind == .append, payload.readableBytes >= 8,
            let offset = payload.getInteger(at: payload.readerIndex, endianness: .little, as: UInt64.self)
        else { throw VDError(.corrupt, "DTL frame: not an append with an offset") }
        return (offset, payload.getSlice(at: payload.readerIndex + 8, length: payload.readableBytes - 8)!)
    }

    /// The 64-byte header of this frame (its payload CRC included).
    public func encodedHeader() -> ByteBuffer {
        var header = ByteBuffer.zeroes(Self.headerBytes)
        header.setBytes(Self.magic, at: 0)
        header.setLE(Self.version, at: 8)
        header.setLE(kind.rawValue, at: 10)
        header.setLE(UInt32(payload.readableBytes), at: 12)
        header.setLE(volumeID.high, at: 16)
        header.setLE(volumeID.low, at: 24)
        header.setLE(generation, at: 32)
        header.setLE(epoch, at: 40)
        header.setLE(value, at: 48)
        header.setLE(payload.crc32c(0, payload.readableBytes), at: 56)
        header.setLE(header.crc32c(0, 60), at: 60)
        return header
    }

    public func encode(into out: inout ByteBuffer) {
        out.writeImmutableBuffer(encodedHeader())
        out.writeImmutableBuffer(payload)
    }

    public func encode() -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: Self.headerBytes + payload.readableBytes)
        encode(into: &out)
        return out
    }

    /// The whole length (header and payload) of the frame whose header starts `buffer`, if the header arrived
    /// (unverified: only for sizing a buffer).
    public static func length(ofFrameAt buffer: ByteBuffer) -> Int? {
        guard buffer.readableBytes >= headerBytes else { return nil }
        return headerBytes + Int(buffer.getLE(UInt32.self, at: 12))
    }

    /// Takes one whole frame from the front of `buffer` (nil: not all of it arrived yet). A frame that does not
    /// verify is an error: the stream cannot be trusted after it.
    public static func decode(from buffer: inout ByteBuffer) throws(VDError) -> DTLFrame? {
        guard buffer.readableBytes >= headerBytes else { return nil }
        let start = buffer.readerIndex
        let header = buffer.getSlice(at: start, length: headerBytes)!
        guard header.hasMagic(magic) else { throw VDError(.corrupt, "DTL frame: bad magic") }
        guard header.getLE(UInt32.self, at: 60) == header.crc32c(0, 60) else {
            throw VDError(.corrupt, "DTL frame: header checksum mismatch")
        }
        let version = header.getLE(UInt16.self, at: 8)
        guard version == Self.version else { throw VDError(.corrupt, "DTL frame: unsupported version \(version)") }
        guard let kind = DTLFrameKind(rawValue: header.getLE(UInt16.self, at: 10)) else {
            throw VDError(.corrupt, "DTL frame: unknown kind \(header.getLE(UInt16.self, at: 10))")
        }
        let length = Int(header.getLE(UInt32.self, at: 12))
        guard length <= payloadBytesMax else { throw VDError(.corrupt, "DTL frame: payload of \(length) bytes") }
        guard buffer.readableBytes >= headerBytes + length else { return nil }
        let payload = buffer.getSlice(at: start + headerBytes, length: length)!
        guard payload.crc32c(0, length) == header.getLE(UInt32.self, at: 56) else {
            throw VDError(.corrupt, "DTL frame: payload checksum mismatch")
        }
        buffer.moveReaderIndex(forwardBy: headerBytes + length)
        return DTLFrame(
            kind: kind,
            volumeID: VolumeID(high: header.getLE(UInt64.self, at: 16), low: header.getLE(UInt64.self, at: 24)),
            generation: header.getLE(UInt64.self, at: 32), epoch: header.getLE(UInt64.self, at: 40),
            value: header.getLE(UInt64.self, at: 48), payload: payload)
    }
}
