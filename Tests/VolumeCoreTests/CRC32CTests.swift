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

    /// The bitwise definition (reflected polynomial 0x82F63B78), for checking the fast paths against.
    static func reference(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        var crc: UInt32 = ~0
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        }
        return ~crc
    }

    /// The hardware path runs three interleaved streams over blocks of 3 x 1360 bytes and stitches them together:
    /// lengths around the block size, several blocks, unaligned starts and seeds must all agree with the definition.
    @Test func interleavedStreamsMatchTheDefinition() {
        let bytes = (0..<20_000).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        for length in [4079, 4080, 4081, 4096, 8160, 8161, 12_240, 12_247, 16_384, 19_990] {
            for start in [0, 1, 5, 8] where start + length <= bytes.count {
                let slice = bytes[start..<(start + length)]
                #expect(CRC32C.checksum(slice) == Self.reference(slice), "length \(length) start \(start)")
            }
        }
        let seeded = CRC32C.checksum(bytes[4000..<9000], seed: CRC32C.checksum(bytes[0..<4000]))
        #expect(seeded == Self.reference(bytes[0..<9000]))
    }
}
