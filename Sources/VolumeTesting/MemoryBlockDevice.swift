// An in-memory twin of a volume for protocol tests: sparse 4 KiB pages, every BlockDevice operation, and hooks to
// count calls or inject failures. For unit tests only; it keeps nothing across process restarts.

public import NIOCore
import Synchronization
public import VolumeCore

/// A sparse in-memory block device.
public final class MemoryBlockDevice: BlockDevice {
    private static let pageBytes = 4096

    private struct State {
        var info: BlockDeviceInfo
        var pages: [UInt64: [UInt8]] = [:]
        var flushCount = 0
        var writeCount = 0
        var failNext: VDError?
    }

    private let state: Mutex<State>

    public init(sizeBytes: UInt64, readOnly: Bool = false, preferredBlockSizeBytes: UInt32 = 4096) {
        state = Mutex(
            State(
                info: BlockDeviceInfo(
                    sizeBytes: sizeBytes, preferredBlockSizeBytes: preferredBlockSizeBytes, isReadOnly: readOnly)))
    }

    public var info: BlockDeviceInfo { state.withLock { $0.info } }
    public var flushCount: Int { state.withLock { $0.flushCount } }
    public var writeCount: Int { state.withLock { $0.writeCount } }
    /// Number of 4 KiB pages holding data.
    public var allocatedPageCount: Int { state.withLock { $0.pages.count } }

    /// The next operation fails with `error` (once).
    public func failNextOperation(with error: VDError) { state.withLock { $0.failNext = error } }

    private func takeFailure() throws(VDError) {
        let failure = state.withLock { state -> VDError? in
            defer { state.failNext = nil }
            return state.failNext
        }
        if let failure { throw failure }
    }

    public func read(offset: UInt64, length: UInt32) async throws(VDError) -> ByteBuffer {
        try await readSparse(offset: offset, length: length).data
    }

    public func readSparse(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData {
        try takeFailure()
        try checkRange(offset: offset, length: UInt64(length))
        var out = SparseData(data: ByteBuffer.zeroes(Int(length)))
        state.withLock { state in
            var position = offset
            let end = offset + UInt64(length)
            while position < end {
                let page = position / UInt64(Self.pageBytes)
                let inPage = Int(position % UInt64(Self.pageBytes))
                let count = min(Self.pageBytes - inPage, Int(end - position))
                let at = Int(position - offset)
                if let bytes = state.pages[page] {
                    out.data.setBytes(bytes[inPage..<(inPage + count)], at: at)
                } else {
                    out.addHole(at..<(at + count))
                }
                position += UInt64(count)
            }
        }
        return out
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(VDError) {
        try takeFailure()
        guard !info.isReadOnly else { throw VDError(.readOnly, "the device is read-only") }
        try checkRange(offset: offset, length: UInt64(data.readableBytes))
        let bytes = Array(data.readableBytesView)
        state.withLock { state in
            state.writeCount += 1
            Self.store(bytes, at: offset, into: &state.pages)
            if fua { state.flushCount += 1 }
        }
    }

    public func flush() async throws(VDError) {
        try takeFailure()
        state.withLock { $0.flushCount += 1 }
    }

    public func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(VDError) {
        try takeFailure()
        guard !info.isReadOnly else { throw VDError(.readOnly, "the device is read-only") }
        try checkRange(offset: offset, length: UInt64(length))
        zero(offset: offset, length: UInt64(length))
    }

    public func writeZeroes(offset: UInt64, length: UInt32, fua: Bool, mayUnmap: Bool) async throws(VDError) {
        try takeFailure()
        guard !info.isReadOnly else { throw VDError(.readOnly, "the device is read-only") }
        try checkRange(offset: offset, length: UInt64(length))
        zero(offset: offset, length: UInt64(length))
    }

    public func allocation(offset: UInt64, length: UInt32) async throws(VDError) -> [BlockExtent] {
        try checkRange(offset: offset, length: UInt64(length))
        return state.withLock { state in
            var extents: [BlockExtent] = []
            var position = offset
            let end = offset + UInt64(length)
            while position < end {
                let page = position / UInt64(Self.pageBytes)
                let pageEnd = min((page + 1) * UInt64(Self.pageBytes), end)
                let hole = state.pages[page] == nil
                if let last = extents.last, last.isHole == hole {
                    extents[extents.count - 1].lengthBytes += pageEnd - position
                } else {
                    extents.append(BlockExtent(lengthBytes: pageEnd - position, isHole: hole, isZero: hole))
                }
                position = pageEnd
            }
            return extents
        }
    }

    private func zero(offset: UInt64, length: UInt64) {
        state.withLock { state in
            var position = offset
            let end = offset + length
            while position < end {
                let page = position / UInt64(Self.pageBytes)
                let inPage = Int(position % UInt64(Self.pageBytes))
                let count = min(Self.pageBytes - inPage, Int(end - position))
                if inPage == 0 && count == Self.pageBytes {
                    state.pages[page] = nil
                } else if state.pages[page] != nil {
                    state.pages[page]!.replaceSubrange(inPage..<(inPage + count), with: repeatElement(0, count: count))
                }
                position += UInt64(count)
            }
        }
    }

    private static func store(_ bytes: [UInt8], at offset: UInt64, into pages: inout [UInt64: [UInt8]]) {
        var position = offset
        var consumed = 0
        while consumed < bytes.count {
            let page = position / UInt64(pageBytes)
            let inPage = Int(position % UInt64(pageBytes))
            let count = min(pageBytes - inPage, bytes.count - consumed)
            var current = pages[page] ?? [UInt8](repeating: 0, count: pageBytes)
            current.replaceSubrange(inPage..<(inPage + count), with: bytes[consumed..<(consumed + count)])
            pages[page] = current
            position += UInt64(count)
            consumed += count
        }
    }
}
