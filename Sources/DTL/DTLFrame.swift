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

/// A frame's payload: the bytes of one or more buffers, in order. An append's journal range leaves the owner as the
/// buffers its journal wrote (batch headers and the guest's data) and reaches the peer's file as the slices it arrived
/// in, so neither side copies it (`DTLFrameReader`).
public struct DTLPayload: Sendable {
    /// `append(compacting:)` keeps a slice of at least this many bytes as it is (if it fills half its storage).
    public static let keepFromBytes = 64 << 10
    /// The buffer copied slices go to is at most this large (unless one slice is larger).
    static let copyChunkBytes = 256 << 10

    public private(set) var parts: [ByteBuffer] = []
    public private(set) var readableBytes = 0
    /// The last part is a buffer `append(compacting:)` copies slices into.
    private var copyingIntoLast = false

    public init() {}

    public init(_ buffer: ByteBuffer) { append(buffer) }

    public init(parts: [ByteBuffer]) { for part in parts { append(part) } }

    public mutating func append(_ buffer: ByteBuffer) {
        guard buffer.readableBytes > 0 else { return }
        finishCopying()
        parts.append(buffer)
        readableBytes += buffer.readableBytes
    }

    /// Appends `slice` without letting it hold much more memory than its bytes: it is kept as it is only when it is
    /// at least `keepFromBytes` long and fills at least half of its storage (a read buffer, a guest's write); else
    /// it is copied into a buffer of this payload's own, sized for up to `remaining` bytes (this slice's included) to
    /// come. So the payload has few parts, and holds at most about twice its bytes (see `finishCopying`).
    public mutating func append(compacting slice: ByteBuffer, remaining: Int) {
        let count = slice.readableBytes
        guard count > 0 else { return }
        if count >= Self.keepFromBytes && count * 2 >= slice.storageCapacity {
            append(slice)
            return
        }
        if !copyingIntoLast || parts[parts.count - 1].writableBytes < count {
            finishCopying()
            parts.append(ByteBufferAllocator().buffer(capacity: max(count, min(remaining, Self.copyChunkBytes))))
            copyingIntoLast = true
        }
        parts[parts.count - 1].writeImmutableBuffer(slice)
        readableBytes += count
    }

    /// Ends copying into the last part (the next compacted slice starts a new buffer). A copy buffer filled less than
    /// half is copied once more into one of its size.
    public mutating func finishCopying() {
        guard copyingIntoLast else { return }
        copyingIntoLast = false
        let last = parts[parts.count - 1]
        guard last.readableBytes * 2 < last.capacity else { return }
        var exact = ByteBufferAllocator().buffer(capacity: last.readableBytes)
        exact.writeImmutableBuffer(last)
        parts[parts.count - 1] = exact
    }

    /// The CRC32C of every byte, in order.
    public func crc32c() -> UInt32 {
        parts.reduce(0) { crc, part in CRC32C.checksum(part, seed: crc) }
    }

    /// The bytes in one buffer (a copy when there are several parts).
    public var joined: ByteBuffer {
        if parts.count == 1 { return parts[0] }
        var all = ByteBufferAllocator().buffer(capacity: readableBytes)
        for part in parts { all.writeImmutableBuffer(part) }
        return all
    }

    /// Removes the first `count` bytes and returns them (nil, and nothing removed: fewer bytes than that).
    public mutating func removeFirst(_ count: Int) -> ByteBuffer? {
        guard count <= readableBytes else { return nil }
        var taken = ByteBufferAllocator().buffer(capacity: count)
        while taken.readableBytes < count {
            let take = min(count - taken.readableBytes, parts[0].readableBytes)
            taken.writeImmutableBuffer(parts[0].readSlice(length: take)!)
            if parts[0].readableBytes == 0 { parts.removeFirst() }
        }
        if parts.isEmpty { copyingIntoLast = false }
        readableBytes -= count
        return taken
    }

    /// Calls `body` with the bytes of every part, in order (for one pwritev).
    public func withUnsafeReadableParts<R>(
        _ body: ([UnsafeRawBufferPointer]) throws(VDError) -> R
    ) throws(VDError) -> R {
        try withReadablePointers(parts, body)
    }
}

extension DTLPayload: Hashable {
    public static func == (a: DTLPayload, b: DTLPayload) -> Bool { a.joined == b.joined }
    public func hash(into hasher: inout Hasher) { hasher.combine(joined) }
}

/// A frame header that verified (magic, header CRC, version, kind, payload bound): what a reader needs to take the
/// payload.
struct DTLFrameHeader {
    var kind: DTLFrameKind
    var volumeID: VolumeID
    var generation: UInt64
    var epoch: UInt64
    var value: UInt64
    var payloadBytes: Int
    var payloadCRC: UInt32

    /// Decodes and verifies the 64 bytes of `header` (from its reader index).
    init(verifying header: ByteBuffer) throws(VDError) {
        precondition(header.readableBytes >= DTLFrame.headerBytes, "a DTL frame header is 64 bytes")
        guard header.hasMagic(DTLFrame.magic) else { throw VDError(.corrupt, "DTL frame: bad magic") }
        guard header.getLE(UInt32.self, at: 60) == header.crc32c(0, 60) else {
            throw VDError(.corrupt, "DTL frame: header checksum mismatch")
        }
        let version = header.getLE(UInt16.self, at: 8)
        guard version == DTLFrame.version else {
            throw VDError(.corrupt, "DTL frame: unsupported version \(version)")
        }
        guard let kind = DTLFrameKind(rawValue: header.getLE(UInt16.self, at: 10)) else {
            throw VDError(.corrupt, "DTL frame: unknown kind \(header.getLE(UInt16.self, at: 10))")
        }
        let length = Int(header.getLE(UInt32.self, at: 12))
        guard length <= DTLFrame.payloadBytesMax else {
            throw VDError(.corrupt, "DTL frame: payload of \(length) bytes")
        }
        self.kind = kind
        volumeID = VolumeID(high: header.getLE(UInt64.self, at: 16), low: header.getLE(UInt64.self, at: 24))
        generation = header.getLE(UInt64.self, at: 32)
        epoch = header.getLE(UInt64.self, at: 40)
        value = header.getLE(UInt64.self, at: 48)
        payloadBytes = length
        payloadCRC = header.getLE(UInt32.self, at: 56)
    }

    /// The frame, once `payload` (all `payloadBytes` of it) matches the header's CRC (`crc`: the payload's CRC32C,
    /// taken as it arrived; nil: computed here).
    func frame(_ payload: DTLPayload, crc: UInt32? = nil) throws(VDError) -> DTLFrame {
        precondition(payload.readableBytes == payloadBytes, "a DTL frame's payload is whole before it is checked")
        guard (crc ?? payload.crc32c()) == payloadCRC else {
            throw VDError(.corrupt, "DTL frame: payload checksum mismatch")
        }
        var frame = DTLFrame(kind: kind, volumeID: volumeID, generation: generation, epoch: epoch, value: value)
        frame.payloadParts = payload
        return frame
    }
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
    /// The payload as the buffers it is made of.
    public var payloadParts: DTLPayload {
        didSet { payloadCRC = nil }
    }
    /// The payload's CRC32C when the sender already knows it (derived from the journal's own CRCs, `append(crc:)`):
    /// the header then does not read the payload again. Checked against the bytes in debug builds.
    public private(set) var payloadCRC: UInt32?

    /// The payload in one buffer (a copy when it is made of several: for small frames and tests).
    public var payload: ByteBuffer {
        get { payloadParts.joined }
        set { payloadParts = DTLPayload(newValue) }
    }

    public init(
        kind: DTLFrameKind, volumeID: VolumeID, generation: UInt64, epoch: UInt64 = 0, value: UInt64 = 0,
        payload: ByteBuffer = ByteBuffer()
    ) {
        self.kind = kind
        self.volumeID = volumeID
        self.generation = generation
        self.epoch = epoch
        self.value = value
        self.payloadParts = DTLPayload(payload)
    }

    public static func == (a: DTLFrame, b: DTLFrame) -> Bool {
        a.kind == b.kind && a.volumeID == b.volumeID && a.generation == b.generation && a.epoch == b.epoch
            && a.value == b.value && a.payloadParts == b.payloadParts
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(kind)
        hasher.combine(volumeID)
        hasher.combine(generation)
        hasher.combine(epoch)
        hasher.combine(value)
        hasher.combine(payloadParts)
    }

    /// An append of `bytes` at `offset` of the journal of `epoch` (SCO `sco`).
    public static func append(
        volumeID: VolumeID, generation: UInt64, epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer
    ) -> DTLFrame {
        append(
            volumeID: volumeID, generation: generation, epoch: epoch, sco: sco, offset: offset, bytes: DTLPayload(bytes)
        )
    }

    /// An append of `bytes` at `offset` of the journal of `epoch` (SCO `sco`), their buffers not copied. `crc`, when
    /// given, is the CRC32C of those bytes (the frame's payload CRC is derived from it).
    public static func append(
        volumeID: VolumeID, generation: UInt64, epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: DTLPayload,
        crc: UInt32? = nil
    ) -> DTLFrame {
        var prefix = ByteBufferAllocator().buffer(capacity: 8)
        prefix.writeInteger(offset, endianness: .little)
        var payload = DTLPayload(prefix)
        for part in bytes.parts { payload.append(part) }
        var frame = DTLFrame(
            kind: .append, volumeID: volumeID, generation: generation, epoch: epoch, value: sco.rawValue)
        frame.payloadParts = payload
        if let crc {
            frame.payloadCRC = CRC32C.combine(
                CRC32C.checksum(prefix), crc, lengthB: UInt64(payload.readableBytes - 8))
        }
        return frame
    }

    /// For an append: the journal offset and the bytes.
    public func appended() throws(VDError) -> (offset: UInt64, bytes: DTLPayload) {
        var bytes = payloadParts
        guard kind == .append, let prefix = bytes.removeFirst(8) else {
            throw VDError(.corrupt, "DTL frame: not an append with an offset")
        }
        return (prefix.getLE(UInt64.self, at: 0), bytes)
    }

    /// The 64-byte header of this frame (its payload CRC included).
    public func encodedHeader() -> ByteBuffer {
        assert(
            payloadCRC == nil || payloadCRC == payloadParts.crc32c(),
            "a DTL frame's known payload CRC differs from its bytes")
        var header = ByteBuffer.zeroes(Self.headerBytes)
        header.setBytes(Self.magic, at: 0)
        header.setLE(Self.version, at: 8)
        header.setLE(kind.rawValue, at: 10)
        header.setLE(UInt32(payloadParts.readableBytes), at: 12)
        header.setLE(volumeID.high, at: 16)
        header.setLE(volumeID.low, at: 24)
        header.setLE(generation, at: 32)
        header.setLE(epoch, at: 40)
        header.setLE(value, at: 48)
        header.setLE(payloadCRC ?? payloadParts.crc32c(), at: 56)
        header.setLE(header.crc32c(0, 60), at: 60)
        return header
    }

    public func encode(into out: inout ByteBuffer) {
        out.writeImmutableBuffer(encodedHeader())
        for part in payloadParts.parts { out.writeImmutableBuffer(part) }
    }

    public func encode() -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: Self.headerBytes + payloadParts.readableBytes)
        encode(into: &out)
        return out
    }

    /// Takes one whole frame from the front of `buffer` (nil: not all of it arrived yet). A frame that does not
    /// verify is an error: the stream cannot be trusted after it.
    public static func decode(from buffer: inout ByteBuffer) throws(VDError) -> DTLFrame? {
        guard buffer.readableBytes >= headerBytes else { return nil }
        let header = try DTLFrameHeader(verifying: buffer.getSlice(at: buffer.readerIndex, length: headerBytes)!)
        guard buffer.readableBytes >= headerBytes + header.payloadBytes else { return nil }
        let payload = buffer.getSlice(at: buffer.readerIndex + headerBytes, length: header.payloadBytes)!
        let frame = try header.frame(DTLPayload(payload))
        buffer.moveReaderIndex(forwardBy: headerBytes + header.payloadBytes)
        return frame
    }
}

/// Frames from a byte stream that arrives in pieces (the reads of a connection), without gathering it into one
/// buffer: a frame's header is verified once its 64 bytes are in, then its payload is collected as slices of the
/// pieces it arrived in (`DTLPayload.append(compacting:)`: small slices, or slices that would pin a much larger read
/// buffer, are copied), and checked against the header's CRC once whole.
public struct DTLFrameReader: Sendable {
    private var headerBytes = ByteBuffer()
    private var header: DTLFrameHeader?
    private var payload = DTLPayload()
    /// The CRC32C of the payload bytes taken so far, each slice's taken as it arrives (still in the CPU's cache
    /// from the socket read).
    private var crc: UInt32 = 0

    public init() {}

    /// Bytes read but not yet part of a whole frame.
    public var pendingBytes: Int { headerBytes.readableBytes + payload.readableBytes }

    /// Takes bytes from the front of `piece` until a frame is whole (returned) or `piece` is used up (nil). Call
    /// again while `piece` has bytes. A frame that does not verify is an error: the stream cannot be trusted after it.
    public mutating func next(from piece: inout ByteBuffer) throws(VDError) -> DTLFrame? {
        if header == nil {
            guard piece.readableBytes > 0 else { return nil }
            let take = min(DTLFrame.headerBytes - headerBytes.readableBytes, piece.readableBytes)
            if take == DTLFrame.headerBytes {
                header = try DTLFrameHeader(verifying: piece.readSlice(length: take)!)
            } else {
                headerBytes.writeImmutableBuffer(piece.readSlice(length: take)!)
                guard headerBytes.readableBytes == DTLFrame.headerBytes else { return nil }
                header = try DTLFrameHeader(verifying: headerBytes)
                headerBytes.clear()
            }
        }
        let whole = header!
        let remaining = whole.payloadBytes - payload.readableBytes
        let take = min(remaining, piece.readableBytes)
        if take > 0 {
            let slice = piece.readSlice(length: take)!
            crc = CRC32C.checksum(slice, seed: crc)
            payload.append(compacting: slice, remaining: remaining)
        }
        guard payload.readableBytes == whole.payloadBytes else { return nil }
        payload.finishCopying()
        let frame = try whole.frame(payload, crc: crc)
        header = nil
        payload = DTLPayload()
        crc = 0
        return frame
    }
}
