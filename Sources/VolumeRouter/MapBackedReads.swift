// Reads built from a map: the bytes of a range from its clusters' map values, and allocation. Shared by a volume
// and by a backend view of another router's volume (`BackendParentView`), which differ only in where a cluster's
// bytes come from (`readClusters`).

import BlockMap
import Logging
import NIOCore
import VolumeCore

protocol MapBackedReads: Sendable {
    var clusterBytes: Int { get }
    var parent: ParentLink? { get }
    /// Consecutive clusters of one SCO, each verified against its CRC.
    func readClusters(
        sco: SCONumber, offset: UInt32, crcs: [UInt32], firstAddress: ClusterAddress
    ) async throws(VDError) -> ByteBuffer
}

extension MapBackedReads {
    /// The map values of `count` clusters from `first` at the end of `epoch`.
    func values(
        first: ClusterAddress, count: Int, atEpoch epoch: UInt64, in map: BlockMap
    ) throws(VDError) -> [MapValue?] {
        var values: [MapValue?] = []
        values.reserveCapacity(count)
        for index in 0..<count { values.append(try map.value(first + UInt64(index), atEpoch: epoch)) }
        return values
    }

    /// Builds the bytes of `[offset, offset+length)` from the map values of its clusters: located clusters are read
    /// (runs in one SCO at a time), unmapped ones are zeroes (holes), never-written ones come from the parent snapshot
    /// of a clone (holes otherwise).
    func assemble(
        values: [MapValue?], first: ClusterAddress, offset: UInt64, length: UInt32
    )
        async throws(VDError) -> SparseData
    {
        let cs = UInt64(clusterBytes)
        let count = values.count
        if count == 1 && offset % cs == 0 && length == UInt32(clusterBytes), parent == nil || values[0] != nil {
            guard let location = values[0]?.location else {
                return SparseData(data: ByteBuffer.zeroes(clusterBytes), holes: [0..<clusterBytes])
            }
            return SparseData(
                data: try await readClusters(
                    sco: location.sco, offset: location.offset, crcs: [location.crc], firstAddress: first))
        }
        let end = offset + UInt64(length)
        var result = SparseData(data: ByteBuffer.zeroes(Int(length)))
        /// The part of the cluster run `[runStart, runEnd)` inside the request, relative to its start.
        func clip(_ runStart: UInt64, _ runEnd: UInt64) -> Range<Int> {
            Int(max(runStart, offset) - offset)..<Int(min(runEnd, end) - offset)
        }
        func place(_ bytes: ByteBuffer, runStart: UInt64, runEnd: UInt64) {
            let range = clip(runStart, runEnd)
            let skip = Int(max(runStart, offset) - runStart)
            result.data.setBuffer(
                bytes.getSlice(at: bytes.readerIndex + skip, length: range.count)!,
                at: result.data.readerIndex + range.lowerBound)
        }
        var i = 0
        while i < count {
            let runStart = (first + UInt64(i)) * cs
            guard let value = values[i] else {
                // Never written here: a clone reads its parent's snapshot.
                var j = i + 1
                while j < count, values[j] == nil { j += 1 }
                let runEnd = (first + UInt64(j)) * cs
                if let parent {
                    let inherited = try await parent.readSparse(
                        offset: runStart, length: UInt32(runEnd - runStart))
                    place(inherited.data, runStart: runStart, runEnd: runEnd)
                    let window = clip(runStart, runEnd)
                    let shift = Int(runStart) - Int(offset)
                    for hole in inherited.holes {
                        let lower = max(hole.lowerBound + shift, window.lowerBound)
                        let upper = min(hole.upperBound + shift, window.upperBound)
                        if lower < upper { result.addHole(lower..<upper) }
                    }
                } else {
                    result.addHole(clip(runStart, runEnd))
                }
                i = j
                continue
            }
            guard let location = value.location else {
                result.addHole(clip(runStart, runStart + cs))
                i += 1
                continue
            }
            var j = i + 1
            while j < count, let next = values[j]?.location, next.sco == location.sco,
                UInt64(next.offset) == UInt64(location.offset) + UInt64(j - i) * cs
            {
                j += 1
            }
            let crcs = values[i..<j].map { $0!.location!.crc }
            let bytes = try await readClusters(
                sco: location.sco, offset: location.offset, crcs: crcs, firstAddress: first + UInt64(i))
            place(bytes, runStart: runStart, runEnd: (first + UInt64(j)) * cs)
            i = j
        }
        return result
    }

    /// Consecutive clusters of one SCO from the backend, each verified against its CRC; a mismatch is read again
    /// (the bytes may have been damaged on the way) up to `Volume.backendReadAttemptsMax` times.
    func fetchVerified(
        sco: SCONumber, offset: UInt32, crcs: [UInt32], firstAddress: ClusterAddress, from reader: BackendSCOReader,
        logger: Logger
    ) async throws(VDError) -> ByteBuffer {
        let length = crcs.count * clusterBytes
        let object = reader.layout.scoObject(sco)
        var attempt = 0
        while true {
            attempt += 1
            let remote = try await reader.fetch(sco, range: UInt64(offset)..<(UInt64(offset) + UInt64(length)))
            guard let bad = firstMismatch(remote, crcs) else { return remote }
            let message =
                "volume \(reader.volumeName) cluster \(firstAddress + UInt64(bad)): checksum mismatch in backend object \(object) at offset \(UInt64(offset) + UInt64(bad * clusterBytes))"
            guard attempt < Volume.backendReadAttemptsMax else { throw .corrupt(message) }
            logger.warning("\(message) (attempt \(attempt)); reading it again")
        }
    }

    /// Index of the first cluster whose CRC does not match, or nil.
    func firstMismatch(_ bytes: ByteBuffer, _ crcs: [UInt32]) -> Int? {
        guard bytes.readableBytes == crcs.count * clusterBytes else { return 0 }
        let cs = clusterBytes
        return bytes.withUnsafeReadableBytes { raw -> Int? in
            for (index, crc) in crcs.enumerated() {
                let actual = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[(index * cs)..<((index + 1) * cs)]))
                if actual != crc { return index }
            }
            return nil
        }
    }

    /// Allocation from the map only: data where a cluster is located, holes (reading as zeroes) where it is unmapped,
    /// and for clones the parent snapshot's allocation where the clone never wrote. Covers `[offset, ...)` without
    /// gaps; may stop before `offset + length` (at least one extent).
    func mapAllocation(
        offset: UInt64, length: UInt64, atEpoch epoch: UInt64?, in map: BlockMap
    ) async throws(VDError) -> [BlockExtent] {
        guard length > 0 else { return [BlockExtent(lengthBytes: 0, isHole: true, isZero: true)] }
        let cs = UInt64(clusterBytes)
        let end = offset + length
        let first = offset / cs
        let last = (end - 1) / cs
        var extents: [BlockExtent] = []
        func add(_ bytes: UInt64, hole: Bool) {
            guard bytes > 0 else { return }
            if let previous = extents.last, previous.isHole == hole {
                extents[extents.count - 1].lengthBytes += bytes
            } else {
                extents.append(BlockExtent(lengthBytes: bytes, isHole: hole, isZero: hole))
            }
        }
        if epoch == nil && parent == nil && last - first >= 1024 {
            // Large ranges of a plain volume: one scan of the written clusters.
            var position = offset
            for (address, value) in try map.writtenAddresses(from: first, to: last + 1) where value.location != nil {
                let start = max(address * cs, offset)
                add(start - position, hole: true)
                let stop = min((address + 1) * cs, end)
                add(stop - start, hole: false)
                position = stop
            }
            add(end - position, hole: true)
            return extents
        }
        // Otherwise cluster by cluster, at most 1024 clusters per call.
        let count = Int(min(last - first + 1, 1024))
        var values: [MapValue?] = []
        if let epoch {
            for index in 0..<count { values.append(try map.value(first + UInt64(index), atEpoch: epoch)) }
        } else {
            values = try map.current(from: first, count: count)
        }
        let stopAt = min(end, (first + UInt64(count)) * cs)
        var i = 0
        while i < count {
            let start = max((first + UInt64(i)) * cs, offset)
            if values[i] == nil, let parent {
                var j = i + 1
                while j < count, values[j] == nil { j += 1 }
                let runEnd = min((first + UInt64(j)) * cs, stopAt)
                var position = start
                while position < runEnd {
                    let sub = try await parent.allocation(offset: position, length: runEnd - position)
                    for extent in sub {
                        let take = min(extent.lengthBytes, runEnd - position)
                        add(take, hole: extent.isHole)
                        position += take
                        if position >= runEnd { break }
                    }
                }
                i = j
                continue
            }
            let stop = min((first + UInt64(i) + 1) * cs, stopAt)
            add(stop - start, hole: values[i]?.location == nil)
            i += 1
        }
        return extents
    }
}
