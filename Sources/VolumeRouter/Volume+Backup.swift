// Incremental backup streams (format: VolumeCore/Records/DiffStream.swift, docs/backup.md): export the changed extents
// between two versions with their data; import them onto another volume.
//
// Export writes FILE.partial, syncs it and renames it, so a file under the final name is always complete; the
// snapshot read must still exist when the export ends (a deletion during it could have let the scrubber reclaim what
// a later read looked up), else the export fails. Import verifies the whole stream before it writes anything, then
// applies it and flushes: a damaged stream changes nothing.

import FlashIO
import FoundationEssentials
import NIOCore
package import VolumeCore

/// What an export or an import moved.
package struct DiffTransferSummary: Codable, Sendable, Hashable {
    package var extents: Int
    package var dataBytes: UInt64
    package var zeroBytes: UInt64
    package var streamBytes: UInt64
}

extension Volume {
    /// Writes the extents that differ between `base` and snapshot `to` (with `to`'s data) to `path`.
    package func exportDiff(
        from base: DiffBase, fromName: String?, fromSnapshot: SnapshotRecord? = nil, to snapshot: SnapshotRecord,
        path: String
    ) async throws(VDError) -> DiffTransferSummary {
        let extents = try await diff(from: base, to: snapshot.epoch)
        let info = DiffStreamInfo(
            volume: config.name.rawValue, volumeID: "\(config.id)", sizeBytes: config.sizeBytes,
            clusterSizeBytes: config.clusterSizeBytes, from: fromName, to: snapshot.name)
        let (header, headerCRC) = try DiffStream.encodeHeader(info)
        let partial = path + ".partial"
        let file = try await blocking { () throws(VDError) -> FlashFile in
            try FlashFile(path: partial, options: [.create, .truncate])
        }
        defer { file.close() }
        var position: UInt64 = 0
        func append(_ bytes: [UInt8]) async throws(VDError) {
            let at = position
            try await blocking { () throws(VDError) in try file.write(bytes, at: at) }
            position += UInt64(bytes.count)
        }
        var summary = DiffTransferSummary(extents: extents.count, dataBytes: 0, zeroBytes: 0, streamBytes: 0)
        do throws(VDError) {
            try await append(header)
            var chain = headerCRC
            var records: UInt64 = 0
            for extent in extents {
                if extent.zero {
                    let (bytes, crc) = DiffStream.encodeRecord(
                        .init(kind: .zero, offset: extent.offset, length: extent.length), chain: chain)
                    try await append(bytes)
                    chain = crc
                    records += 1
                    summary.zeroBytes += extent.length
                    continue
                }
                var offset = extent.offset
                while offset < extent.offset + extent.length {
                    let length = min(UInt64(DiffStream.payloadBytesMax), extent.offset + extent.length - offset)
                    let data = try await read(offset: offset, length: UInt32(length), atEpoch: snapshot.epoch)
                    let payload = Array(data.readableBytesView)
                    let (bytes, crc) = DiffStream.encodeRecord(
                        .init(
                            kind: .data, offset: offset, length: length, payloadCRC: CRC32C.checksum(payload)),
                        chain: chain)
                    try await append(bytes + payload)
                    chain = crc
                    records += 1
                    summary.dataBytes += length
                    offset += length
                }
            }
            let (end, _) = DiffStream.encodeRecord(
                .init(kind: .end, offset: records, length: summary.dataBytes), chain: chain)
            try await append(end)
            for kept in [fromSnapshot, snapshot].compactMap({ $0 })
            where !snapshotTable.snapshots.contains(where: { $0.id == kept.id }) {
                throw VDError(.notFound, "snapshot \(kept.name) of \(config.name) was deleted during the export")
            }
            let directory: String
            if let slash = path.lastIndex(of: "/") {
                directory = slash == path.startIndex ? "/" : String(path[..<slash])
            } else {
                directory = "."
            }
            try await blocking { () throws(VDError) in
                try file.sync()
                try Syscall.rename(partial, path)
                try Syscall.syncDirectory(directory)
            }
            summary.streamBytes = position
        } catch {
            try? Syscall.unlinkIfPresent(partial)
            throw error
        }
        return summary
    }

    /// Verifies the stream at `path` whole, then applies it to this volume and flushes.
    package func importDiff(
        path: String, force: Bool = false
    ) async throws(VDError) -> (info: DiffStreamInfo, summary: DiffTransferSummary) {
        let file = try await blocking { () throws(VDError) -> FlashFile in
            try FlashFile(path: path, options: [.readOnly])
        }
        defer { file.close() }
        let size = try file.size()
        func readBytes(_ count: Int, at offset: UInt64) async throws(VDError) -> [UInt8] {
            guard offset + UInt64(count) <= size else {
                throw VDError(.corrupt, "\(path): the stream ends early (truncated at \(size) bytes)")
            }
            return try await blocking { () throws(VDError) -> [UInt8] in try file.readExactly(count, at: offset) }
        }
        let start = try await readBytes(
            min(Int(size), DiffStream.fixedHeaderBytes + DiffStream.infoBytesMax + 4), at: 0)
        guard let (info, headerCRC, headerLength) = try DiffStream.decodeHeader(start, what: path) else {
            throw VDError(.corrupt, "\(path): the stream ends inside its header")
        }
        guard info.sizeBytes == config.sizeBytes else {
            throw VDError(
                .invalidArgument,
                "\(path) is a diff of a volume of \(info.sizeBytes) bytes; volume \(config.name) has \(config.sizeBytes)"
            )
        }
        if !force {
            // The volume must hold the stream's base, or the result would be neither version.
            if let from = info.from {
                let baseName = from.split(separator: "@").last.map(String.init) ?? from
                guard let base = snapshotTable.snapshot(named: baseName) else {
                    throw VDError(
                        .invalidArgument,
                        "\(path) is the increment \(from) -> \(info.to) of \(info.volume); volume \(config.name) has no snapshot \(baseName) to apply it to (restore the earlier stream with --snapshot \(baseName), or use --force)"
                    )
                }
                guard try await diff(from: .epoch(base.epoch), to: nil).isEmpty else {
                    throw VDError(
                        .invalidArgument,
                        "volume \(config.name) changed since its snapshot \(baseName): applying the increment \(from) -> \(info.to) would not give \(info.to) (roll back to \(baseName) first, or use --force)"
                    )
                }
            } else {
                guard try await diff(from: .nothing, to: nil).isEmpty else {
                    throw VDError(
                        .invalidArgument,
                        "\(path) is a full copy of \(info.volume)@\(info.to); volume \(config.name) is not empty (a full copy does not clear what it does not hold; use an empty volume, or --force)"
                    )
                }
            }
        }

        /// One pass over the records: `apply` false only verifies.
        func pass(apply: Bool) async throws(VDError) -> DiffTransferSummary {
            var summary = DiffTransferSummary(extents: 0, dataBytes: 0, zeroBytes: 0, streamBytes: size)
            var chain = headerCRC
            var position = UInt64(headerLength)
            var records: UInt64 = 0
            while true {
                let (record, crc) = try DiffStream.decodeRecord(
                    try await readBytes(DiffStream.recordBytes, at: position), chain: chain, what: path)
                position += UInt64(DiffStream.recordBytes)
                chain = crc
                if record.kind == .end {
                    guard record.offset == records, record.length == summary.dataBytes else {
                        throw VDError(
                            .corrupt,
                            "\(path): the end record counts \(record.offset) records and \(record.length) bytes; the stream has \(records) and \(summary.dataBytes)"
                        )
                    }
                    guard position == size else {
                        throw VDError(.corrupt, "\(path): \(size - position) bytes after the end record")
                    }
                    return summary
                }
                let (end, overflow) = record.offset.addingReportingOverflow(record.length)
                guard !overflow, end <= config.sizeBytes, record.length > 0 else {
                    throw VDError(.corrupt, "\(path): extent \(record.offset)+\(record.length) is outside the volume")
                }
                records += 1
                summary.extents += 1
                switch record.kind {
                case .zero:
                    summary.zeroBytes += record.length
                    var offset = record.offset
                    while apply && offset < end {
                        let length = min(end - offset, UInt64(Limits.requestBytesMax))
                        try await writeZeroes(offset: offset, length: UInt32(length), fua: false, mayUnmap: true)
                        offset += length
                    }
                case .data:
                    guard record.length <= UInt64(DiffStream.payloadBytesMax) else {
                        throw VDError(.corrupt, "\(path): a data record of \(record.length) bytes")
                    }
                    let payload = try await readBytes(Int(record.length), at: position)
                    guard CRC32C.checksum(payload) == record.payloadCRC else {
                        throw VDError(.corrupt, "\(path): data checksum mismatch at volume offset \(record.offset)")
                    }
                    position += record.length
                    summary.dataBytes += record.length
                    if apply { try await write(offset: record.offset, data: ByteBuffer(bytes: payload), fua: false) }
                case .end:
                    preconditionFailure("handled above")
                }
            }
        }
        _ = try await pass(apply: false)
        guard try file.size() == size else {
            throw VDError(.busy, "\(path) changed while it was verified (still being copied?); nothing was applied")
        }
        let summary = try await pass(apply: true)
        try await flush()
        return (info, summary)
    }
}
