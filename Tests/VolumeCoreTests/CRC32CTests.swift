import Testing
import VolumeCore

@Suite struct CRC32CTests {
    @Test func knownVector() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test func incrementalEqualsWhole() {
        let bytes = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let whole = CRC32C.checksum(bytes)
        for split in [0, 1, 7, 8, 63, 4096, 9_999, 10_000] {
            let first = CRC32C.checksum(bytes[0..<split])
            #expect(CRC32C.checksum(bytes[split...], seed: first) == whole, "split \(split)")
        }
    }

    @Test(arguments: [0, 1, 3, 8, 100, 4096, 8191, 65536])
    func combineEqualsChecksumOfConcatenation(lengthB: Int) {
        var generator = SystemRandomNumberGenerator()
        let a = (0..<Int.random(in: 0...5000, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let b = (0..<lengthB).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let combined = CRC32C.combine(CRC32C.checksum(a), CRC32C.checksum(b), lengthB: UInt64(b.count))
        #expect(combined == CRC32C.checksum(a + b))
    }
}
