// CRC32C over bytes, backed by the CCRC32C helper (hardware instructions when present).

public import CCRC32C
public import NIOCore

/// CRC32C (Castagnoli). `CRC32C.checksum("123456789")` is 0xE3069283.
public enum CRC32C {
    /// The CRC32C of `bytes`, continuing from `seed` (the CRC of the bytes before them; 0 for none).
    @inlinable
    public static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return seed }
        return vd_crc32c_update(seed, base, bytes.count)
    }

    @inlinable
    public static func checksum(_ bytes: some Sequence<UInt8>, seed: UInt32 = 0) -> UInt32 {
        if let crc = bytes.withContiguousStorageIfAvailable({ checksum(UnsafeRawBufferPointer($0), seed: seed) }) {
            return crc
        }
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum($0, seed: seed) }
    }

    /// The CRC32C of the readable bytes of `buffer`.
    @inlinable
    public static func checksum(_ buffer: ByteBuffer, seed: UInt32 = 0) -> UInt32 {
        buffer.withUnsafeReadableBytes { checksum($0, seed: seed) }
    }

    /// The CRC32C of A followed by B, from the CRCs of A and B and the length of B (no data is read).
    @inlinable
    public static func combine(_ crcA: UInt32, _ crcB: UInt32, lengthB: UInt64) -> UInt32 {
        vd_crc32c_combine(crcA, crcB, lengthB)
    }

    /// Whether the hardware path is in use (reported in `vd serve` start-up logs).
    public static var isHardwareAccelerated: Bool { vd_crc32c_is_hardware_accelerated() != 0 }
}
