// Checking a volume after `vd serve` was killed under a fio write job, without fio's own verify state.
//
// fio 3.33 (Debian 12) cannot verify after a crash with writes in flight: its saved verify state keeps only the last
// `iodepth` completions and a count, and its verify pass (which walks blocks in offset order, not issue order) treats
// the writes that were in flight when the server died as completed. A write the server never replied to is then
// reported as lost ("bad magic header 0"); on a loaded machine more requests are still queued in the server when it
// dies, so the test failed now and then while no acknowledged write was lost (seen on CI: the zeroed blocks were
// exactly the last writes fio issued and never saw complete).
//
// So the check is done here, from fio's own logs: `--write_iolog` lists the writes in issue order (the index of a
// write there is the `numberio` fio stores in each block's verify header), `--write_lat_log` with `--log_offset=1`
// lists the writes that completed. The device is copied out with nbdcopy, and every 4 KiB block is checked:
// - covered by a write that never completed: skipped (either content is allowed);
// - otherwise covered by completed writes: it holds the verify header of the last of them (magic, offset, numberio);
// - never written: it reads zeroes.
// fio's verify header (fio 3.x, verify.h): magic u16 (0xacca), type u16, len u32, rand_seed u64, offset u64,
// time_sec u32, time_nsec u32, thread u16, numberio u16, crc32 u32 (little-endian). The data checksum after it is
// not recomputed: the header names the write, which is what a lost or misplaced write gets wrong.

public import Foundation

public struct FioCrashCheck: Sendable {
    public struct Write: Sendable, Hashable {
        public var offset: UInt64
        public var length: UInt64
    }

    /// Writes in issue order.
    public let issued: [Write]
    /// For each issued write: whether fio saw it complete.
    public let completed: [Bool]
    public static let blockBytes: UInt64 = 4096

    /// Reads fio's iolog (`--write_iolog`) and completion latency log (`--write_lat_log=NAME --log_offset=1`, the
    /// file NAME_clat.1.log).
    public init(iolog: String, completionLog: String) throws {
        var issued: [Write] = []
        for line in iolog.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count == 5, fields[2] == "write", let offset = UInt64(fields[3]),
                let length = UInt64(fields[4])
            else { continue }
            issued.append(Write(offset: offset, length: length))
        }
        // Completions (time, latency, direction, size, offset, priority), matched to the earliest issued write with
        // the same offset and size that has not been matched yet.
        var pending: [Write: [Int]] = [:]
        for (index, write) in issued.enumerated() { pending[write, default: []].append(index) }
        var completed = [Bool](repeating: false, count: issued.count)
        for line in completionLog.split(separator: "\n") {
            let fields = line.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            guard fields.count >= 5, fields[2] == "1", let length = UInt64(fields[3]), let offset = UInt64(fields[4])
            else { continue }
            let write = Write(offset: offset, length: length)
            guard var indices = pending[write], !indices.isEmpty else {
                throw TestToolError(message: "fio completed a write it never issued: \(line)")
            }
            completed[indices.removeFirst()] = true
            pending[write] = indices
        }
        self.issued = issued
        self.completed = completed
    }

    public struct Outcome: Sendable {
        /// Blocks whose content was checked (written by a completed write, or never written).
        public var checkedBlocks = 0
        /// Blocks written by completed writes among them.
        public var writtenBlocks = 0
        /// Blocks skipped because a write that never completed covers them.
        public var undeterminedBlocks = 0
        public var failures: [String] = []
    }

    /// Checks `image` (the device's content) block by block.
    public func check(image: Data) -> Outcome {
        let blocks = Int(UInt64(image.count) / Self.blockBytes)
        var last = [Int](repeating: -1, count: blocks)
        var undetermined = [Bool](repeating: false, count: blocks)
        for (index, write) in issued.enumerated() {
            let first = Int(write.offset / Self.blockBytes)
            let end = min(blocks, Int((write.offset + write.length + Self.blockBytes - 1) / Self.blockBytes))
            guard first < end else { continue }
            for block in first..<end {
                last[block] = index
                if !completed[index] { undetermined[block] = true }
            }
        }
        var outcome = Outcome()
        image.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            func u16(_ at: Int) -> UInt16 { UInt16(raw[at]) | UInt16(raw[at + 1]) << 8 }
            func u64(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(raw[at + $1]) << (8 * $1) } }
            for block in 0..<blocks {
                if undetermined[block] {
                    outcome.undeterminedBlocks += 1
                    continue
                }
                outcome.checkedBlocks += 1
                let base = block * Int(Self.blockBytes)
                let offset = UInt64(base)
                guard last[block] >= 0 else {
                    if raw[base..<(base + Int(Self.blockBytes))].contains(where: { $0 != 0 }) {
                        outcome.failures.append("block at \(offset) was never written but does not read zeroes")
                    }
                    continue
                }
                outcome.writtenBlocks += 1
                let index = last[block]
                let (magic, storedOffset, numberio) = (u16(base), u64(base + 16), u16(base + 34))
                if magic != 0xacca || storedOffset != offset || numberio != UInt16(truncatingIfNeeded: index) {
                    let write = issued[index]
                    outcome.failures.append(
                        "block at \(offset): fio's write #\(index) (offset \(write.offset), \(write.length) bytes) "
                            + "completed, but the block holds magic 0x\(String(magic, radix: 16)), offset "
                            + "\(storedOffset), write #\(numberio)")
                }
            }
        }
        return outcome
    }
}
