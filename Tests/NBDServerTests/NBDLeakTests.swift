// A leak check of a long handshake loop: thousands of connections that handshake fully, give up half-way, or vanish
// mid-request. Each closed connection must free its handler (and with it its buffers, state machine, timers and
// channel): the server's count of live handlers returns to zero, and a well-behaved client still works.

import NBDServer
import NIOCore
import Testing

@Suite struct NBDLeakTests {
    @Test func longHandshakeLoopFreesEveryConnection() async throws {
        try await withTestServer { server in
            let path = server.socketPath
            let rounds = 2000
            for round in 0..<rounds {
                try await RawClient.with(path) { client in
                    switch round % 5 {
                    case 0:
                        // The whole way: structured replies, base:allocation, GO, a write, DISC.
                        try await client.handshake(structured: true, metaContext: true)
                        let data = ClientWire.pattern(UInt8(truncatingIfNeeded: round), count: 4096)
                        #expect(try await client.writeBlock(cookie: 1, offset: 0, data: data) == 0)
                        try await client.disconnect()
                        #expect(try await client.waitForClose())
                    case 1:
                        // Gone after the greeting.
                        try await client.readGreeting()
                    case 2:
                        // Gone after an option and its reply.
                        try await client.readGreeting()
                        try await client.send(ClientWire.clientFlags(3), ClientWire.option(3))
                        _ = try await client.readOptionReplies()
                    case 3:
                        // Gone in the middle of a WRITE payload.
                        try await client.handshake()
                        var request = ClientWire.write(cookie: 2, offset: 0, data: ClientWire.pattern(1, count: 65536))
                        try await client.send(request.readSlice(length: 1000)!)
                    default:
                        // Gone with a READ in flight.
                        try await client.handshake()
                        try await client.send(ClientWire.request(0, cookie: 3, offset: 0, length: 1 << 20))
                    }
                }
            }
            try await server.waitForNoConnections(timeout: .seconds(20))
            let deadline = ContinuousClock.now + .seconds(10)
            while server.server.liveHandlerCount > 0 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(
                server.server.liveHandlerCount == 0,
                "\(server.server.liveHandlerCount) of \(rounds) connection handlers were never freed")
            try await wellBehavedSession(path, slot: 3, structured: true)
        }
    }
}
