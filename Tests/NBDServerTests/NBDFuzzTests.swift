// Seeded random fuzzing of the option and request decoders and of the state machine behind them, for a bounded
// time in every test run. A failure names its seed; replay it with NBD_FUZZ_SEED=<seed> swift test --filter Fuzz.
// NBD_FUZZ_SECONDS changes the time budget (default 1.5 s per target).
//
// Properties checked on every stream: no crash; decoding is the same however the bytes are split (same frames, same
// error at the same point); buffered bytes stay bounded; every frame the generator built intact decodes to what was
// built; the state machine answers every request exactly once with a reply a client can parse.

import Foundation
import NIOCore
import Testing
import VolumeCore
import VolumeTesting

@testable import NBDServer

private let fuzzSeconds = Double(ProcessInfo.processInfo.environment["NBD_FUZZ_SECONDS"] ?? "") ?? 1.5
private let fixedSeed = ProcessInfo.processInfo.environment["NBD_FUZZ_SEED"].flatMap { UInt64($0) }

private struct FuzzFailure: Error, CustomStringConvertible {
    var description: String
}

@Suite struct NBDFuzzTests {
    @Test func optionDecoderAndHandshake() throws {
        try fuzz("option decoder") { seed in try Self.optionCase(seed: seed) }
    }

    @Test func requestDecoderAndTransmission() throws {
        try fuzz("request decoder") { seed in try Self.requestCase(seed: seed) }
    }

    /// Runs cases with fresh seeds until the time budget is spent (or once with NBD_FUZZ_SEED).
    private func fuzz(_ name: String, _ body: (UInt64) throws -> Void) throws {
        let deadline = ContinuousClock.now + .milliseconds(Int64(fuzzSeconds * 1000))
        var seeds = SplitMix64(seed: fixedSeed ?? UInt64.random(in: 0...UInt64.max))
        var cases = 0
        repeat {
            let seed = fixedSeed ?? seeds.next()
            do {
                try body(seed)
            } catch {
                Issue.record("\(name) fuzz case failed with seed \(seed) (replay: NBD_FUZZ_SEED=\(seed)): \(error)")
                return
            }
            cases += 1
        } while fixedSeed == nil && ContinuousClock.now < deadline
        #expect(cases > 0)
    }

    // MARK: Options

    private static func optionCase(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        var stream = ClientWire.clientFlags(random.chance(0.9) ? 3 : UInt32.random(in: 0...7, using: &random))
        var intact: [NBDClientOption] = []  // options appended without mutation, in order, until the first mutation
        var mutated = false
        let dataMax = 512
        for _ in 0..<Int.random(in: 1...30, using: &random) {
            let code: UInt32 =
                random.chance(0.8)
                ? UInt32.random(in: 1...12, using: &random) : UInt32.random(in: 0...UInt32.max, using: &random)
            let data = randomOptionData(code: code, using: &random, max: dataMax * 2)
            var frame = ClientWire.option(code, data)
            if random.chance(0.1) {
                mutate(&frame, using: &random)
                mutated = true
            } else if !mutated && data.readableBytes <= dataMax {
                intact.append(NBDClientOption(code: code, data: data))
            }
            stream.writeImmutableBuffer(frame)
        }
        if random.chance(0.2) { stream.moveWriterIndex(to: Int.random(in: 0...stream.writerIndex, using: &random)) }

        let splitA = try decodeOptions(stream, dataMax: UInt32(dataMax), split: .single)
        let splitB = try decodeOptions(stream, dataMax: UInt32(dataMax), split: .random(seed &+ 1))
        let splitC = try decodeOptions(stream, dataMax: UInt32(dataMax), split: .bytes)
        guard splitA == splitB, splitB == splitC else {
            throw FuzzFailure(
                description:
                    "decoding depends on how the bytes are split: "
                    + [splitA, splitB, splitC].map(\.summary).joined(separator: " / ")
            )
        }
        let decodedOptions = splitA.messages.compactMap { message -> NBDClientOption? in
            if case .option(let option) = message { return option }
            return nil
        }
        guard Array(decodedOptions.prefix(intact.count)) == Array(intact.prefix(decodedOptions.count)) else {
            throw FuzzFailure(description: "an intact option decoded differently")
        }

        // Through the state machine: never crashes, replies always parse, and a closed machine stays closed.
        let device = MemoryBlockDevice(sizeBytes: 1 << 20)
        let exports = NBDStaticExportProvider([NBDExport(name: "disk", device: device)], defaultExportName: "disk")
        var machine = NBDServerConnectionStateMachine(
            configuration: .init(optionsPerConnectionMax: 20), exports: exports)
        _ = machine.connectionActive()
        for message in splitA.messages {
            guard machine.acceptsMessages else { break }
            switch machine.receivedHandshakeMessage(message) {
            case .none, .close: break
            case .send(var bytes), .sendAndClose(var bytes), .sendAndStartTLS(var bytes):
                let replies = try OptionReply.parseAll(&bytes)
                guard bytes.readableBytes == 0, !replies.isEmpty else {
                    throw FuzzFailure(description: "unparseable option reply")
                }
            case .sendAndEnterTransmission(let bytes, _):
                guard bytes.readableBytes > 0 else { throw FuzzFailure(description: "empty transmission entry") }
            }
        }
    }

    private static func randomOptionData(code: UInt32, using random: inout SplitMix64, max: Int) -> ByteBuffer {
        switch Int.random(in: 0..<4, using: &random) {
        case 0:
            return ClientWire.infoData(
                name: random.chance(0.5) ? "disk" : randomString(using: &random),
                items: (0..<Int.random(in: 0...4, using: &random)).map { _ in UInt16.random(in: 0...5, using: &random) }
            )
        case 1:
            return ClientWire.metaContextData(
                name: random.chance(0.5) ? "disk" : randomString(using: &random),
                queries: (0..<Int.random(in: 0...3, using: &random)).map { _ in
                    random.chance(0.5)
                        ? ["base:allocation", "base:", "qemu:x", "nocolon"].randomElement(using: &random)!
                        : randomString(using: &random)
                })
        case 2:
            return ByteBuffer(string: random.chance(0.5) ? "disk" : randomString(using: &random))
        default:
            return ByteBuffer(
                bytes: (0..<Int.random(in: 0...max, using: &random)).map { _ in
                    UInt8.random(in: 0...255, using: &random)
                })
        }
    }

    private static func randomString(using random: inout SplitMix64) -> String {
        String(
            (0..<Int.random(in: 0...12, using: &random)).map { _ in
                Character(UnicodeScalar(UInt8.random(in: 32...126, using: &random)))
            })
    }

    private struct Decoded<Message: Equatable>: Equatable {
        var messages: [Message]
        var error: NBDDecodingError?
        var summary: String {
            let last = messages.last.map { "\($0)" } ?? "-"
            return "\(messages.count) messages, last \(last), error \(error.map { "\($0)" } ?? "none")"
        }
    }

    private enum Split {
        case single
        case bytes
        case random(UInt64)
    }

    private static func chunks(_ stream: ByteBuffer, _ split: Split) -> [ByteBuffer] {
        var rest = stream
        var out: [ByteBuffer] = []
        var random = SplitMix64(seed: 0)
        if case .random(let seed) = split { random = SplitMix64(seed: seed) }
        while rest.readableBytes > 0 {
            let size: Int
            switch split {
            case .single: size = rest.readableBytes
            case .bytes: size = 1
            case .random: size = Int.random(in: 1...max(1, min(rest.readableBytes, 700)), using: &random)
            }
            out.append(rest.readSlice(length: min(size, rest.readableBytes))!)
        }
        return out
    }

    private static func decodeOptions(
        _ stream: ByteBuffer, dataMax: UInt32, split: Split
    ) throws -> Decoded<NBDHandshakeMessage> {
        var decoder = NBDHandshakeDecoder(optionDataBytesMax: dataMax, optionDiscardBytesMax: dataMax * 4)
        var inbound = NBDInboundBuffer()
        var decoded = Decoded<NBDHandshakeMessage>(messages: [], error: nil)
        for chunk in chunks(stream, split) {
            inbound.append(chunk)
            do {
                while let message = try inbound.nextFrame(&decoder) { decoded.messages.append(message) }
            } catch {
                decoded.error = error
                return decoded
            }
            guard inbound.bufferedBytes <= chunk.readableBytes + 16 + Int(dataMax) else {
                throw FuzzFailure(description: "\(inbound.bufferedBytes) bytes buffered")
            }
        }
        return decoded
    }

    // MARK: Requests

    private static func requestCase(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let payloadMax: UInt32 = 8192
        let size: UInt64 = 1 << 20
        var stream = ByteBuffer()
        var intact: [NBDRequestMessage] = []
        var mutated = false
        for index in 0..<Int.random(in: 1...60, using: &random) {
            let type: UInt16 =
                random.chance(0.85)
                ? UInt16.random(in: 0...8, using: &random) : UInt16.random(in: 0...UInt16.max, using: &random)
            let flags: UInt16 =
                random.chance(0.7)
                ? UInt16.random(in: 0...1, using: &random) : UInt16.random(in: 0...0x3f, using: &random)
            let offset: UInt64 =
                random.chance(0.8)
                ? UInt64.random(in: 0...(size / 512), using: &random) * 512
                : UInt64.random(in: 0...UInt64.max, using: &random)
            let length: UInt32 =
                random.chance(0.8)
                ? UInt32.random(in: 0...16, using: &random) * 512
                : UInt32.random(in: 0...(payloadMax * 2), using: &random)
            let cookie = UInt64(index)
            let header = NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
            var frame: ByteBuffer
            var message: NBDRequestMessage
            if type == NBDCommand.write {
                let payload = ByteBuffer(repeating: UInt8(truncatingIfNeeded: index), count: Int(length))
                frame = ClientWire.request(
                    type, flags: flags, cookie: cookie, offset: offset, length: length, payload: payload)
                message = length <= payloadMax ? .request(header, payload: payload) : .oversizedWrite(header)
            } else {
                frame = ClientWire.request(type, flags: flags, cookie: cookie, offset: offset, length: length)
                message = .request(header, payload: nil)
            }
            if random.chance(0.05) {
                mutate(&frame, using: &random)
                mutated = true
            } else if !mutated {
                intact.append(message)
            }
            stream.writeImmutableBuffer(frame)
        }
        if random.chance(0.2) { stream.moveWriterIndex(to: Int.random(in: 0...stream.writerIndex, using: &random)) }

        let splitA = try decodeRequests(stream, payloadMax: payloadMax, split: .single)
        let splitB = try decodeRequests(stream, payloadMax: payloadMax, split: .random(seed &+ 1))
        let splitC = try decodeRequests(stream, payloadMax: payloadMax, split: .bytes)
        guard splitA == splitB, splitB == splitC else {
            throw FuzzFailure(
                description:
                    "decoding depends on how the bytes are split: "
                    + [splitA, splitB, splitC].map(\.summary).joined(separator: " / ")
            )
        }
        guard Array(splitA.messages.prefix(intact.count)) == Array(intact.prefix(splitA.messages.count)) else {
            throw FuzzFailure(description: "an intact request decoded differently")
        }

        // Through a transmission state machine; completions are simulated (success or a random device error) in a
        // random order. Every request but DISC gets exactly one reply that a client can parse.
        let driver = try TransmissionDriver(
            structured: random.chance(0.5), metaContext: random.chance(0.5), blockSizes: random.chance(0.5),
            readOnly: random.chance(0.2), configuration: .init(maxInFlightRequests: 4, maxInFlightBytes: 16384),
            size: size)
        var pending: [NBDDeviceCommand] = []
        var answered: [UInt64: Int] = [:]
        var expected = 0
        var closed = false
        func record(_ reply: NBDReply) throws {
            answered[reply.cookie, default: 0] += 1
            var wire = NBDReplyEncoder.encode(reply)
            let readLengths: [UInt64: Int]
            if case .readData(let cookie, _, let data, false) = reply {
                readLengths = [cookie: data.readableBytes]
            } else {
                readLengths = [:]
            }
            guard let parsed = try TransmissionReply.parse(&wire, readLengths: readLengths), wire.readableBytes == 0,
                parsed.cookie == reply.cookie, parsed.isDone
            else { throw FuzzFailure(description: "unparseable reply \(reply)") }
        }
        func completeOne() throws {
            let command = pending.remove(at: Int.random(in: 0..<pending.count, using: &random))
            let result: Result<NBDDeviceOutput, VDError>
            if random.chance(0.1) {
                result = .failure(
                    VDError([.io, .noSpace, .corrupt, .readOnly].randomElement(using: &random)!, "injected"))
            } else {
                switch command.operation {
                case .read(_, let length): result = .success(.data(ByteBuffer(repeating: 0, count: Int(length))))
                case .blockStatus(_, let length, _, _, _):
                    result = .success(
                        .extents([BlockExtent(lengthBytes: UInt64(length), isHole: random.chance(0.5), isZero: true)]))
                default: result = .success(.done)
                }
            }
            let action = driver.complete(command, result: result)
            if let reply = action.reply { try record(reply) }
            if action.closeConnection { closed = true }
        }
        for message in splitA.messages {
            while !driver.machine.acceptsMessages && !pending.isEmpty { try completeOne() }
            guard driver.machine.acceptsMessages, !closed else { break }
            if case .request(let header, _) = message, header.type == NBDCommand.disconnect {
                _ = driver.receive(message)
                break
            }
            expected += 1
            switch driver.receive(message) {
            case .perform(let command): pending.append(command)
            case .reply(let reply): try record(reply)
            case .none, .close: throw FuzzFailure(description: "a request was neither run nor answered")
            }
            if random.chance(0.3), !pending.isEmpty { try completeOne() }
        }
        while !pending.isEmpty { try completeOne() }
        guard answered.values.reduce(0, +) == expected,
            answered.values.allSatisfy({ $0 == 1 }) || hasDuplicateCookies(splitA.messages)
        else {
            throw FuzzFailure(description: "\(expected) requests, replies per cookie \(answered)")
        }
        guard driver.machine.inFlightRequests == 0, driver.machine.inFlightBytes == 0 else {
            throw FuzzFailure(description: "in-flight counters did not return to zero")
        }
    }

    private static func hasDuplicateCookies(_ messages: [NBDRequestMessage]) -> Bool {
        var seen = Set<UInt64>()
        for message in messages {
            let cookie: UInt64
            switch message {
            case .request(let header, _), .oversizedWrite(let header): cookie = header.cookie
            }
            if !seen.insert(cookie).inserted { return true }
        }
        return false
    }

    private static func decodeRequests(
        _ stream: ByteBuffer, payloadMax: UInt32, split: Split
    ) throws -> Decoded<NBDRequestMessage> {
        var decoder = NBDRequestDecoder(payloadBytesMax: payloadMax, discardBytesMax: payloadMax * 2)
        var inbound = NBDInboundBuffer()
        var decoded = Decoded<NBDRequestMessage>(messages: [], error: nil)
        for chunk in chunks(stream, split) {
            inbound.append(chunk)
            do {
                while let message = try inbound.nextFrame(&decoder) { decoded.messages.append(message) }
            } catch {
                decoded.error = error
                return decoded
            }
            guard inbound.bufferedBytes <= chunk.readableBytes + 28 + Int(payloadMax) else {
                throw FuzzFailure(description: "\(inbound.bufferedBytes) bytes buffered")
            }
        }
        return decoded
    }

    /// Flips, overwrites or truncates bytes of a frame.
    private static func mutate(_ frame: inout ByteBuffer, using random: inout SplitMix64) {
        guard frame.readableBytes > 0 else { return }
        switch Int.random(in: 0..<3, using: &random) {
        case 0:
            let index = Int.random(in: 0..<frame.readableBytes, using: &random)
            frame.setInteger(
                frame.getInteger(at: index, as: UInt8.self)! ^ UInt8.random(in: 1...255, using: &random), at: index)
        case 1:
            let index = Int.random(in: 0..<frame.readableBytes, using: &random)
            let count = min(4, frame.readableBytes - index)
            for offset in 0..<count { frame.setInteger(UInt8.random(in: 0...255, using: &random), at: index + offset) }
        default:
            frame.moveWriterIndex(to: Int.random(in: 0..<frame.readableBytes, using: &random))
        }
    }
}

extension SplitMix64 {
    mutating func chance(_ probability: Double) -> Bool {
        Double(next() >> 11) / Double(1 << 53) < probability
    }
}
