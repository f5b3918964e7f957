import DTL
import FlashIO
import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing
import VolumeCore

/// The DTL peer's pieces: the frame codec, the peer's journal store, and the peer service over TCP.
@Suite struct DTLStoreTests {
    static let volume = VolumeID(high: 0x1234, low: 0x5678)

    func bytes(_ count: Int, seed: UInt8) -> ByteBuffer {
        var b = ByteBufferAllocator().buffer(capacity: count)
        for i in 0..<count { b.writeInteger(UInt8(truncatingIfNeeded: Int(seed) &* 31 &+ i)) }
        return b
    }

    static let token = "dtl-test-token-0123456789"

    /// A DTL peer on loopback (its store in a temporary directory): `body` gets the server, its port and the store.
    /// The server, the store and the thread pool are stopped afterwards (stopping the server again is harmless).
    func withPeer(
        bytesPerVolumeMax: UInt64, _ body: (DTLServer, Int, DTLStore) async throws -> Void
    ) async throws {
        let root = NSTemporaryDirectory() + "vd-dtl-" + UUID().uuidString
        defer { try? Syscall.removeTree(root) }
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let store = try DTLStore(directory: root, bytesPerVolumeMax: bytesPerVolumeMax, fs: PosixFileSystem())
        let server = DTLServer(
            host: "127.0.0.1", port: 0, token: Self.token, store: store, pool: pool,
            group: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "dtl"))
        try await server.start()
        do {
            try await body(server, try #require(server.localPort), store)
        } catch {
            await server.stop()
            store.close()
            try? await pool.shutdownGracefully()
            throw error
        }
        await server.stop()
        store.close()
        try await pool.shutdownGracefully()
    }

    func connect(port: Int, generation: UInt64, token: String = Self.token) async throws -> DTLClient {
        try await DTLClient.connect(
            host: "127.0.0.1", port: port, token: token, volumeID: Self.volume, generation: generation,
            group: MultiThreadedEventLoopGroup.singleton)
    }

    @Test func framesRoundTripInPiecesAndRejectDamage() throws {
        let frames = [
            DTLFrame.append(
                volumeID: Self.volume, generation: 3, epoch: 7, sco: SCONumber(0x30_0000_0001), offset: 8192,
                bytes: bytes(10_000, seed: 1)),
            DTLFrame(kind: .sync, volumeID: Self.volume, generation: 3),
            DTLFrame(kind: .trim, volumeID: Self.volume, generation: 3, value: 6),
        ]
        var stream = ByteBufferAllocator().buffer(capacity: 0)
        for frame in frames { frame.encode(into: &stream) }
        // Fed a few bytes at a time: nothing is decoded before it is whole.
        var incoming = ByteBufferAllocator().buffer(capacity: 0)
        var decoded: [DTLFrame] = []
        while let chunk = stream.readSlice(length: min(777, stream.readableBytes)) {
            incoming.writeImmutableBuffer(chunk)
            while let frame = try DTLFrame.decode(from: &incoming) { decoded.append(frame) }
            if stream.readableBytes == 0 { break }
        }
        #expect(decoded == frames)
        let (offset, payload) = try decoded[0].appended()
        #expect(offset == 8192 && payload.joined == bytes(10_000, seed: 1))

        // Any flipped byte (header or payload) is an error, never a different frame.
        let whole = frames[0].encode()
        for index in [0, 9, 13, 20, 45, 57, 61, 64, 5000, whole.readableBytes - 1] {
            var damaged = whole
            damaged.setInteger(damaged.getInteger(at: index, as: UInt8.self)! ^ 0x40, at: index)
            #expect(throws: VDError.self, "byte \(index)") { _ = try DTLFrame.decode(from: &damaged) }
        }
    }

    /// The reader of a connection's stream (`DTLFrameReader`): frames come out whole and equal to those sent for any
    /// split of the stream into reads, a large payload is kept as slices of the reads (not gathered), a slice that
    /// would pin a much larger read buffer is copied, and damage anywhere is an error.
    @Test func theReaderTakesFramesFromReadsOfAnySizeWithoutGatheringThem() throws {
        let frames = [
            DTLFrame(kind: .hello, volumeID: Self.volume, generation: 0, payload: bytes(25, seed: 9)),
            DTLFrame.append(
                volumeID: Self.volume, generation: 3, epoch: 7, sco: SCONumber(0x30_0000_0001), offset: 4096,
                bytes: DTLPayload(parts: [bytes(4096, seed: 1), bytes(300_000, seed: 2)])),
            DTLFrame(kind: .sync, volumeID: Self.volume, generation: 3, value: 1),
            DTLFrame.append(
                volumeID: Self.volume, generation: 3, epoch: 7, sco: SCONumber(0x30_0000_0001), offset: 308_288,
                bytes: bytes(5000, seed: 3)),
            DTLFrame(kind: .trim, volumeID: Self.volume, generation: 3, value: 6),
        ]
        var stream = ByteBufferAllocator().buffer(capacity: 0)
        for frame in frames { frame.encode(into: &stream) }
        for pieceBytes in [1, 63, 64, 65, 4097, 65_536, 1 << 20] {
            var reader = DTLFrameReader()
            var rest = stream
            var decoded: [DTLFrame] = []
            while rest.readableBytes > 0 {
                // Each read in a buffer of its own, as a socket's reads arrive.
                var piece = ByteBufferAllocator().buffer(capacity: min(pieceBytes, rest.readableBytes))
                piece.writeImmutableBuffer(rest.readSlice(length: min(pieceBytes, rest.readableBytes))!)
                while let frame = try reader.next(from: &piece) { decoded.append(frame) }
                #expect(piece.readableBytes == 0)
            }
            #expect(decoded == frames, "reads of \(pieceBytes) bytes")
            #expect(reader.pendingBytes == 0)
            let (offset, payload) = try decoded[1].appended()
            #expect(offset == 4096 && payload.readableBytes == 304_096)
            if pieceBytes == 65_536 {
                // The large payload stays in the reads' buffers: no part is a copy of more than one read.
                #expect(decoded[1].payloadParts.parts.count >= 304_104 / 65_536)
                #expect(decoded[1].payloadParts.parts.allSatisfy { $0.readableBytes <= 65_536 })
            }
        }
        // A read of a few bytes in a large buffer is copied, not kept (it would pin the whole buffer).
        var reader = DTLFrameReader()
        var whole = frames[1].encode()
        var first = ByteBufferAllocator().buffer(capacity: 1 << 20)
        first.writeImmutableBuffer(whole.readSlice(length: 70_000)!)
        #expect(try reader.next(from: &first) == nil)
        var small = ByteBufferAllocator().buffer(capacity: 1 << 20)
        small.writeImmutableBuffer(whole.readSlice(length: 100)!)
        #expect(try reader.next(from: &small) == nil)
        var last = whole
        let frame = try #require(try reader.next(from: &last))
        #expect(frame == frames[1])
        #expect(frame.payloadParts.parts.allSatisfy { $0.readableBytes * 2 >= $0.storageCapacity })

        // Damage in the header or the payload: an error, never a frame.
        for index in [3, 30, 61, 64, 100_000, stream.readableBytes - 1] {
            var damaged = frames[1].encode()
            guard index < damaged.readableBytes else { continue }
            damaged.setInteger(damaged.getInteger(at: index, as: UInt8.self)! ^ 0x01, at: index)
            var reader = DTLFrameReader()
            #expect(throws: VDError.self, "byte \(index)") {
                while damaged.readableBytes > 0 {
                    var piece = damaged.readSlice(length: min(4096, damaged.readableBytes))!
                    while try reader.next(from: &piece) != nil {}
                }
            }
        }
    }

    /// A payload built from slices keeps the large ones that fill their storage, and copies the rest into buffers of
    /// its own (few parts, memory within about twice its bytes), in order.
    @Test func aCompactedPayloadKeepsLargeSlicesAndCopiesTheRest() throws {
        let big = bytes(1 << 20, seed: 7)
        var payload = DTLPayload()
        var expected = ByteBufferAllocator().buffer(capacity: 0)
        func add(_ slice: ByteBuffer, _ remaining: Int) {
            payload.append(compacting: slice, remaining: remaining)
            expected.writeImmutableBuffer(slice)
        }
        add(big.getSlice(at: 0, length: 4096)!, 600_000)  // small: copied
        add(big.getSlice(at: 8192, length: 4096)!, 600_000)  // copied into the same buffer
        add(big.getSlice(at: 16384, length: 400_000)!, 400_000)  // large, but under half of its storage: copied
        add(big, 1 << 20)  // kept
        add(big.getSlice(at: 100, length: 12)!, 12)  // copied, into a buffer of its size
        payload.finishCopying()
        #expect(payload.joined == expected)
        #expect(payload.readableBytes == expected.readableBytes)
        #expect(payload.parts.count == 4)
        #expect(payload.parts[2].storageCapacity == big.storageCapacity)
        let held = payload.parts.reduce(0) { $0 + ($1.storageCapacity == big.storageCapacity ? 0 : $1.capacity) }
        #expect(held <= 2 * (expected.readableBytes - big.readableBytes))
        #expect(payload.crc32c() == CRC32C.checksum(expected))
    }

    /// An append whose CRC the sender derived (a journal combines its batches' CRCs) carries it in the header, and it
    /// is the CRC of the payload (the offset prefix included).
    @Test func aDerivedPayloadCRCIsTheCRCOfTheBytes() throws {
        let parts = [bytes(4096, seed: 4), bytes(8192, seed: 5), bytes(12, seed: 6)]
        let crc = parts.reduce(UInt32(0)) { CRC32C.checksum($1, seed: $0) }
        let frame = DTLFrame.append(
            volumeID: Self.volume, generation: 1, epoch: 2, sco: SCONumber(0x20_0000_0001), offset: 12_288,
            bytes: DTLPayload(parts: parts), crc: crc)
        #expect(frame.payloadCRC == frame.payloadParts.crc32c())
        var encoded = frame.encode()
        #expect(try DTLFrame.decode(from: &encoded) == frame)
    }

    @Test func theStoreKeepsJournalsAcrossARestartTrimsAndFencesOldGenerations() throws {
        let root = NSTemporaryDirectory() + "vd-dtl-" + UUID().uuidString
        defer { try? Syscall.removeTree(root) }
        let fs = PosixFileSystem()
        var store = try DTLStore(directory: root, bytesPerVolumeMax: 1 << 20, fs: fs)
        let a = SCONumber(0x20_0000_0000)
        let b = SCONumber(0x20_0000_0001)
        try store.append(volume: Self.volume, generation: 2, epoch: 5, sco: a, offset: 0, bytes: bytes(4096, seed: 1))
        try store.append(
            volume: Self.volume, generation: 2, epoch: 5, sco: a, offset: 4096, bytes: bytes(8192, seed: 2))
        try store.append(volume: Self.volume, generation: 2, epoch: 6, sco: b, offset: 0, bytes: bytes(4096, seed: 3))
        try store.sync(volume: Self.volume, generation: 2)
        #expect(try store.usage(volume: Self.volume) == (bytes: 16384, generation: 2))

        // A restarted peer has the same journals and remembers the generation.
        store.close()
        store = try DTLStore(directory: root, bytesPerVolumeMax: 1 << 20, fs: fs)
        let held = try store.journals(volume: Self.volume, generation: 2, afterEpoch: 0)
        #expect(held.map(\.epoch) == [5, 6] && held.map(\.sco) == [a, b])
        var expected = bytes(4096, seed: 1)
        expected.writeImmutableBuffer(bytes(8192, seed: 2))
        #expect(held[0].bytes == expected)
        #expect(try store.journals(volume: Self.volume, generation: 2, afterEpoch: 5).map(\.epoch) == [6])

        // A fenced owner (older generation) cannot change what a taker fetches.
        #expect(throws: VDError.self) {
            try store.append(
                volume: Self.volume, generation: 1, epoch: 6, sco: b, offset: 0, bytes: bytes(4096, seed: 9))
        }
        #expect(try store.journals(volume: Self.volume, generation: 2, afterEpoch: 5)[0].bytes == bytes(4096, seed: 3))

        // Bounded: past the bound an append is refused with no-space (the owner then degrades).
        do {
            try store.append(
                volume: Self.volume, generation: 2, epoch: 6, sco: b, offset: 4096, bytes: bytes(1 << 20, seed: 4))
            Issue.record("an append past the bound was taken")
        } catch {
            #expect(error.code == .noSpace)
        }

        // Trimmed epochs are gone, durably.
        try store.trim(volume: Self.volume, generation: 2, throughEpoch: 5)
        store.close()
        store = try DTLStore(directory: root, bytesPerVolumeMax: 1 << 20, fs: fs)
        #expect(try store.journals(volume: Self.volume, generation: 2, afterEpoch: 0).map(\.epoch) == [6])
        #expect(try store.usage(volume: Self.volume).bytes == 4096)
        store.close()
    }

    @Test func aPeerOverTCPStoresSyncsTrimsAndHandsJournalsToATaker() async throws {
        try await withPeer(bytesPerVolumeMax: 4 << 20) { _, port, store in
            let owner = try await connect(port: port, generation: 4)
            let a = SCONumber(0x40_0000_0000)
            let b = SCONumber(0x40_0000_0001)
            try await owner.append(epoch: 9, sco: a, offset: 0, bytes: bytes(4096, seed: 1))
            try await owner.append(epoch: 9, sco: a, offset: 4096, bytes: bytes(65536, seed: 2))
            try await owner.append(epoch: 10, sco: b, offset: 0, bytes: bytes(4096, seed: 3))
            try await owner.sync()
            #expect(try store.usage(volume: Self.volume) == (bytes: 4096 + 65536 + 4096, generation: 4))

            // The backend holds epoch 9: the peer drops it; a taker gets epoch 10 only.
            try await owner.trim(throughEpoch: 9)
            try await owner.sync()
            let taker = try await connect(port: port, generation: 5)
            let journals = try await taker.fetch(afterEpoch: 8)
            #expect(journals.map(\.epoch) == [10] && journals.map(\.sco) == [b])
            #expect(journals.first?.bytes == bytes(4096, seed: 3))

            // Once a newer generation wrote, the old owner's appends are refused, and its sync says so.
            try await taker.append(epoch: 11, sco: SCONumber(0x50_0000_0000), offset: 0, bytes: bytes(4096, seed: 4))
            try await taker.sync()
            try await owner.append(epoch: 10, sco: b, offset: 4096, bytes: bytes(4096, seed: 5))
            await #expect(throws: VDError.self) { try await owner.sync() }
            #expect(try await taker.fetch(afterEpoch: 9).first?.bytes == bytes(4096, seed: 3))

            // Without the token nothing is taken.
            let stranger = try await connect(port: port, generation: 9, token: "wrong-token-wrong-token")
            await #expect(throws: VDError.self) { try await stranger.sync() }
            #expect(try store.usage(volume: Self.volume).generation == 5)

            await owner.close()
            await taker.close()
            await stranger.close()
        }
    }

    /// A burst of appends (small ones and a 3 MiB one, which arrives in many reads) is answered in order: each
    /// `received` counts every append before it, consecutive answers may be merged, and the last counts them all. Once
    /// the server stopped, nothing of a connection touches the store any more.
    @Test func aBurstOfAppendsIsAnsweredInOrderAndStopWaitsForTheQueue() async throws {
        try await withPeer(bytesPerVolumeMax: 64 << 20) { server, port, store in
            let owner = try await connect(port: port, generation: 1)
            let sco = SCONumber(0x40_0000_0000)
            let big = ByteBuffer(repeating: 0xA5, count: 3 << 20)
            var offset: UInt64 = 0
            for index in 0..<300 {
                let payload = index == 150 ? big : bytes(4096, seed: UInt8(truncatingIfNeeded: index))
                owner.post(owner.appendFrame(epoch: 1, sco: sco, offset: offset, bytes: payload))
                offset += UInt64(payload.readableBytes)
            }
            owner.post(owner.frame(.sync, value: 1))
            var counts: [UInt64] = []
            while true {
                let frame = try await owner.nextFrame()
                if frame.kind == .synced { break }
                #expect(frame.kind == .received)
                counts.append(frame.value)
            }
            #expect(counts == counts.sorted() && Set(counts).count == counts.count && counts.last == 300)
            #expect(try store.usage(volume: Self.volume).bytes == offset)
            let journal = try #require(try store.journals(volume: Self.volume, generation: 1, afterEpoch: 0).first)
            #expect(
                journal.bytes.getSlice(at: journal.bytes.readerIndex + 150 * 4096, length: big.readableBytes) == big)

            // Appends still arriving when the server stops: once `stop` returned, the store no longer changes.
            for index in 0..<200 {
                owner.post(
                    owner.appendFrame(
                        epoch: 1, sco: sco, offset: offset,
                        bytes: ByteBuffer(repeating: UInt8(truncatingIfNeeded: index), count: 65536)))
                offset += 65536
            }
            await server.stop()
            let held = try store.usage(volume: Self.volume).bytes
            try await Task.sleep(for: .milliseconds(200))
            #expect(try store.usage(volume: Self.volume).bytes == held)
            await owner.close()
        }
    }
}
