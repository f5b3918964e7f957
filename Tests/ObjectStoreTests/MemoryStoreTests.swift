import NIOCore
import ObjectStore
import Testing

@Suite struct MemoryStoreTests {
    @Test func putGetRange() async throws {
        let store = MemoryStore()
        try await store.put("a/b", data: ByteBuffer(bytes: [1, 2, 3, 4]))
        let part = try await store.get("a/b", range: 1..<3)
        #expect(Array(part.readableBytesView) == [2, 3])
    }
}
