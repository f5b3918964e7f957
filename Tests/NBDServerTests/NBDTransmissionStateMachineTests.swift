// The transmission phase of the state machine: validation of every command against the spec's error rules, reply
// shapes, completions, in-flight bounds, NBD_CMD_DISC and shutdown draining, error mapping and block status.

import NIOCore
import Testing
import VolumeCore
import VolumeTesting

@testable import NBDServer

/// A state machine already in transmission (a class, so `#expect` can call its mutating helpers).
final class TransmissionDriver {
    var machine: NBDServerConnectionStateMachine
    let session: NBDSession

    /// - Parameters: structured/metaContext/blockSizes choose what the simulated client negotiated.
    init(
        structured: Bool = false, metaContext: Bool = false, blockSizes: Bool = false, readOnly: Bool = false,
        configuration: NBDServerConnectionStateMachine.Configuration = .init(), size: UInt64 = 1 << 20
    ) throws {
        let device = MemoryBlockDevice(sizeBytes: size)
        let exports = NBDStaticExportProvider([NBDExport(name: "disk", device: device, readOnly: readOnly)])
        var driver = HandshakeDriver(exports: exports, configuration: configuration)
        var decoder = NBDHandshakeDecoder()
        _ = driver.greet()
        var bytes = ClientWire.clientFlags(3)
        if structured { bytes.writeImmutableBuffer(ClientWire.option(8)) }
        if metaContext {
            bytes.writeImmutableBuffer(
                ClientWire.option(10, ClientWire.metaContextData(name: "disk", queries: ["base:allocation"])))
        }
        bytes.writeImmutableBuffer(
            ClientWire.option(7, ClientWire.infoData(name: "disk", items: blockSizes ? [3] : [])))
        _ = try driver.send(bytes, decoder: &decoder)
        session = try #require(driver.session)
        machine = driver.machine
    }

    func request(
        _ type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 1, offset: UInt64 = 0, length: UInt32 = 0,
        payload: ByteBuffer? = nil
    ) -> NBDServerConnectionStateMachine.RequestAction {
        let header = NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
        return machine.receivedRequestMessage(.request(header, payload: payload))
    }

    func write(
        cookie: UInt64 = 1, offset: UInt64, count: Int, flags: UInt16 = 0
    ) -> NBDServerConnectionStateMachine.RequestAction {
        request(
            1, flags: flags, cookie: cookie, offset: offset, length: UInt32(count),
            payload: ClientWire.pattern(1, count: count))
    }

    func complete(
        _ command: NBDDeviceCommand, result: Result<NBDDeviceOutput, VDError>
    ) -> NBDServerConnectionStateMachine.CompletionAction {
        machine.commandCompleted(command, result: result)
    }

    func beginShutdown() -> Bool { machine.beginShutdown() }

    func receive(_ message: NBDRequestMessage) -> NBDServerConnectionStateMachine.RequestAction {
        machine.receivedRequestMessage(message)
    }

    /// The errno of an immediate error reply (nil if the action is not one).
    static func error(_ action: NBDServerConnectionStateMachine.RequestAction) -> UInt32? {
        guard case .reply(let reply) = action else { return nil }
        switch reply {
        case .simple(_, let error) where error != 0: return error
        case .structuredError(_, let error, _): return error
        default: return nil
        }
    }
}

@Suite struct NBDTransmissionStateMachineTests {
    @Test func readIsPerformedAndAnsweredWithASimpleReply() throws {
        let driver = try TransmissionDriver()
        let action = driver.request(0, cookie: 77, offset: 4096, length: 512)
        let command = NBDDeviceCommand(cookie: 77, operation: .read(offset: 4096, length: 512))
        #expect(action == .perform(command))
        #expect(driver.machine.inFlightRequests == 1)
        #expect(driver.machine.inFlightBytes == 512)
        let data = ClientWire.pattern(0xcd, count: 512)
        let completion = driver.complete(command, result: .success(.data(data)))
        #expect(completion.reply == .readData(cookie: 77, offset: 4096, data: data, structured: false))
        #expect(!completion.closeConnection)
        #expect(driver.machine.inFlightRequests == 0)
        // The wire: magic, error 0, cookie, then the data.
        var wire = NBDReplyEncoder.encode(completion.reply!)
        #expect(wire.readInteger(as: UInt32.self) == 0x6744_6698)
        #expect(wire.readInteger(as: UInt32.self) == 0)
        #expect(wire.readInteger(as: UInt64.self) == 77)
        #expect(wire.readBytes(length: wire.readableBytes) == [UInt8](repeating: 0xcd, count: 512))
    }

    @Test func structuredReadIsOneDataChunkFlaggedDone() throws {
        let driver = try TransmissionDriver(structured: true)
        let command = NBDDeviceCommand(cookie: 5, operation: .read(offset: 512, length: 1024))
        #expect(
            driver.request(0, flags: NBDCommandFlags.doNotFragment, cookie: 5, offset: 512, length: 1024)
                == .perform(command))
        let data = ClientWire.pattern(7, count: 1024)
        let reply = try #require(driver.complete(command, result: .success(.data(data))).reply)
        var wire = NBDReplyEncoder.encode(reply)
        let parsed = try #require(try TransmissionReply.parse(&wire))
        guard case .chunk(5, 1, 1, var payload) = parsed else {
            Issue.record("expected an OFFSET_DATA chunk flagged done, got \(parsed)")
            return
        }
        #expect(payload.readInteger(as: UInt64.self) == 512)
        #expect(payload.readableBytes == 1024)
    }

    @Test func structuredReadSendsHolesAsOffsetHoleChunksInOrder() throws {
        let driver = try TransmissionDriver(structured: true)
        let command = NBDDeviceCommand(cookie: 9, operation: .read(offset: 8192, length: 16384))
        #expect(driver.request(0, cookie: 9, offset: 8192, length: 16384) == .perform(command))
        var data = ClientWire.pattern(0, count: 16384)
        data.setBytes([UInt8](repeating: 0xaa, count: 4096), at: 4096)
        data.setBytes([UInt8](repeating: 0xbb, count: 2048), at: 14336)
        let sparse = SparseData(data: data, holes: [0..<4096, 8192..<14336])
        let reply = try #require(driver.complete(command, result: .success(.sparseData(sparse))).reply)
        #expect(reply == .sparseRead(cookie: 9, offset: 8192, data: data, holes: [0..<4096, 8192..<14336]))
        var wire = NBDReplyEncoder.encode(reply)
        let chunks = try TransmissionReply.parseAll(&wire)
        #expect(wire.readableBytes == 0)
        // hole, data, hole, data(done): types 2, 1, 2, 1; only the last carries NBD_REPLY_FLAG_DONE.
        guard chunks.count == 4, case .chunk(9, 0, 2, var hole1) = chunks[0], case .chunk(9, 0, 1, var data1) = chunks[1],
            case .chunk(9, 0, 2, var hole2) = chunks[2], case .chunk(9, 1, 1, var data2) = chunks[3]
        else {
            Issue.record("unexpected chunks \(chunks)")
            return
        }
        #expect(hole1.readMultipleIntegers(as: (UInt64, UInt32).self)! == (8192, 4096))
        #expect(data1.readInteger(as: UInt64.self) == 12288)
        #expect(data1 == ClientWire.pattern(0xaa, count: 4096))
        #expect(hole2.readMultipleIntegers(as: (UInt64, UInt32).self)! == (16384, 6144))
        #expect(data2.readInteger(as: UInt64.self) == 22528)
        #expect(data2 == ClientWire.pattern(0xbb, count: 2048))
    }

    @Test func sparseReadOfOnlyAHoleIsOneHoleChunkAndSimpleRepliesSendTheZeroes() throws {
        let structured = try TransmissionDriver(structured: true)
        let command = NBDDeviceCommand(cookie: 3, operation: .read(offset: 0, length: 4096))
        _ = structured.request(0, cookie: 3, offset: 0, length: 4096)
        let zeroes = ClientWire.pattern(0, count: 4096)
        let sparse = SparseData(data: zeroes, holes: [0..<4096])
        var wire = NBDReplyEncoder.encode(
            try #require(structured.complete(command, result: .success(.sparseData(sparse))).reply))
        guard case .chunk(3, 1, 2, var hole) = try TransmissionReply.parse(&wire) else {
            Issue.record("expected one OFFSET_HOLE chunk flagged done")
            return
        }
        #expect(hole.readMultipleIntegers(as: (UInt64, UInt32).self)! == (0, 4096))
        #expect(wire.readableBytes == 0)

        let simple = try TransmissionDriver()
        _ = simple.request(0, cookie: 3, offset: 0, length: 4096)
        let reply = simple.complete(command, result: .success(.sparseData(sparse))).reply
        #expect(reply == .readData(cookie: 3, offset: 0, data: zeroes, structured: false))
    }

    @Test func outOfRangeErrorsFollowTheSpec() throws {
        let driver = try TransmissionDriver(structured: true, metaContext: true)
        let end: UInt64 = 1 << 20
        #expect(TransmissionDriver.error(driver.request(0, offset: end, length: 512)) == NBDErrno.invalid)
        #expect(TransmissionDriver.error(driver.write(offset: end - 512, count: 1024)) == NBDErrno.noSpace)
        #expect(TransmissionDriver.error(driver.request(6, offset: end, length: 512)) == NBDErrno.noSpace)
        #expect(TransmissionDriver.error(driver.request(4, offset: end - 512, length: 4096)) == NBDErrno.invalid)
        #expect(TransmissionDriver.error(driver.request(7, offset: end - 512, length: 4096)) == NBDErrno.invalid)
        #expect(TransmissionDriver.error(driver.request(5, offset: .max, length: 1)) == NBDErrno.invalid)
        #expect(driver.machine.inFlightRequests == 0)
        // The last byte is in range.
        if case .perform = driver.request(0, offset: end - 512, length: 512) {
        } else {
            Issue.record("last sector must be readable")
        }
    }

    @Test func readOnlyExportRefusesWritesWithEPERM() throws {
        let driver = try TransmissionDriver(readOnly: true)
        #expect(TransmissionDriver.error(driver.write(offset: 0, count: 512)) == NBDErrno.perm)
        #expect(TransmissionDriver.error(driver.request(4, offset: 0, length: 512)) == NBDErrno.perm)
        #expect(TransmissionDriver.error(driver.request(6, offset: 0, length: 512)) == NBDErrno.perm)
        if case .perform = driver.request(0, length: 512) {} else { Issue.record("reads must work") }
        if case .perform = driver.request(3) {} else { Issue.record("flush must work") }
    }

    @Test func malformedRequestsAreEINVAL() throws {
        let driver = try TransmissionDriver()
        #expect(TransmissionDriver.error(driver.request(0, length: 0)) == NBDErrno.invalid)  // zero length
        #expect(TransmissionDriver.error(driver.write(offset: 0, count: 0)) == NBDErrno.invalid)
        #expect(TransmissionDriver.error(driver.request(42, length: 512)) == NBDErrno.invalid)  // unknown type
        #expect(TransmissionDriver.error(driver.request(8, length: 512)) == NBDErrno.invalid)  // RESIZE: not ours
        #expect(TransmissionDriver.error(driver.request(0, flags: 1 << 5, length: 512)) == NBDErrno.invalid)
        #expect(
            TransmissionDriver.error(driver.request(0, flags: NBDCommandFlags.requestOne, length: 512))
                == NBDErrno.invalid)
        // DF needs structured replies.
        #expect(
            TransmissionDriver.error(driver.request(0, flags: NBDCommandFlags.doNotFragment, length: 512))
                == NBDErrno.invalid)
        #expect(
            TransmissionDriver.error(driver.write(offset: 0, count: 512, flags: NBDCommandFlags.noHole))
                == NBDErrno.invalid)
        #expect(TransmissionDriver.error(driver.request(3, offset: 512)) == NBDErrno.invalid)  // FLUSH with an offset
        #expect(TransmissionDriver.error(driver.request(3, length: 1)) == NBDErrno.invalid)
        // Without structured replies: no block status.
        #expect(TransmissionDriver.error(driver.request(7, length: 4096)) == NBDErrno.invalid)
        // READ beyond the maximum payload.
        #expect(TransmissionDriver.error(driver.request(0, length: Limits.requestBytesMax + 512)) == NBDErrno.invalid)
        // FUA is accepted everywhere (clients set it on reads too).
        if case .perform = driver.request(0, flags: NBDCommandFlags.fua, length: 512) {
        } else {
            Issue.record("FUA read")
        }
        #expect(driver.machine.inFlightRequests == 1)
    }

    @Test func errorsUseStructuredChunksOnceNegotiated() throws {
        let driver = try TransmissionDriver(structured: true)
        let action = driver.request(0, cookie: 9, length: 0)
        guard case .reply(.structuredError(9, NBDErrno.invalid, let message)) = action else {
            Issue.record("expected a structured error, got \(action)")
            return
        }
        #expect(!message.isEmpty)
        var wire = NBDReplyEncoder.encode(.structuredError(cookie: 9, error: 22, message: message))
        guard case .chunk(9, 1, 0x8001, var payload) = try #require(try TransmissionReply.parse(&wire)) else {
            Issue.record("expected an NBD_REPLY_TYPE_ERROR chunk")
            return
        }
        #expect(payload.readInteger(as: UInt32.self) == 22)
        let length = payload.readInteger(as: UInt16.self)!
        #expect(payload.readString(length: Int(length)) == message)
        #expect(payload.readableBytes == 0)
        // Oversized READ with structured replies: EOVERFLOW.
        #expect(TransmissionDriver.error(driver.request(0, length: Limits.requestBytesMax + 512)) == NBDErrno.overflow)
    }

    @Test func writeZeroesFlags() throws {
        let driver = try TransmissionDriver()
        #expect(
            driver.request(6, flags: NBDCommandFlags.noHole, cookie: 1, offset: 0, length: 4096)
                == .perform(
                    NBDDeviceCommand(
                        cookie: 1,
                        operation: .writeZeroes(offset: 0, length: 4096, fua: false, mayUnmap: false, fastZero: false)))
        )
        #expect(
            driver.request(
                6, flags: NBDCommandFlags.fastZero | NBDCommandFlags.fua, cookie: 2, offset: 8192, length: 8192)
                == .perform(
                    NBDDeviceCommand(
                        cookie: 2,
                        operation: .writeZeroes(offset: 8192, length: 8192, fua: true, mayUnmap: true, fastZero: true)))
        )
        #expect(
            TransmissionDriver.error(
                driver.request(6, flags: NBDCommandFlags.fastZero | NBDCommandFlags.noHole, length: 4096))
                == NBDErrno.notSupported)
        #expect(
            TransmissionDriver.error(driver.request(6, flags: NBDCommandFlags.fastZero, offset: 512, length: 4096))
                == NBDErrno.notSupported)
        // A write-zeroes larger than the maximum payload is fine: it has no payload.
        if case .perform = driver.request(6, cookie: 3, offset: 0, length: 1 << 20) {
        } else {
            Issue.record("large zeroing")
        }
    }

    @Test func alignmentIsEnforcedOnlyWhenTheClientAgreedToBlockSizes() throws {
        let agreed = try TransmissionDriver(blockSizes: true)
        #expect(TransmissionDriver.error(agreed.request(0, offset: 100, length: 512)) == NBDErrno.invalid)
        #expect(TransmissionDriver.error(agreed.request(0, offset: 0, length: 100)) == NBDErrno.invalid)
        let lenient = try TransmissionDriver(blockSizes: false)
        if case .perform = lenient.request(0, offset: 100, length: 100) {} else { Issue.record("unaligned read") }
    }

    @Test func oversizedWriteIsRefused() throws {
        let driver = try TransmissionDriver()
        let header = NBDRequestHeader(type: 1, cookie: 3, offset: 0, length: Limits.requestBytesMax + 1)
        #expect(driver.receive(.oversizedWrite(header)) == .reply(.simple(cookie: 3, error: NBDErrno.invalid)))
    }

    @Test func cacheAsksTheDeviceToPrefetch() throws {
        let driver = try TransmissionDriver()
        let command = NBDDeviceCommand(cookie: 4, operation: .cache(offset: 0, length: 65536))
        #expect(driver.request(5, cookie: 4, offset: 0, length: 65536) == .perform(command))
        #expect(driver.machine.inFlightRequests == 1)
    }

    @Test func blockStatusNeedsTheContextAndHonoursRequestOne() throws {
        let driver = try TransmissionDriver(structured: true, metaContext: true)
        let command = NBDDeviceCommand(cookie: 8, operation: .blockStatus(offset: 0, length: 16384, requestOne: true, allocation: true, dirtyBitmap: nil))
        #expect(driver.request(7, flags: NBDCommandFlags.requestOne, cookie: 8, length: 16384) == .perform(command))
        let extents = [
            BlockExtent(lengthBytes: 8192, isHole: false, isZero: false),
            BlockExtent(lengthBytes: 65536, isHole: true, isZero: true),
        ]
        let reply = driver.complete(command, result: .success(.extents(extents))).reply
        #expect(
            reply
                == .blockStatus(
                    cookie: 8,
                    contexts: [NBDStatusChunk(contextID: 1, descriptors: [NBDBlockDescriptor(length: 8192, flags: 0)])]))
        var wire = NBDReplyEncoder.encode(reply!)
        guard case .chunk(8, 1, 5, var payload) = try #require(try TransmissionReply.parse(&wire)) else {
            Issue.record("expected a BLOCK_STATUS chunk flagged done")
            return
        }
        #expect(payload.readInteger(as: UInt32.self) == 1)
        #expect(payload.readInteger(as: UInt32.self) == 8192)
        #expect(payload.readInteger(as: UInt32.self) == 0)
        #expect(payload.readableBytes == 0)

        let noContext = try TransmissionDriver(structured: true, metaContext: false)
        #expect(TransmissionDriver.error(noContext.request(7, length: 4096)) == NBDErrno.invalid)
    }

    @Test func blockDescriptorsMergeClampAndNeverComeBackEmpty() {
        typealias SM = NBDServerConnectionStateMachine
        let extents = [
            BlockExtent(lengthBytes: 4096, isHole: true, isZero: true),
            BlockExtent(lengthBytes: 4096, isHole: true, isZero: true),
            BlockExtent(lengthBytes: 0, isHole: false, isZero: false),
            BlockExtent(lengthBytes: 8192, isHole: false, isZero: false),
            BlockExtent(lengthBytes: 1 << 40, isHole: true, isZero: false),
        ]
        #expect(
            SM.blockDescriptors(extents, requestLength: 65536, requestOne: false) == [
                NBDBlockDescriptor(length: 8192, flags: 3), NBDBlockDescriptor(length: 8192, flags: 0),
                NBDBlockDescriptor(length: 65536 - 16384, flags: 1),
            ])
        #expect(
            SM.blockDescriptors(extents, requestLength: 6000, requestOne: false) == [
                NBDBlockDescriptor(length: 6000, flags: 3)
            ])
        #expect(
            SM.blockDescriptors([], requestLength: 512, requestOne: false) == [
                NBDBlockDescriptor(length: 512, flags: 0)
            ])
        let alternating = (0..<(NBDWire.blockStatusDescriptorsMax + 10)).map {
            BlockExtent(lengthBytes: 512, isHole: $0 % 2 == 0, isZero: false)
        }
        #expect(
            SM.blockDescriptors(alternating, requestLength: .max, requestOne: false).count
                == NBDWire.blockStatusDescriptorsMax)
    }

    @Test func deviceErrorsMapToNBDErrors() throws {
        typealias SM = NBDServerConnectionStateMachine
        let write = NBDDeviceOperation.write(offset: 0, data: ByteBuffer(), fua: false)
        let read = NBDDeviceOperation.read(offset: 0, length: 1)
        #expect(SM.nbdErrno(for: VDError(.readOnly, ""), operation: write) == 1)
        #expect(SM.nbdErrno(for: VDError(.io, ""), operation: read) == 5)
        #expect(SM.nbdErrno(for: VDError(.io, "", errno: 28), operation: write) == 28)
        #expect(SM.nbdErrno(for: VDError(.noSpace, ""), operation: write) == 28)
        #expect(SM.nbdErrno(for: VDError(.invalidArgument, ""), operation: read) == 22)
        #expect(SM.nbdErrno(for: .outOfRange(""), operation: read) == 22)
        #expect(SM.nbdErrno(for: .outOfRange(""), operation: write) == 28)
        #expect(SM.nbdErrno(for: .corrupt(""), operation: read) == 5)
        #expect(SM.nbdErrno(for: VDError(.backend, ""), operation: read) == 5)
        #expect(SM.nbdErrno(for: .shutdown(""), operation: read) == 108)
        #expect(SM.nbdErrno(for: VDError(.unsupported, ""), operation: read) == 22)
        #expect(
            SM.nbdErrno(
                for: VDError(.unsupported, ""),
                operation: .writeZeroes(offset: 0, length: 1, fua: false, mayUnmap: true, fastZero: true)) == 95)

        let driver = try TransmissionDriver()
        guard case .perform(let command) = driver.write(cookie: 6, offset: 0, count: 512) else {
            Issue.record("expected a WRITE to run")
            return
        }
        let completion = driver.complete(command, result: .failure(VDError(.noSpace, "full")))
        #expect(completion.reply == .simple(cookie: 6, error: 28))
    }

    @Test func shortReadFromTheDeviceIsAnIOErrorNotAShortReply() throws {
        let driver = try TransmissionDriver()
        guard case .perform(let command) = driver.request(0, cookie: 2, length: 4096) else {
            Issue.record("expected a READ to run")
            return
        }
        let reply = driver.complete(command, result: .success(.data(ClientWire.pattern(0, count: 100)))).reply
        #expect(reply == .simple(cookie: 2, error: NBDErrno.io))
    }

    @Test func inFlightBoundsPauseAndResumeReading() throws {
        let driver = try TransmissionDriver(configuration: .init(maxInFlightRequests: 2, maxInFlightBytes: 1 << 20))
        guard case .perform(let first) = driver.request(0, cookie: 1, length: 512),
            case .perform = driver.request(0, cookie: 2, length: 512)
        else {
            Issue.record("expected two READs to run")
            return
        }
        #expect(!driver.machine.acceptsMessages)
        #expect(driver.machine.holdsReads)
        let completion = driver.complete(first, result: .success(.data(ClientWire.pattern(0, count: 512))))
        #expect(completion.resumeReading)
        #expect(driver.machine.acceptsMessages)

        let bytes = try TransmissionDriver(configuration: .init(maxInFlightRequests: 100, maxInFlightBytes: 8192))
        guard case .perform(let big) = bytes.write(cookie: 1, offset: 0, count: 65536) else {
            Issue.record("a single request larger than the byte bound still runs")
            return
        }
        #expect(bytes.machine.holdsReads)
        #expect(bytes.complete(big, result: .success(.done)).resumeReading)
    }

    @Test func disconnectWaitsForRequestsInFlight() throws {
        let driver = try TransmissionDriver()
        guard case .perform(let write) = driver.write(cookie: 1, offset: 0, count: 512) else {
            Issue.record("expected a WRITE to run")
            return
        }
        #expect(driver.request(2) == .none)
        #expect(!driver.machine.acceptsMessages)
        #expect(driver.request(0, cookie: 3, length: 512) == .none)  // nothing after DISC is processed
        let completion = driver.complete(write, result: .success(.done))
        #expect(completion.reply == .simple(cookie: 1, error: 0))
        #expect(completion.closeConnection)
        #expect(driver.machine.isQuiesced)

        let idle = try TransmissionDriver()
        #expect(idle.request(2) == .close)
    }

    @Test func shutdownDrainsAndAnswersNewRequestsWithESHUTDOWN() throws {
        let driver = try TransmissionDriver()
        guard case .perform(let read) = driver.request(0, cookie: 1, length: 512) else {
            Issue.record("expected a READ to run")
            return
        }
        #expect(!driver.beginShutdown())
        #expect(TransmissionDriver.error(driver.request(0, cookie: 2, length: 512)) == NBDErrno.shutdown)
        let completion = driver.complete(read, result: .success(.data(ClientWire.pattern(0, count: 512))))
        #expect(completion.reply != nil)
        #expect(completion.closeConnection)

        let idle = try TransmissionDriver()
        #expect(idle.beginShutdown())
        #expect(idle.machine.isClosed)
    }

    @Test func completionsAfterTheClientVanishedAreDropped() throws {
        let driver = try TransmissionDriver()
        guard case .perform(let a) = driver.write(cookie: 1, offset: 0, count: 512),
            case .perform(let b) = driver.request(3, cookie: 2)
        else {
            Issue.record("expected two commands to run")
            return
        }
        driver.machine.connectionClosed()
        #expect(!driver.machine.isQuiesced)
        #expect(driver.complete(a, result: .success(.done)).reply == nil)
        #expect(!driver.machine.isQuiesced)
        #expect(driver.complete(b, result: .failure(.shutdown("gone"))).reply == nil)
        #expect(driver.machine.isQuiesced)
        #expect(driver.machine.inFlightBytes == 0)
    }

    @Test func errorMessagesAreCutToTheSpecsStringLimit() {
        let long = String(repeating: "é", count: 3000)  // 6000 bytes, two per character
        let cut = NBDReplyEncoder.truncatedUTF8(long)
        #expect(cut.count == 4096)
        #expect(String(decoding: cut, as: UTF8.self) == String(repeating: "é", count: 2048))
        let odd = "a" + long
        let oddCut = NBDReplyEncoder.truncatedUTF8(odd)
        #expect(oddCut.count == 4095)  // never splits a character
    }
}
