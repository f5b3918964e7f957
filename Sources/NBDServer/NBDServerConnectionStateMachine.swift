// NBDServerConnectionStateMachine
// The NBD protocol of one connection as a pure value: it consumes decoded client messages and device completions
// and returns actions (send these bytes, run this device command, close). It owns no channel, no task and no clock,
// so every transcript of the protocol can be replayed in a test without sockets. The channel handler performs the
// actions.
//
// Faults it must survive: options and requests in any order and with any field values (unknown codes, flags,
// lengths, out-of-range offsets, requests after NBD_CMD_DISC, completions arriving after the connection closed).
// Every violation either gets the error reply the spec names or, where the spec requires or allows it, a close.

package import NIOCore
package import VolumeCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// A device operation to run for one request.
package enum NBDDeviceOperation: Hashable, Sendable {
    case read(offset: UInt64, length: UInt32)
    case write(offset: UInt64, data: ByteBuffer, fua: Bool)
    case flush
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool, fastZero: Bool)
    /// NBD_CMD_BLOCK_STATUS for the contexts the session selected: `base:allocation` when `allocation`, the dirty
    /// bitmap `dirtyBitmap` when set.
    case blockStatus(offset: UInt64, length: UInt32, requestOne: Bool, allocation: Bool, dirtyBitmap: String?)
    /// NBD_CMD_CACHE: bring the range into the device's cache (`BlockDevice.prefetch`).
    case cache(offset: UInt64, length: UInt32)
}

/// A request accepted for execution: the cookie to answer with and the operation.
package struct NBDDeviceCommand: Hashable, Sendable {
    package var cookie: UInt64
    package var operation: NBDDeviceOperation
    package init(cookie: UInt64, operation: NBDDeviceOperation) {
        self.cookie = cookie
        self.operation = operation
    }

    /// Bytes of the device the request touches (0 for FLUSH): a measure of its cost.
    package var requestBytes: UInt32 {
        switch operation {
        case .read(_, let length), .trim(_, let length, _), .writeZeroes(_, let length, _, _, _),
            .blockStatus(_, let length, _, _, _), .cache(_, let length):
            return length
        case .write(_, let data, _): return UInt32(data.readableBytes)
        case .flush: return 0
        }
    }

    /// Bytes of memory the request holds while in flight (WRITE payload or READ result).
    package var inFlightBytes: Int {
        switch operation {
        case .read(_, let length): return Int(length)
        case .write(_, let data, _): return data.readableBytes
        case .flush, .trim, .writeZeroes, .blockStatus, .cache: return 0
        }
    }
}

/// What a device operation produced.
package enum NBDDeviceOutput: Hashable, Sendable {
    case done
    case data(ByteBuffer)
    /// READ data with the holes the device found in it.
    case sparseData(SparseData)
    case extents([BlockExtent])
    /// BLOCK_STATUS with the contexts selected: allocation extents, dirty extents (nil: not selected).
    case status(allocation: [BlockExtent]?, dirty: [DirtyExtent]?)
}

/// What one transmission-phase connection was granted when it entered transmission.
package struct NBDSession: Sendable {
    package var export: NBDExport
    package var sizeBytes: UInt64
    package var transmissionFlags: UInt16
    package var structuredReplies: Bool
    /// `base:allocation` was selected for this export: NBD_CMD_BLOCK_STATUS is allowed.
    package var allocationContext: Bool
    /// The dirty bitmap selected as `qemu:dirty-bitmap:NAME` for this export (NBD_CMD_BLOCK_STATUS is allowed).
    package var dirtyBitmap: String? = nil
    /// The client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO and so agreed to keep requests aligned to
    /// `minimumBlockSizeBytes`; we hold it to that (the spec says SHOULD error unaligned requests).
    package var enforceMinimumBlockSize: Bool
    package var minimumBlockSizeBytes: UInt32
    package var preferredBlockSizeBytes: UInt32
    package var maximumPayloadBytes: UInt32

    package var isReadOnly: Bool { transmissionFlags & NBDTransmissionFlags.readOnly != 0 }
}

package struct NBDServerConnectionStateMachine {
    package struct Configuration: Sendable {
        /// Largest READ / WRITE payload offered to clients (further capped by each device).
        package var maximumPayloadBytes: UInt32
        package var maxInFlightRequests: Int
        /// Payload bytes (WRITE data held, READ data expected) in flight before we stop reading requests.
        package var maxInFlightBytes: Int
        /// Options per connection before we call it a denial of service and disconnect.
        package var optionsPerConnectionMax: Int
        /// Whether NBD_OPT_STARTTLS can be accepted (the server has a TLS context for this listener).
        package var tlsAvailable: Bool
        /// Whether TLS must be negotiated before anything else: until it is, every option but STARTTLS and ABORT
        /// is answered NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which cannot be answered, disconnects).
        package var tlsRequired: Bool

        package init(
            maximumPayloadBytes: UInt32 = Limits.requestBytesMax, maxInFlightRequests: Int = 64,
            maxInFlightBytes: Int = 64 << 20, optionsPerConnectionMax: Int = 1024, tlsAvailable: Bool = false,
            tlsRequired: Bool = false
        ) {
            self.maximumPayloadBytes = maximumPayloadBytes
            self.maxInFlightRequests = maxInFlightRequests
            self.maxInFlightBytes = maxInFlightBytes
            self.optionsPerConnectionMax = optionsPerConnectionMax
            self.tlsAvailable = tlsAvailable
            self.tlsRequired = tlsRequired && tlsAvailable
        }
    }

    /// What the handler does after a handshake event.
    package enum HandshakeAction {
        case none
        case send(ByteBuffer)
        /// Send the bytes, then close (NBD_OPT_ABORT).
        case sendAndClose(ByteBuffer)
        /// Send the bytes, then decode requests: transmission has started.
        case sendAndEnterTransmission(ByteBuffer, NBDSession)
        /// Send the bytes (the ACK), then upgrade the connection to TLS before reading anything else.
        case sendAndStartTLS(ByteBuffer)
        /// Hard disconnect: the client broke the protocol or asked for something that cannot be refused politely.
        case close(reason: String)
    }

    /// What the handler does with a request.
    package enum RequestAction: Hashable {
        /// Nothing (requests after NBD_CMD_DISC, or a DISC that waits for in-flight requests).
        case none
        /// Run the command on the device and report completion with `commandCompleted`.
        case perform(NBDDeviceCommand)
        /// Send this reply now.
        case reply(NBDReply)
        /// Close now (NBD_CMD_DISC with nothing in flight, or a shutdown that has drained).
        case close
    }

    /// What the handler does when a device command completed.
    package struct CompletionAction: Hashable {
        /// The reply to send, or nil if the connection is gone (the reply is dropped).
        package var reply: NBDReply?
        /// Close after sending: the last in-flight request of a disconnect or shutdown finished.
        package var closeConnection: Bool
        /// Reading had been paused by the in-flight bounds and may resume.
        package var resumeReading: Bool
    }

    private struct Negotiation {
        var fixedNewstyle: Bool
        var noZeroes: Bool
        var structuredReplies = false
        /// The export name (as the client spelled it) the last NBD_OPT_SET_META_CONTEXT selected
        /// `base:allocation` for.
        var allocationContextExport: String?
        /// The export and the dirty bitmap the last NBD_OPT_SET_META_CONTEXT selected (one bitmap at a time).
        var dirtyBitmapContext: (export: String, bitmap: String)?
        var tlsActive = false
    }

    private enum Ending: Hashable {
        /// The client sent NBD_CMD_DISC: finish in-flight requests, ignore anything else, close.
        case clientDisconnect
        /// The server is shutting down: finish in-flight requests, answer new ones with NBD_ESHUTDOWN, close.
        case serverShutdown
    }

    private enum State {
        case initial
        case awaitingClientFlags
        case negotiating(Negotiation)
        case transmission(NBDSession, ending: Ending?)
        case closed
    }

    package let configuration: Configuration
    private let exports: any NBDExportProvider
    private let allocator: ByteBufferAllocator
    private var state = State.initial
    private var optionCount = 0
    package private(set) var inFlightRequests = 0
    package private(set) var inFlightBytes = 0

    package init(
        configuration: Configuration, exports: any NBDExportProvider,
        allocator: ByteBufferAllocator = ByteBufferAllocator()
    ) {
        self.configuration = configuration
        self.exports = exports
        self.allocator = allocator
    }

    // MARK: - Queries

    /// In the handshake (greeting sent, transmission not started).
    package var isNegotiating: Bool {
        switch state {
        case .awaitingClientFlags, .negotiating: return true
        case .initial, .transmission, .closed: return false
        }
    }

    package var isInTransmission: Bool {
        if case .transmission = state { return true }
        return false
    }

    package var isClosed: Bool {
        if case .closed = state { return true }
        return false
    }

    /// Closed and no device command still running: nothing of this connection touches the device any more.
    package var isQuiesced: Bool { isClosed && inFlightRequests == 0 }

    /// Whether the handler should decode and hand over the next message. False while the in-flight bounds are
    /// reached (the handler then also stops reading from the socket), after NBD_CMD_DISC, and once closed.
    package var acceptsMessages: Bool {
        switch state {
        case .initial, .closed:
            return false
        case .awaitingClientFlags, .negotiating:
            return true
        case .transmission(_, let ending):
            if ending == .clientDisconnect { return false }
            return !isAtInFlightBound
        }
    }

    /// Whether the handler should stop reading from the socket: the in-flight bounds are reached, or the client sent
    /// NBD_CMD_DISC and nothing more may come.
    package var holdsReads: Bool {
        guard case .transmission(_, let ending) = state else { return false }
        return ending == .clientDisconnect || isAtInFlightBound
    }

    private var isAtInFlightBound: Bool {
        inFlightRequests >= configuration.maxInFlightRequests || inFlightBytes >= configuration.maxInFlightBytes
    }

    // MARK: - Handshake

    /// The connection is up: the greeting to send.
    package mutating func connectionActive() -> ByteBuffer {
        precondition(isInitial, "connectionActive called twice")
        state = .awaitingClientFlags
        return NBDReplyEncoder.greeting(
            handshakeFlags: NBDHandshakeFlags.fixedNewstyle | NBDHandshakeFlags.noZeroes, allocator: allocator)
    }

    private var isInitial: Bool {
        if case .initial = state { return true }
        return false
    }

    package mutating func receivedHandshakeMessage(_ message: NBDHandshakeMessage) -> HandshakeAction {
        switch message {
        case .clientFlags(let flags):
            return receivedClientFlags(flags)
        case .option(let option):
            return receivedOption(option)
        case .oversizedOption(let code, let length):
            return receivedOversizedOption(code: code, length: length)
        }
    }

    private mutating func receivedClientFlags(_ flags: UInt32) -> HandshakeAction {
        guard case .awaitingClientFlags = state else { return closeHandshake("client flags out of sequence") }
        guard flags & ~NBDHandshakeFlags.clientKnown == 0 else {
            return closeHandshake("unknown client flags 0x\(String(flags, radix: 16))")
        }
        // Clients without NBD_FLAG_C_FIXED_NEWSTYLE still get fixed-newstyle replies (the spec allows it); they
        // can only ever be offered NOTLS, which is all we have.
        state = .negotiating(
            Negotiation(
                fixedNewstyle: flags & NBDHandshakeFlags.clientFixedNewstyle != 0,
                noZeroes: flags & NBDHandshakeFlags.clientNoZeroes != 0))
        return .none
    }

    private mutating func receivedOversizedOption(code: UInt32, length: UInt32) -> HandshakeAction {
        guard case .negotiating(var negotiation) = state else { return closeHandshake("option before client flags") }
        if let action = countOption() { return action }
        switch code {
        case NBDOption.exportName:
            return closeHandshake("NBD_OPT_EXPORT_NAME with a \(length)-byte name")
        case NBDOption.setMetaContext:
            negotiation.allocationContextExport = nil
            state = .negotiating(negotiation)
        default:
            break
        }
        var reply = allocator.buffer(capacity: 64)
        let type = Self.isKnownOption(code) ? NBDOptionReply.errorTooBig : NBDOptionReply.errorUnsupported
        NBDReplyEncoder.appendOptionError(
            to: &reply, option: code, type: type, message: "option data of \(length) bytes is too large")
        return .send(reply)
    }

    private static func isKnownOption(_ code: UInt32) -> Bool {
        switch code {
        case NBDOption.exportName, NBDOption.abort, NBDOption.list, NBDOption.startTLS, NBDOption.info, NBDOption.go,
            NBDOption.structuredReply, NBDOption.listMetaContext, NBDOption.setMetaContext:
            return true
        default:
            return false
        }
    }

    private mutating func countOption() -> HandshakeAction? {
        optionCount += 1
        if optionCount > configuration.optionsPerConnectionMax {
            return closeHandshake("more than \(configuration.optionsPerConnectionMax) options")
        }
        return nil
    }

    private mutating func closeHandshake(_ reason: String) -> HandshakeAction {
        state = .closed
        return .close(reason: reason)
    }

    private mutating func receivedOption(_ option: NBDClientOption) -> HandshakeAction {
        guard case .negotiating(var negotiation) = state else { return closeHandshake("option before client flags") }
        if let action = countOption() { return action }
        var data = option.data
        var reply = allocator.buffer(capacity: 128)
        let code = option.code

        func error(_ type: UInt32, _ message: String) -> HandshakeAction {
            NBDReplyEncoder.appendOptionError(to: &reply, option: code, type: type, message: message)
            return .send(reply)
        }

        // Without TLS where it is required, only STARTTLS and ABORT are served.
        if configuration.tlsRequired && !negotiation.tlsActive && code != NBDOption.startTLS && code != NBDOption.abort {
            if code == NBDOption.exportName { return closeHandshake("NBD_OPT_EXPORT_NAME before the required TLS") }
            return error(NBDOptionReply.errorTLSRequired, "this server requires TLS (NBD_OPT_STARTTLS) first")
        }

        switch code {
        case NBDOption.exportName:
            guard data.readableBytes <= NBDWire.stringBytesMax, let name = data.readString(length: data.readableBytes)
            else { return closeHandshake("NBD_OPT_EXPORT_NAME with an invalid name") }
            guard let export = exports.export(named: name) else {
                // This option cannot be refused with an error: the spec requires terminating the session.
                return closeHandshake("NBD_OPT_EXPORT_NAME for unknown export '\(name)'")
            }
            let session = makeSession(
                export: export, negotiation: negotiation, requestedName: name, agreedToBlockSizes: false)
            reply.writeMultipleIntegers(session.sizeBytes, session.transmissionFlags)
            if !negotiation.noZeroes { reply.writeRepeatingByte(0, count: 124) }
            state = .transmission(session, ending: nil)
            return .sendAndEnterTransmission(reply, session)

        case NBDOption.abort:
            // Any data is ignored, as the spec asks.
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.ack)
            state = .closed
            return .sendAndClose(reply)

        case NBDOption.list:
            guard data.readableBytes == 0 else {
                return error(NBDOptionReply.errorInvalid, "NBD_OPT_LIST takes no data")
            }
            for listing in exports.exportList() {
                let name = NBDReplyEncoder.truncatedUTF8(listing.name)
                guard name.count == listing.name.utf8.count else { continue }  // unreachable through the protocol
                let description = NBDReplyEncoder.truncatedUTF8(listing.description)
                NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.server) {
                    $0.writeInteger(UInt32(name.count))
                    $0.writeBytes(name)
                    $0.writeBytes(description)
                }
            }
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.ack)
            return .send(reply)

        case NBDOption.startTLS:
            guard configuration.tlsAvailable, negotiation.fixedNewstyle else {
                return error(NBDOptionReply.errorUnsupported, "TLS is not supported by this server")
            }
            guard !negotiation.tlsActive else { return error(NBDOptionReply.errorInvalid, "TLS is already active") }
            guard data.readableBytes == 0 else {
                return error(NBDOptionReply.errorInvalid, "NBD_OPT_STARTTLS takes no data")
            }
            // After the upgrade nothing negotiated in plain text may be kept.
            negotiation.structuredReplies = false
            negotiation.allocationContextExport = nil
            negotiation.dirtyBitmapContext = nil
            negotiation.tlsActive = true
            state = .negotiating(negotiation)
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.ack)
            return .sendAndStartTLS(reply)

        case NBDOption.info, NBDOption.go:
            guard let request = Self.parseInfoRequest(&data) else {
                return error(
                    NBDOptionReply.errorInvalid,
                    "malformed \(code == NBDOption.go ? "NBD_OPT_GO" : "NBD_OPT_INFO") data")
            }
            guard let export = exports.export(named: request.name) else {
                return error(NBDOptionReply.errorUnknown, "export '\(request.name)' not found")
            }
            let session = makeSession(
                export: export, negotiation: negotiation, requestedName: request.name,
                agreedToBlockSizes: request.items.contains(NBDInfo.blockSize))
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.info) {
                $0.writeMultipleIntegers(NBDInfo.export, session.sizeBytes, session.transmissionFlags)
            }
            if request.items.contains(NBDInfo.name) {
                NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.info) {
                    $0.writeInteger(NBDInfo.name)
                    $0.writeBytes(NBDReplyEncoder.truncatedUTF8(export.name))
                }
            }
            if request.items.contains(NBDInfo.description), !export.description.isEmpty {
                NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.info) {
                    $0.writeInteger(NBDInfo.description)
                    $0.writeBytes(NBDReplyEncoder.truncatedUTF8(export.description))
                }
            }
            // Sent whether asked or not: clients that did not ask may ignore it, and it tells them our limits.
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.info) {
                $0.writeMultipleIntegers(
                    NBDInfo.blockSize, session.minimumBlockSizeBytes, session.preferredBlockSizeBytes,
                    session.maximumPayloadBytes)
            }
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.ack)
            if code == NBDOption.go {
                state = .transmission(session, ending: nil)
                return .sendAndEnterTransmission(reply, session)
            }
            return .send(reply)

        case NBDOption.structuredReply:
            guard data.readableBytes == 0 else {
                return error(NBDOptionReply.errorInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            negotiation.structuredReplies = true
            state = .negotiating(negotiation)
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.ack)
            return .send(reply)

        case NBDOption.listMetaContext, NBDOption.setMetaContext:
            let isSet = code == NBDOption.setMetaContext
            if isSet {
                // Replaces the previous selection even when it fails.
                negotiation.allocationContextExport = nil
                negotiation.dirtyBitmapContext = nil
                state = .negotiating(negotiation)
                guard negotiation.structuredReplies else {
                    return error(
                        NBDOptionReply.errorInvalid, "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first")
                }
            }
            guard let request = Self.parseMetaContextRequest(&data) else {
                return error(NBDOptionReply.errorInvalid, "malformed meta context request")
            }
            guard let export = exports.export(named: request.exportName) else {
                return error(NBDOptionReply.errorUnknown, "export '\(request.exportName)' not found")
            }
            let bitmaps = export.device.dirtyBitmaps
            var allocation = false
            var chosenBitmaps: [String] = []
            if request.queries.isEmpty {
                // LIST with no queries lists everything; SET with no queries selects nothing.
                allocation = !isSet
                if !isSet { chosenBitmaps = bitmaps }
            }
            for query in request.queries {
                guard let colon = query.firstIndex(of: ":") else {
                    return error(NBDOptionReply.errorInvalid, "meta context query '\(query)' has no namespace")
                }
                let leaf = query[query.index(after: colon)...]
                switch query[..<colon] {
                case "base":
                    if leaf == "allocation" || (leaf.isEmpty && !isSet) { allocation = true }
                case "qemu":
                    let prefix = "dirty-bitmap:"
                    if !isSet && (leaf.isEmpty || leaf == prefix) {
                        chosenBitmaps += bitmaps
                    } else if leaf.hasPrefix(prefix), bitmaps.contains(String(leaf.dropFirst(prefix.count))) {
                        chosenBitmaps.append(String(leaf.dropFirst(prefix.count)))
                    }
                default:
                    continue  // unknown namespaces are ignored
                }
            }
            // One dirty bitmap per connection (what qemu selects); LIST lists them all.
            if isSet { chosenBitmaps = Array(chosenBitmaps.prefix(1)) }
            for bitmap in chosenBitmaps {
                NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.metaContext) {
                    $0.writeInteger(isSet ? NBDWire.dirtyBitmapContextID : 0)
                    $0.writeString(NBDWire.dirtyBitmapContextPrefix + bitmap)
                }
                if isSet {
                    negotiation.dirtyBitmapContext = (request.exportName, bitmap)
                    state = .negotiating(negotiation)
                }
            }
            if allocation {
                NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.metaContext) {
                    $0.writeInteger(isSet ? NBDWire.allocationContextID : 0)
                    $0.writeString(NBDWire.allocationContextName)
                }
                if isSet {
                    negotiation.allocationContextExport = request.exportName
                    state = .negotiating(negotiation)
                }
            }
            NBDReplyEncoder.appendOptionReply(to: &reply, option: code, type: NBDOptionReply.ack)
            return .send(reply)

        default:
            return error(NBDOptionReply.errorUnsupported, "option \(code) is not supported")
        }
    }

    private struct InfoRequest {
        var name: String
        var items: [UInt16]
    }

    /// Parses NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count × u16. Nil if malformed.
    private static func parseInfoRequest(_ data: inout ByteBuffer) -> InfoRequest? {
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= NBDWire.stringBytesMax,
            Int(nameLength) + 2 <= data.readableBytes, let name = data.readString(length: Int(nameLength)),
            let count = data.readInteger(as: UInt16.self), data.readableBytes == 2 * Int(count)
        else { return nil }
        var items: [UInt16] = []
        items.reserveCapacity(Int(count))
        for _ in 0..<count { items.append(data.readInteger(as: UInt16.self)!) }
        return InfoRequest(name: name, items: items)
    }

    private struct MetaContextRequest {
        var exportName: String
        var queries: [String]
    }

    /// Parses meta context option data: u32 name length, name, u32 query count, queries (u32 length, string).
    private static func parseMetaContextRequest(_ data: inout ByteBuffer) -> MetaContextRequest? {
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= NBDWire.stringBytesMax,
            Int(nameLength) <= data.readableBytes, let name = data.readString(length: Int(nameLength)),
            let count = data.readInteger(as: UInt32.self)
        else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            // Each query needs at least its 4 length bytes: a huge count with little data fails fast here.
            guard let length = data.readInteger(as: UInt32.self), length <= NBDWire.stringBytesMax,
                Int(length) <= data.readableBytes, let query = data.readString(length: Int(length))
            else { return nil }
            queries.append(query)
        }
        guard data.readableBytes == 0 else { return nil }
        return MetaContextRequest(exportName: name, queries: queries)
    }

    private func makeSession(
        export: NBDExport, negotiation: Negotiation, requestedName: String, agreedToBlockSizes: Bool
    ) -> NBDSession {
        let info = export.device.info
        let readOnly = export.readOnly || info.isReadOnly
        var flags =
            NBDTransmissionFlags.hasFlags | NBDTransmissionFlags.sendFlush | NBDTransmissionFlags.sendFUA
            | NBDTransmissionFlags.sendCache
        if readOnly { flags |= NBDTransmissionFlags.readOnly }
        if info.supportsTrim && !readOnly { flags |= NBDTransmissionFlags.sendTrim }
        if info.supportsWriteZeroes && !readOnly {
            flags |= NBDTransmissionFlags.sendWriteZeroes | NBDTransmissionFlags.sendFastZero
        }
        // Only when the device says a flush on one connection covers writes of all of them.
        if info.flushCoversAllConnections { flags |= NBDTransmissionFlags.canMultiConn }
        // Every READ is answered with a single data chunk, so "don't fragment" costs nothing.
        if negotiation.structuredReplies { flags |= NBDTransmissionFlags.sendDF }

        let minimum = Self.isValidMinimumBlockSize(info.minimumBlockSizeBytes) ? info.minimumBlockSizeBytes : 1
        var preferred = info.preferredBlockSizeBytes
        if preferred < max(minimum, 512) || preferred & (preferred - 1) != 0 { preferred = max(minimum, 4096) }
        let maximumPayload = max(min(info.maximumPayloadBytes, configuration.maximumPayloadBytes), preferred)
        return NBDSession(
            export: export, sizeBytes: info.sizeBytes, transmissionFlags: flags,
            structuredReplies: negotiation.structuredReplies,
            allocationContext: negotiation.structuredReplies && negotiation.allocationContextExport == requestedName,
            dirtyBitmap: negotiation.structuredReplies && negotiation.dirtyBitmapContext?.export == requestedName
                ? negotiation.dirtyBitmapContext?.bitmap : nil,
            enforceMinimumBlockSize: agreedToBlockSizes, minimumBlockSizeBytes: minimum,
            preferredBlockSizeBytes: preferred, maximumPayloadBytes: maximumPayload)
    }

    private static func isValidMinimumBlockSize(_ value: UInt32) -> Bool {
        value > 0 && value <= 65536 && value & (value - 1) == 0
    }

    // MARK: - Transmission

    /// A request decoded in the transmission phase.
    package mutating func receivedRequestMessage(_ message: NBDRequestMessage) -> RequestAction {
        switch message {
        case .request(let header, let payload):
            return receivedRequest(header, payload: payload)
        case .oversizedWrite(let header):
            guard case .transmission(let session, let ending) = state, ending != .clientDisconnect else {
                return .none
            }
            if ending == .serverShutdown { return .reply(errorReply(session, header.cookie, NBDErrno.shutdown, "")) }
            return .reply(
                errorReply(
                    session, header.cookie, NBDErrno.invalid,
                    "WRITE of \(header.length) bytes exceeds the maximum payload of "
                        + "\(session.maximumPayloadBytes) bytes"))
        }
    }

    private mutating func receivedRequest(_ header: NBDRequestHeader, payload: ByteBuffer?) -> RequestAction {
        guard case .transmission(let session, let ending) = state else { return .none }
        if ending == .clientDisconnect { return .none }  // the client must not send anything after NBD_CMD_DISC
        let cookie = header.cookie

        if header.type == NBDCommand.disconnect {
            state = .transmission(session, ending: .clientDisconnect)
            if inFlightRequests == 0 {
                state = .closed
                return .close
            }
            return .none
        }
        if ending == .serverShutdown {
            return .reply(errorReply(session, cookie, NBDErrno.shutdown, "the server is shutting down"))
        }

        switch validate(header, payload: payload, session: session) {
        case .failure(let failure):
            return .reply(errorReply(session, cookie, failure.errno, failure.message))
        case .success(nil):
            return .reply(.simple(cookie: cookie, error: 0))
        case .success(let operation?):
            let command = NBDDeviceCommand(cookie: cookie, operation: operation)
            inFlightRequests += 1
            inFlightBytes += command.inFlightBytes
            return .perform(command)
        }
    }

    private struct RequestFailure: Error {
        var errno: UInt32
        var message: String
        init(_ errno: UInt32, _ message: String) {
            self.errno = errno
            self.message = message
        }
    }

    /// Checks a request against the spec and the session; the operation to run, nil for "succeed without touching
    /// the device" (NBD_CMD_CACHE), or the error to reply.
    private func validate(
        _ header: NBDRequestHeader, payload: ByteBuffer?, session: NBDSession
    ) -> Result<NBDDeviceOperation?, RequestFailure> {
        let flags = header.flags
        let offset = header.offset
        let length = header.length
        let fua = flags & NBDCommandFlags.fua != 0
        let type = header.type

        func checkFlags(_ allowed: UInt16) -> RequestFailure? {
            let unknown = flags & ~(allowed | NBDCommandFlags.fua)
            guard unknown == 0 else {
                return RequestFailure(NBDErrno.invalid, "flags 0x\(String(unknown, radix: 16)) are not valid here")
            }
            return nil
        }
        func checkLengthNonZero() -> RequestFailure? {
            length == 0 ? RequestFailure(NBDErrno.invalid, "zero-length request") : nil
        }
        func checkRange(_ errno: UInt32) -> RequestFailure? {
            guard offset <= session.sizeBytes, UInt64(length) <= session.sizeBytes - offset else {
                return RequestFailure(
                    errno,
                    "request [\(offset), +\(length)) reaches past the end of the export (\(session.sizeBytes) bytes)")
            }
            return nil
        }
        func checkAlignment() -> RequestFailure? {
            let block = UInt64(session.minimumBlockSizeBytes)
            guard session.enforceMinimumBlockSize, block > 1 else { return nil }
            guard offset % block == 0, UInt64(length) % block == 0 else {
                return RequestFailure(NBDErrno.invalid, "request is not aligned to the minimum block size \(block)")
            }
            return nil
        }
        func checkWritable() -> RequestFailure? {
            session.isReadOnly ? RequestFailure(NBDErrno.perm, "the export is read-only") : nil
        }

        switch type {
        case NBDCommand.read:
            let allowed = session.structuredReplies ? NBDCommandFlags.doNotFragment : 0
            if let failure = checkFlags(allowed) ?? checkLengthNonZero() { return .failure(failure) }
            if length > session.maximumPayloadBytes {
                // Simple replies cannot carry more than the maximum; with structured replies the spec allows
                // refusing large reads up front with EOVERFLOW.
                return .failure(
                    RequestFailure(
                        session.structuredReplies ? NBDErrno.overflow : NBDErrno.invalid,
                        "READ of \(length) bytes exceeds the maximum payload of \(session.maximumPayloadBytes) bytes"))
            }
            if let failure = checkRange(NBDErrno.invalid) ?? checkAlignment() { return .failure(failure) }
            return .success(.read(offset: offset, length: length))

        case NBDCommand.write:
            if let failure = checkFlags(0) ?? checkWritable() ?? checkLengthNonZero() ?? checkRange(NBDErrno.noSpace)
                ?? checkAlignment()
            {
                return .failure(failure)
            }
            guard let payload, payload.readableBytes == Int(length) else {
                return .failure(RequestFailure(NBDErrno.invalid, "WRITE payload missing"))
            }
            return .success(.write(offset: offset, data: payload, fua: fua))

        case NBDCommand.flush:
            if let failure = checkFlags(0) { return .failure(failure) }
            guard offset == 0, length == 0 else {
                return .failure(RequestFailure(NBDErrno.invalid, "FLUSH offset and length must be zero"))
            }
            return .success(.flush)

        case NBDCommand.trim:
            guard session.transmissionFlags & NBDTransmissionFlags.sendTrim != 0 || session.isReadOnly else {
                return .failure(RequestFailure(NBDErrno.invalid, "TRIM is not supported by this export"))
            }
            if let failure = checkFlags(0) ?? checkWritable() ?? checkLengthNonZero() ?? checkRange(NBDErrno.invalid)
                ?? checkAlignment()
            {
                return .failure(failure)
            }
            return .success(.trim(offset: offset, length: length, fua: fua))

        case NBDCommand.cache:
            if let failure = checkFlags(0) ?? checkLengthNonZero() ?? checkRange(NBDErrno.invalid) ?? checkAlignment() {
                return .failure(failure)
            }
            return .success(.cache(offset: offset, length: length))

        case NBDCommand.writeZeroes:
            guard session.transmissionFlags & NBDTransmissionFlags.sendWriteZeroes != 0 || session.isReadOnly else {
                return .failure(RequestFailure(NBDErrno.invalid, "WRITE_ZEROES is not supported by this export"))
            }
            if let failure = checkFlags(NBDCommandFlags.noHole | NBDCommandFlags.fastZero) ?? checkWritable()
                ?? checkLengthNonZero() ?? checkRange(NBDErrno.noSpace) ?? checkAlignment()
            {
                return .failure(failure)
            }
            let noHole = flags & NBDCommandFlags.noHole != 0
            let fastZero = flags & NBDCommandFlags.fastZero != 0
            if fastZero {
                // Our devices zero quickly only by unmapping whole clusters; anything else would be as slow as a
                // WRITE, and the spec wants a fast ENOTSUP then (without touching the data).
                let cluster = UInt64(session.preferredBlockSizeBytes)
                if noHole {
                    return .failure(
                        RequestFailure(NBDErrno.notSupported, "a fast zero cannot honour NBD_CMD_FLAG_NO_HOLE"))
                }
                guard offset % cluster == 0, UInt64(length) % cluster == 0 else {
                    return .failure(
                        RequestFailure(NBDErrno.notSupported, "a fast zero needs whole \(cluster)-byte clusters"))
                }
            }
            return .success(
                .writeZeroes(offset: offset, length: length, fua: fua, mayUnmap: !noHole, fastZero: fastZero))

        case NBDCommand.blockStatus:
            guard session.allocationContext || session.dirtyBitmap != nil else {
                return .failure(
                    RequestFailure(
                        NBDErrno.invalid,
                        "BLOCK_STATUS needs base:allocation or a qemu:dirty-bitmap selected during the handshake")
                )
            }
            if let failure = checkFlags(NBDCommandFlags.requestOne) ?? checkLengthNonZero()
                ?? checkRange(NBDErrno.invalid) ?? checkAlignment()
            {
                return .failure(failure)
            }
            return .success(
                .blockStatus(
                    offset: offset, length: length, requestOne: flags & NBDCommandFlags.requestOne != 0,
                    allocation: session.allocationContext, dirtyBitmap: session.dirtyBitmap))

        default:
            return .failure(RequestFailure(NBDErrno.invalid, "unknown command type \(type)"))
        }
    }

    private func errorReply(_ session: NBDSession, _ cookie: UInt64, _ errno: UInt32, _ message: String) -> NBDReply {
        // With structured replies errors go in an error chunk (READ must never get a simple reply then), which can
        // carry the message for the user.
        if session.structuredReplies { return .structuredError(cookie: cookie, error: errno, message: message) }
        return .simple(cookie: cookie, error: errno)
    }

    /// A device command finished.
    package mutating func commandCompleted(
        _ command: NBDDeviceCommand, result: Result<NBDDeviceOutput, VDError>
    ) -> CompletionAction {
        precondition(inFlightRequests > 0, "completion without a command in flight")
        let wasAtBound = isAtInFlightBound
        inFlightRequests -= 1
        inFlightBytes -= command.inFlightBytes

        guard case .transmission(let session, let ending) = state else {
            return CompletionAction(reply: nil, closeConnection: false, resumeReading: false)
        }
        let reply = Self.reply(to: command, result: result, session: session)
        if ending != nil && inFlightRequests == 0 {
            state = .closed
            return CompletionAction(reply: reply, closeConnection: true, resumeReading: false)
        }
        return CompletionAction(
            reply: reply, closeConnection: false,
            resumeReading: wasAtBound && !isAtInFlightBound && ending != .clientDisconnect)
    }

    private static func reply(
        to command: NBDDeviceCommand, result: Result<NBDDeviceOutput, VDError>, session: NBDSession
    ) -> NBDReply {
        let cookie = command.cookie
        func failure(_ errno: UInt32, _ message: String) -> NBDReply {
            session.structuredReplies
                ? .structuredError(cookie: cookie, error: errno, message: message)
                : .simple(cookie: cookie, error: errno)
        }
        switch result {
        case .failure(let error):
            return failure(nbdErrno(for: error, operation: command.operation), error.message)
        case .success(let output):
            switch (command.operation, output) {
            case (.read(let offset, let length), .data(let data)):
                guard data.readableBytes == Int(length) else {
                    return failure(
                        NBDErrno.io, "the device returned \(data.readableBytes) bytes for a \(length)-byte read")
                }
                return .readData(cookie: cookie, offset: offset, data: data, structured: session.structuredReplies)
            case (.read(let offset, let length), .sparseData(let sparse)):
                guard sparse.data.readableBytes == Int(length) else {
                    return failure(
                        NBDErrno.io, "the device returned \(sparse.data.readableBytes) bytes for a \(length)-byte read")
                }
                guard session.structuredReplies, !sparse.holes.isEmpty else {
                    return .readData(
                        cookie: cookie, offset: offset, data: sparse.data, structured: session.structuredReplies)
                }
                return .sparseRead(cookie: cookie, offset: offset, data: sparse.data, holes: sparse.holes)
            case (.blockStatus(_, let length, let requestOne, _, _), .extents(let extents)):
                return .blockStatus(
                    cookie: cookie,
                    contexts: [
                        NBDStatusChunk(
                            contextID: NBDWire.allocationContextID,
                            descriptors: blockDescriptors(extents, requestLength: length, requestOne: requestOne))
                    ])
            case (.blockStatus(_, let length, let requestOne, _, _), .status(let allocation, let dirty)):
                var contexts: [NBDStatusChunk] = []
                if let allocation {
                    contexts.append(
                        NBDStatusChunk(
                            contextID: NBDWire.allocationContextID,
                            descriptors: blockDescriptors(allocation, requestLength: length, requestOne: requestOne)))
                }
                if let dirty {
                    contexts.append(
                        NBDStatusChunk(
                            contextID: NBDWire.dirtyBitmapContextID,
                            descriptors: statusDescriptors(
                                dirty.map { ($0.lengthBytes, $0.dirty ? NBDWire.dirtyFlag : 0) }, requestLength: length,
                                requestOne: requestOne, unknownFlags: NBDWire.dirtyFlag)))
                }
                guard !contexts.isEmpty else { return failure(NBDErrno.io, "no status context was computed") }
                return .blockStatus(cookie: cookie, contexts: contexts)
            case (.write, .done), (.flush, .done), (.trim, .done), (.writeZeroes, .done), (.cache, .done):
                return .simple(cookie: cookie, error: 0)
            default:
                return failure(NBDErrno.io, "the device returned an unexpected result")
            }
        }
    }

    /// Turns device extents into block status descriptors: merged where the status repeats, cut at the request's
    /// end, at most 2^20 of them, exactly one with `requestOne`. Never empty (an unknown status is 0, which the spec
    /// says is always safe).
    package static func blockDescriptors(
        _ extents: [BlockExtent], requestLength: UInt32, requestOne: Bool
    ) -> [NBDBlockDescriptor] {
        statusDescriptors(
            extents.map {
                ($0.lengthBytes, ($0.isHole ? NBDAllocationState.hole : 0) | ($0.isZero ? NBDAllocationState.zero : 0))
            }, requestLength: requestLength, requestOne: requestOne)
    }

    /// `blockDescriptors` for any context: runs of (length, flags); `unknownFlags` is the safe status if the device
    /// returned nothing (for allocation 0, "allocated"; for a dirty bitmap, "dirty").
    package static func statusDescriptors(
        _ extents: [(lengthBytes: UInt64, flags: UInt32)], requestLength: UInt32, requestOne: Bool,
        unknownFlags: UInt32 = 0
    ) -> [NBDBlockDescriptor] {
        var descriptors: [NBDBlockDescriptor] = []
        var covered: UInt64 = 0
        let wanted = UInt64(requestLength)
        let limit = requestOne ? 1 : NBDWire.blockStatusDescriptorsMax
        for (lengthBytes, flags) in extents where lengthBytes > 0 {
            let length = min(lengthBytes, wanted - covered)
            if let last = descriptors.last, last.flags == flags {
                descriptors[descriptors.count - 1].length += UInt32(length)
            } else {
                if descriptors.count == limit { break }
                descriptors.append(NBDBlockDescriptor(length: UInt32(length), flags: flags))
            }
            covered += length
            if covered == wanted { break }
        }
        if descriptors.isEmpty { descriptors.append(NBDBlockDescriptor(length: requestLength, flags: unknownFlags)) }
        return descriptors
    }

    /// The NBD error value for a device error.
    package static func nbdErrno(for error: VDError, operation: NBDDeviceOperation) -> UInt32 {
        let writes: Bool
        let fastZero: Bool
        switch operation {
        case .write: (writes, fastZero) = (true, false)
        case .writeZeroes(_, _, _, _, let fast): (writes, fastZero) = (true, fast)
        case .read, .flush, .trim, .blockStatus, .cache: (writes, fastZero) = (false, false)
        }
        switch error.code {
        case .readOnly: return NBDErrno.perm
        case .noSpace: return NBDErrno.noSpace
        case .outOfRange: return writes ? NBDErrno.noSpace : NBDErrno.invalid
        case .invalidArgument: return NBDErrno.invalid
        case .shutdown: return NBDErrno.shutdown
        case .unsupported: return fastZero ? NBDErrno.notSupported : NBDErrno.invalid
        case .io:
            if let code = error.errno, code == ENOSPC || code == EDQUOT || code == EFBIG { return NBDErrno.noSpace }
            return NBDErrno.io
        default: return NBDErrno.io
        }
    }

    // MARK: - Ending

    /// The server is shutting down (or the export is being taken away). Returns true if the connection should
    /// close now; otherwise it closes when its in-flight requests finish (`CompletionAction.closeConnection`), and
    /// requests arriving meanwhile get NBD_ESHUTDOWN.
    package mutating func beginShutdown() -> Bool {
        switch state {
        case .initial, .awaitingClientFlags, .negotiating:
            state = .closed
            return true
        case .transmission(let session, let ending):
            if inFlightRequests == 0 {
                state = .closed
                return true
            }
            if ending == nil { state = .transmission(session, ending: .serverShutdown) }
            return false
        case .closed:
            return false
        }
    }

    /// The channel closed (either side).
    package mutating func connectionClosed() {
        state = .closed
    }
}
