import Testing
import VolumeTesting

@Suite struct NBDPlaceholderTests {
    @Test func memoryDeviceReadsZeroes() async throws {
        let device = MemoryBlockDevice(sizeBytes: 1 << 20)
        let data = try await device.read(offset: 0, length: 4096)
        #expect(data.readableBytesView.allSatisfy { $0 == 0 })
    }
}
