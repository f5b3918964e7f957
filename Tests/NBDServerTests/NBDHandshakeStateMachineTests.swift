// Handshake transcripts through the pure state machine: every option path the brief names, byte layouts checked
// against the spec's numbers.

import NIOCore
import Testing
import VolumeCore
import VolumeTesting

@testable import NBDServer

/// Drives a state machine like a client would and records what it sends.
struct HandshakeDriver {
    var machine: NBDServerConnectionStateMachine
    var session: NBDSession?
    var closed = false
    var closeReason: String?
    var startedTLS = false

    init(exports: any NBDExportProvider, configuration: NBDServerConnectionStateMachine.Configuration = .init()) {
        machine = NBDServerConnectionStateMachine(configuration: configuration, exports: exports)
    }

    /// Sends the greeting; returns its bytes.
    mutating func greet() -> ByteBuffer { machine.connectionActive() }

    /// Feeds client bytes through the real decoder and returns the server's replies to them.
    mutating func send(_ bytes: ByteBuffer, decoder: inout NBDHandshakeDecoder) throws -> ByteBuffer {
        var inbound = NBDInboundBuffer()
        inbound.append(bytes)
        var out = ByteBuffer()
        while !closed, session == nil, let message = try inbound.nextFrame(&decoder) {
            switch machine.receivedHandshakeMessage(message) {
            case .none: break
            case .send(let reply): out.writeImmutableBuffer(reply)
            case .sendAndClose(let reply):
                out.writeImmutableBuffer(reply)
                closed = true
            case .sendAndEnterTransmission(let reply, let session):
                out.writeImmutableBuffer(reply)
                self.session = session
            case .sendAndStartTLS(let reply):
                out.writeImmutableBuffer(reply)
                startedTLS = true
            case .close(let reason):
                closed = true
                closeReason = reason
            }
        }
        return out
    }
}

let fixedNewstyleNoZeroes: UInt32 = 3

func testExports(size: UInt64 = 1 << 20, readOnly: Bool = false) -> (NBDStaticExportProvider, MemoryBlockDevice) {
    let device = MemoryBlockDevice(sizeBytes: size, readOnly: readOnly)
    let exports = NBDStaticExportProvider(
        [
            NBDExport(name: "disk", description: "a test disk", device: device),
            NBDExport(name: "other", device: MemoryBlockDevice(sizeBytes: 2 << 20)),
        ], defaultExportName: "disk")
    return (exports, device)
}

@Suite struct NBDHandshakeStateMachineTests {
    var driver: HandshakeDriver
    var decoder = NBDHandshakeDecoder()

    init() {
        driver = HandshakeDriver(exports: testExports().0)
    }

    mutating func replies(_ bytes: ByteBuffer...) throws -> [OptionReply] {
        var all = ByteBuffer()
        for bytes in bytes { all.writeImmutableBuffer(bytes) }
        var out = try driver.send(all, decoder: &decoder)
        let replies = try OptionReply.parseAll(&out)
        #expect(out.readableBytes == 0, "trailing bytes after option replies")
        return replies
    }

    @Test mutating func greetingIsFixedNewstyleWithNoZeroes() {
        let greeting = driver.greet()
        #expect(Array(greeting.readableBytesView) == Array("NBDMAGICIHAVEOPT".utf8) + [0x00, 0x03])
    }

    @Test mutating func exportNameEntersTransmissionWithoutZeroes() throws {
        _ = driver.greet()
        var out = try driver.send(ClientWire.clientFlags(fixedNewstyleNoZeroes), decoder: &decoder)
        #expect(out.readableBytes == 0)
        out = try driver.send(ClientWire.option(1, string: "disk"), decoder: &decoder)
        #expect(out.readableBytes == 10)
        #expect(out.readInteger(as: UInt64.self) == 1 << 20)
        let flags = out.readInteger(as: UInt16.self)!
        // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_CACHE, SEND_FAST_ZERO
        #expect(flags == 0b1101_0110_1101)
        #expect(driver.session?.structuredReplies == false)
        #expect(driver.machine.isInTransmission)
    }

    @Test mutating func exportNameSendsZeroesUnlessNegotiated() throws {
        _ = driver.greet()
        _ = try driver.send(ClientWire.clientFlags(1), decoder: &decoder)
        let out = try driver.send(ClientWire.option(1, string: ""), decoder: &decoder)  // default export
        #expect(out.readableBytes == 8 + 2 + 124)
        #expect(out.getBytes(at: 10, length: 124) == [UInt8](repeating: 0, count: 124))
        #expect(driver.session?.export.name == "disk")
    }

    @Test mutating func exportNameForUnknownExportDisconnects() throws {
        _ = driver.greet()
        _ = try driver.send(ClientWire.clientFlags(3), decoder: &decoder)
        let out = try driver.send(ClientWire.option(1, string: "nope"), decoder: &decoder)
        #expect(out.readableBytes == 0)
        #expect(driver.closed)
        #expect(driver.machine.isClosed)
    }

    @Test mutating func unknownClientFlagsDisconnect() throws {
        _ = driver.greet()
        _ = try driver.send(ClientWire.clientFlags(1 << 2 | 1), decoder: &decoder)
        #expect(driver.closed)
        #expect(driver.closeReason?.contains("client flags") == true)
    }

    @Test mutating func goRepliesWithRequestedInfoThenAck() throws {
        _ = driver.greet()
        let replies = try self.replies(
            ClientWire.clientFlags(3), ClientWire.option(7, ClientWire.infoData(name: "disk", items: [1, 2, 3])))
        #expect(replies.map(\.option) == [7, 7, 7, 7, 7])
        #expect(replies.map(\.type) == [3, 3, 3, 3, 1])
        #expect(replies.map(\.infoType) == [0, 1, 2, 3, nil])
        var export = replies[0].data
        #expect(export.readableBytes == 12)
        export.moveReaderIndex(forwardBy: 2)
        #expect(export.readInteger(as: UInt64.self) == 1 << 20)
        #expect(export.readInteger(as: UInt16.self) == 0b1101_0110_1101)
        #expect(replies[1].data.getString(at: 2, length: 4) == "disk")
        #expect(replies[2].data.getString(at: 2, length: 11) == "a test disk")
        var sizes = replies[3].data
        #expect(sizes.readableBytes == 14)
        sizes.moveReaderIndex(forwardBy: 2)
        #expect(sizes.readInteger(as: UInt32.self) == 512)
        #expect(sizes.readInteger(as: UInt32.self) == 4096)
        #expect(sizes.readInteger(as: UInt32.self) == Limits.requestBytesMax)
        #expect(driver.session?.enforceMinimumBlockSize == true)
        #expect(driver.machine.isInTransmission)
    }

    @Test mutating func infoThenGo() throws {
        _ = driver.greet()
        let info = try replies(ClientWire.clientFlags(3), ClientWire.option(6, ClientWire.infoData(name: "other")))
        #expect(info.map(\.type) == [3, 3, 1])  // EXPORT, BLOCK_SIZE (always), ACK
        #expect(info[0].data.getInteger(at: 2, as: UInt64.self) == 2 << 20)
        #expect(driver.session == nil)
        #expect(driver.machine.isNegotiating)
        let go = try replies(ClientWire.option(7, ClientWire.infoData(name: "other")))
        #expect(go.map(\.type) == [3, 3, 1])
        #expect(go[0].data == info[0].data)  // same export information, as the spec requires
        #expect(driver.session?.export.name == "other")
        #expect(driver.session?.enforceMinimumBlockSize == false)
    }

    @Test mutating func goForUnknownExportIsAnErrorNotADisconnect() throws {
        _ = driver.greet()
        let replies = try self.replies(
            ClientWire.clientFlags(3), ClientWire.option(7, ClientWire.infoData(name: "missing")),
            ClientWire.option(7, ClientWire.infoData(name: "disk")))
        #expect(replies.first?.type == 0x8000_0006)  // NBD_REP_ERR_UNKNOWN
        #expect(replies.first?.data.readableBytes ?? 0 > 0)  // with a message
        #expect(replies.last?.type == 1)
        #expect(driver.session?.export.name == "disk")
    }

    @Test mutating func malformedGoIsInvalid() throws {
        _ = driver.greet()
        var tooLongName = ByteBuffer()
        tooLongName.writeInteger(UInt32(100))
        tooLongName.writeString("disk")
        tooLongName.writeInteger(UInt16(0))
        var badCount = ClientWire.infoData(name: "disk", items: [1])
        badCount.writeInteger(UInt8(0))  // a stray byte after the items
        let replies = try self.replies(
            ClientWire.clientFlags(3), ClientWire.option(7, tooLongName), ClientWire.option(7, badCount),
            ClientWire.option(7, ByteBuffer(bytes: [0, 0])))
        #expect(replies.map(\.type) == [0x8000_0003, 0x8000_0003, 0x8000_0003])
        #expect(driver.machine.isNegotiating)
    }

    @Test mutating func listNamesEveryExport() throws {
        _ = driver.greet()
        let replies = try self.replies(ClientWire.clientFlags(3), ClientWire.option(3))
        #expect(replies.map(\.type) == [2, 2, 1])
        var first = replies[0].data
        let length = first.readInteger(as: UInt32.self)!
        #expect(first.readString(length: Int(length)) == "disk")
        #expect(first.readString(length: first.readableBytes) == "a test disk")
        #expect(replies[1].data.getString(at: 4, length: 5) == "other")
        let withData = try self.replies(ClientWire.option(3, string: "x"))
        #expect(withData.map(\.type) == [0x8000_0003])
    }

    @Test mutating func abortAcksAndCloses() throws {
        _ = driver.greet()
        let replies = try self.replies(ClientWire.clientFlags(3), ClientWire.option(2))
        #expect(replies == [OptionReply(option: 2, type: 1, data: ByteBuffer())])
        #expect(driver.closed)
        #expect(driver.machine.isClosed)
    }

    @Test mutating func unknownOptionsAreUnsupportedAndParsingContinues() throws {
        _ = driver.greet()
        let replies = try self.replies(
            ClientWire.clientFlags(3), ClientWire.option(4), ClientWire.option(11),
            ClientWire.option(0xdead, string: "junk"),
            ClientWire.option(5), ClientWire.option(8))
        #expect(replies.map(\.option) == [4, 11, 0xdead, 5, 8])
        #expect(replies.map(\.type) == [0x8000_0001, 0x8000_0001, 0x8000_0001, 0x8000_0001, 1])
    }

    @Test mutating func structuredRepliesAndBaseAllocation() throws {
        _ = driver.greet()
        let replies = try self.replies(
            ClientWire.clientFlags(3), ClientWire.option(8),
            ClientWire.option(
                10, ClientWire.metaContextData(name: "disk", queries: ["base:allocation", "qemu:dirty-bitmap:b"])),
            ClientWire.option(7, ClientWire.infoData(name: "disk")))
        #expect(replies.map(\.type) == [1, 4, 1, 3, 3, 1])
        var context = replies[1].data
        #expect(context.readInteger(as: UInt32.self) != 0)
        #expect(context.readString(length: context.readableBytes) == "base:allocation")
        let session = try #require(driver.session)
        #expect(session.structuredReplies)
        #expect(session.allocationContext)
        #expect(session.transmissionFlags & NBDTransmissionFlags.sendDF != 0)
    }

    @Test mutating func metaContextForAnotherExportDoesNotEnableBlockStatus() throws {
        _ = driver.greet()
        _ = try replies(
            ClientWire.clientFlags(3), ClientWire.option(8),
            ClientWire.option(10, ClientWire.metaContextData(name: "other", queries: ["base:allocation"])),
            ClientWire.option(7, ClientWire.infoData(name: "disk")))
        #expect(driver.session?.allocationContext == false)
    }

    @Test mutating func setMetaContextNeedsStructuredReplies() throws {
        _ = driver.greet()
        let replies = try self.replies(
            ClientWire.clientFlags(3),
            ClientWire.option(10, ClientWire.metaContextData(name: "disk", queries: ["base:allocation"])))
        #expect(replies.map(\.type) == [0x8000_0003])
    }

    @Test mutating func setMetaContextReplacesTheSelectionEvenWhenItFails() throws {
        _ = driver.greet()
        _ = try replies(
            ClientWire.clientFlags(3), ClientWire.option(8),
            ClientWire.option(10, ClientWire.metaContextData(name: "disk", queries: ["base:allocation"])),
            ClientWire.option(10, ByteBuffer(bytes: [0, 0, 0, 9])),  // malformed
            ClientWire.option(7, ClientWire.infoData(name: "disk")))
        #expect(driver.session?.allocationContext == false)
    }

    @Test mutating func listMetaContext() throws {
        _ = driver.greet()
        let all = try replies(
            ClientWire.clientFlags(3), ClientWire.option(8),
            ClientWire.option(9, ClientWire.metaContextData(name: "disk", queries: [])))
        #expect(all.map(\.type) == [1, 4, 1])
        #expect(all[1].data.getInteger(at: all[1].data.readerIndex, as: UInt32.self) == 0)
        #expect(all[1].data.getString(at: 4, length: 15) == "base:allocation")
        let wildcard = try replies(ClientWire.option(9, ClientWire.metaContextData(name: "disk", queries: ["base:"])))
        #expect(wildcard.map(\.type) == [4, 1])
        let foreign = try replies(
            ClientWire.option(
                9, ClientWire.metaContextData(name: "disk", queries: ["qemu:dirty-bitmap:x", "base:nope"])))
        #expect(foreign.map(\.type) == [1])
        let noColon = try replies(ClientWire.option(9, ClientWire.metaContextData(name: "disk", queries: ["junk"])))
        #expect(noColon.map(\.type) == [0x8000_0003])
        let unknownExport = try replies(ClientWire.option(9, ClientWire.metaContextData(name: "x", queries: [])))
        #expect(unknownExport.map(\.type) == [0x8000_0006])
        var truncated = ClientWire.metaContextData(name: "disk", queries: ["base:allocation"])
        truncated.moveWriterIndex(to: truncated.writerIndex - 1)
        #expect(try replies(ClientWire.option(9, truncated)).map(\.type) == [0x8000_0003])
        var hugeCount = ByteBuffer()
        hugeCount.writeInteger(UInt32(4))
        hugeCount.writeString("disk")
        hugeCount.writeInteger(UInt32.max)
        #expect(try replies(ClientWire.option(9, hugeCount)).map(\.type) == [0x8000_0003])
    }

    @Test mutating func startTLSWhenAvailableResetsNegotiatedState() throws {
        driver = HandshakeDriver(exports: testExports().0, configuration: .init(tlsAvailable: true))
        _ = driver.greet()
        let replies = try self.replies(
            ClientWire.clientFlags(3), ClientWire.option(8), ClientWire.option(5))
        #expect(replies.map(\.type) == [1, 1])
        #expect(driver.startedTLS)
        let again = try self.replies(ClientWire.option(5))
        #expect(again.map(\.type) == [0x8000_0003])
        _ = try self.replies(ClientWire.option(7, ClientWire.infoData(name: "disk")))
        #expect(driver.session?.structuredReplies == false)  // negotiated before TLS: forgotten
    }

    @Test mutating func oversizedOptions() throws {
        _ = driver.greet()
        var out = try driver.send(ClientWire.clientFlags(3), decoder: &decoder)
        out = try driver.send(ClientWire.option(7, ClientWire.pattern(0, count: 70_000)), decoder: &decoder)
        #expect(try OptionReply.parseAll(&out).map(\.type) == [0x8000_0009])  // NBD_REP_ERR_TOO_BIG
        out = try driver.send(ClientWire.option(77, ClientWire.pattern(0, count: 70_000)), decoder: &decoder)
        #expect(try OptionReply.parseAll(&out).map(\.type) == [0x8000_0001])
        out = try driver.send(ClientWire.option(1, ClientWire.pattern(0x41, count: 70_000)), decoder: &decoder)
        #expect(driver.closed)  // EXPORT_NAME cannot be refused politely
    }

    @Test mutating func tooManyOptionsDisconnect() throws {
        driver = HandshakeDriver(exports: testExports().0, configuration: .init(optionsPerConnectionMax: 5))
        _ = driver.greet()
        var all = ClientWire.clientFlags(3)
        for _ in 0..<10 { all.writeImmutableBuffer(ClientWire.option(3)) }
        var out = try driver.send(all, decoder: &decoder)
        #expect(try OptionReply.parseAll(&out).count == 5 * 3)
        #expect(driver.closed)
    }

    @Test mutating func readOnlyExportFlags() throws {
        let device = MemoryBlockDevice(sizeBytes: 1 << 20)
        driver = HandshakeDriver(
            exports: NBDStaticExportProvider([NBDExport(name: "snap", device: device, readOnly: true)]))
        _ = driver.greet()
        _ = try replies(ClientWire.clientFlags(3), ClientWire.option(7, ClientWire.infoData(name: "snap")))
        let flags = try #require(driver.session?.transmissionFlags)
        #expect(flags & NBDTransmissionFlags.readOnly != 0)
        #expect(flags & NBDTransmissionFlags.sendTrim == 0)
        #expect(flags & NBDTransmissionFlags.sendWriteZeroes == 0)
        #expect(flags & NBDTransmissionFlags.sendFastZero == 0)
    }

    @Test func multiConnOnlyWhenFlushCoversAllConnections() throws {
        final class LocalFlushDevice: BlockDevice, @unchecked Sendable {
            let inner = MemoryBlockDevice(sizeBytes: 1 << 20)
            var info: BlockDeviceInfo {
                var info = inner.info
                info.flushCoversAllConnections = false
                info.supportsTrim = false
                info.supportsWriteZeroes = false
                return info
            }
            func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
                try await inner.read(offset: offset, length: length)
            }
            func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {}
            func flush() async throws(VDError) {}
            func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError) {}
            func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {}
            func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] { [] }
        }
        var driver = HandshakeDriver(
            exports: NBDStaticExportProvider([NBDExport(name: "d", device: LocalFlushDevice())]))
        var decoder = NBDHandshakeDecoder()
        _ = driver.greet()
        var bytes = ClientWire.clientFlags(3)
        bytes.writeImmutableBuffer(ClientWire.option(1, string: "d"))
        _ = try driver.send(bytes, decoder: &decoder)
        let flags = try #require(driver.session?.transmissionFlags)
        #expect(flags & NBDTransmissionFlags.canMultiConn == 0)
        #expect(flags & (NBDTransmissionFlags.sendTrim | NBDTransmissionFlags.sendWriteZeroes) == 0)
    }
}

/// TLS required: every option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD until TLS is active, and
/// NBD_OPT_EXPORT_NAME (which cannot be refused with an error) disconnects.
@Suite struct NBDTLSRequiredTests {
    func machine() -> NBDServerConnectionStateMachine {
        NBDServerConnectionStateMachine(
            configuration: .init(tlsAvailable: true, tlsRequired: true),
            exports: NBDStaticExportProvider([NBDExport(name: "v", device: MemoryBlockDevice(sizeBytes: 1 << 20))]),
            allocator: ByteBufferAllocator())
    }

    func replyType(_ action: NBDServerConnectionStateMachine.HandshakeAction) -> UInt32? {
        guard case .send(let bytes) = action else { return nil }
        return bytes.getInteger(at: bytes.readerIndex + 12, as: UInt32.self)
    }

    @Test func optionsBeforeTLSAreRefusedWithTLSRequired() {
        var m = machine()
        _ = m.connectionActive()
        _ = m.receivedHandshakeMessage(.clientFlags(fixedNewstyleNoZeroes))
        for code in [NBDOption.go, NBDOption.info, NBDOption.list, NBDOption.structuredReply] {
            let action = m.receivedHandshakeMessage(.option(NBDClientOption(code: code, data: ByteBuffer())))
            #expect(replyType(action) == NBDOptionReply.errorTLSRequired, "option \(code)")
        }
        let export = m.receivedHandshakeMessage(.option(NBDClientOption(code: NBDOption.exportName, data: ByteBuffer(string: "v"))))
        guard case .close = export else {
            Issue.record("EXPORT_NAME before TLS did not disconnect: \(export)")
            return
        }
    }

    @Test func startTLSIsAcknowledgedAndUpgrades() {
        var m = machine()
        _ = m.connectionActive()
        _ = m.receivedHandshakeMessage(.clientFlags(fixedNewstyleNoZeroes))
        let action = m.receivedHandshakeMessage(.option(NBDClientOption(code: NBDOption.startTLS, data: ByteBuffer())))
        guard case .sendAndStartTLS = action else {
            Issue.record("STARTTLS was not acknowledged: \(action)")
            return
        }
        // After the upgrade, GO is served.
        var go = ByteBuffer()
        go.writeInteger(UInt32(1))
        go.writeString("v")
        go.writeInteger(UInt16(0))
        let served = m.receivedHandshakeMessage(.option(NBDClientOption(code: NBDOption.go, data: go)))
        guard case .sendAndEnterTransmission = served else {
            Issue.record("GO after TLS was not served: \(served)")
            return
        }
    }
}
