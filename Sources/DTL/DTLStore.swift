// A DTL peer's copy of the journals of the volumes it mirrors. One file per journal:
// DIR/<volume id>/<epoch, 16 hex>.<SCO, 16 hex>.jrn, written at the offsets the owner's journal has, so the copy is
// the journal itself (its batches verify as they do in recovery). Per volume:
//
// - the newest owner generation seen is kept durably (DIR/<volume id>/generation); appends of an older generation
//   are refused (`.busy`): a fenced owner cannot change what a taker will fetch;
// - the bytes held are bounded: an append past the bound is refused (`.noSpace`), which makes the owner treat the
//   peer as degraded, never stall;
// - `sync` makes every append before it durable (file data, then the directory for new files);
// - `trim` drops the journals of epochs the backend holds; `reset` drops all (an owner's catch-up starts with it);
//   `journals(after:)` hands the rest to a taker and fences the older generations from then on.
//
// Blocking file I/O: call from a thread pool, never from an event loop.

package import FlashIO
package import NIOCore
import Synchronization
package import VolumeCore

package final class DTLStore: Sendable {
    package let directory: String
    package let bytesPerVolumeMax: UInt64
    private let fs: any FileSystem

    private struct Journal {
        var file: FlashFile
        var epoch: UInt64
        var sco: SCONumber
        var lengthBytes: UInt64
    }

    private struct Volume {
        var generation: UInt64 = 0
        var journals: [SCONumber: Journal] = [:]
        /// Appends so far (a counter), and per journal the count at its last append not yet known durable: a sync
        /// removes an entry only if no append came after the count it synced (syncs of two connections may overlap).
        var appends: UInt64 = 0
        var unsynced: [SCONumber: UInt64] = [:]
        /// Journals created so far, and how many of those a directory sync covered.
        var namesCreated: UInt64 = 0
        var namesSynced: UInt64 = 0
        var bytes: UInt64 { journals.values.reduce(0) { $0 + $1.lengthBytes } }
    }

    private let volumes = Mutex<[VolumeID: Volume]>([:])

    package init(directory: String, bytesPerVolumeMax: UInt64, fs: any FileSystem) throws(VDError) {
        self.directory = directory
        self.bytesPerVolumeMax = bytesPerVolumeMax
        self.fs = fs
        try fs.makeDirectories(directory)
    }

    private func volumeDirectory(_ id: VolumeID) -> String { directory + "/" + id.description }

    private func journalName(epoch: UInt64, sco: SCONumber) -> String {
        SCONumber(epoch).hex + "." + sco.hex + ".jrn"
    }

    /// The volume's state, loaded from its directory the first time (a restarted peer keeps what it held).
    private func loaded(_ id: VolumeID, _ all: inout [VolumeID: Volume]) throws(VDError) -> Volume {
        if let known = all[id] { return known }
        var volume = Volume()
        let path = volumeDirectory(id)
        if let bytes = try fs.readWholeFile(path + "/generation") {
            volume.generation = try Self.decodeGeneration(bytes, what: path + "/generation")
        }
        for name in try fs.listDirectory(path) where name.hasSuffix(".jrn") {
            let parts = name.dropLast(4).split(separator: ".")
            guard parts.count == 2, let epoch = SCONumber(hex: parts[0]), let sco = SCONumber(hex: parts[1]) else {
                continue
            }
            let file = try fs.open(path + "/" + name)
            volume.journals[sco] = Journal(file: file, epoch: epoch.rawValue, sco: sco, lengthBytes: try file.size())
        }
        all[id] = volume
        return volume
    }

    static func encodeGeneration(_ generation: UInt64) -> [UInt8] {
        var b = ByteBuffer.zeroes(24)
        b.setBytes(Array("VDDTLGEN".utf8), at: 0)
        b.setLE(UInt32(1), at: 8)
        b.setLE(generation, at: 12)
        b.setLE(b.crc32c(0, 20), at: 20)
        return Array(b.readableBytesView)
    }

    static func decodeGeneration(_ bytes: [UInt8], what: String) throws(VDError) -> UInt64 {
        var b = ByteBufferAllocator().buffer(capacity: bytes.count)
        b.writeBytes(bytes)
        guard bytes.count == 24, b.hasMagic(Array("VDDTLGEN".utf8)), b.getLE(UInt32.self, at: 8) == 1,
            b.getLE(UInt32.self, at: 20) == b.crc32c(0, 20)
        else { throw VDError(.corrupt, "\(what): not a DTL generation record (or damaged)") }
        return b.getLE(UInt64.self, at: 12)
    }

    /// Checks that `generation` is not older than the newest seen for the volume, and records it durably if newer.
    private func admit(_ id: VolumeID, generation: UInt64, _ volume: inout Volume, what: String) throws(VDError) {
        guard generation >= volume.generation else {
            throw VDError(
                .busy, "volume \(id): \(what) of generation \(generation) after generation \(volume.generation): fenced"
            )
        }
        guard generation > volume.generation else { return }
        let path = volumeDirectory(id)
        try fs.makeDirectories(path)
        let record = Self.encodeGeneration(generation)
        try VDError.catching {
            try record.withUnsafeBytes { raw in
                try fs.replaceDurably(directory: path, name: "generation", with: raw)
            }
        }
        volume.generation = generation
    }

    /// Appends `bytes` at `offset` of the journal of `epoch` (SCO `sco`) of volume `id`, written by an owner of
    /// `generation`.
    package func append(
        volume id: VolumeID, generation: UInt64, epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: ByteBuffer
    ) throws(VDError) {
        try append(volume: id, generation: generation, epoch: epoch, sco: sco, offset: offset, bytes: DTLPayload(bytes))
    }

    /// Appends the bytes of `bytes` (one pwritev of its parts) at `offset` of the journal of `epoch` (SCO `sco`) of
    /// volume `id`, written by an owner of `generation`.
    package func append(
        volume id: VolumeID, generation: UInt64, epoch: UInt64, sco: SCONumber, offset: UInt64, bytes: DTLPayload
    ) throws(VDError) {
        let path = volumeDirectory(id)
        try volumes.withLock { (all) throws(VDError) in
            var volume = try loaded(id, &all)
            try admit(id, generation: generation, &volume, what: "an append")
            let end = offset + UInt64(bytes.readableBytes)
            let growth =
                end > (volume.journals[sco]?.lengthBytes ?? 0) ? end - (volume.journals[sco]?.lengthBytes ?? 0) : 0
            guard volume.bytes + growth <= bytesPerVolumeMax else {
                all[id] = volume
                throw VDError(
                    .noSpace,
                    "volume \(id): the DTL peer holds \(volume.bytes) bytes of \(bytesPerVolumeMax) allowed; this append needs \(growth) more"
                )
            }
            var journal: Journal
            if let existing = volume.journals[sco] {
                guard existing.epoch == epoch else {
                    all[id] = volume
                    throw VDError(
                        .corrupt, "volume \(id): SCO \(sco.hex) is the journal of epoch \(existing.epoch), not \(epoch)"
                    )
                }
                journal = existing
            } else {
                try fs.makeDirectories(path)
                let file = try fs.open(path + "/" + journalName(epoch: epoch, sco: sco), options: [.create])
                journal = Journal(file: file, epoch: epoch, sco: sco, lengthBytes: 0)
                volume.namesCreated += 1
            }
            try bytes.withUnsafeReadableParts { (parts) throws(VDError) in try journal.file.writev(parts, at: offset) }
            journal.lengthBytes = max(journal.lengthBytes, end)
            volume.journals[sco] = journal
            volume.appends += 1
            volume.unsynced[sco] = volume.appends
            all[id] = volume
        }
    }

    /// Makes every append to volume `id` before this call durable (for an owner of `generation`).
    package func sync(volume id: VolumeID, generation: UInt64) throws(VDError) {
        let path = volumeDirectory(id)
        let (pending, files, names) = try volumes.withLock {
            (all) throws(VDError) -> ([SCONumber: UInt64], [FlashFile], UInt64?) in
            var volume = try loaded(id, &all)
            try admit(id, generation: generation, &volume, what: "a sync")
            all[id] = volume
            let files = volume.unsynced.keys.compactMap { volume.journals[$0]?.file }
            return (volume.unsynced, files, volume.namesCreated > volume.namesSynced ? volume.namesCreated : nil)
        }
        for file in files { try file.dataSync() }
        if names != nil { try fs.syncDirectory(path) }
        volumes.withLock { all in
            guard var volume = all[id] else { return }
            for (sco, count) in pending where volume.unsynced[sco] == count { volume.unsynced[sco] = nil }
            if let names { volume.namesSynced = max(volume.namesSynced, names) }
            all[id] = volume
        }
    }

    /// Drops the journals of every epoch through `epoch` (the backend holds them; the owner is of `generation`).
    package func trim(volume id: VolumeID, generation: UInt64, throughEpoch epoch: UInt64) throws(VDError) {
        try drop(volume: id, generation: generation, what: "a trim") { $0.epoch <= epoch }
    }

    /// Drops every journal of volume `id`: its owner (of `generation`) is about to send again all the backend lacks.
    package func reset(volume id: VolumeID, generation: UInt64) throws(VDError) {
        try drop(volume: id, generation: generation, what: "a reset") { _ in true }
    }

    private func drop(
        volume id: VolumeID, generation: UInt64, what: String, where condition: (Journal) -> Bool
    ) throws(VDError) {
        let path = volumeDirectory(id)
        let gone = try volumes.withLock { (all) throws(VDError) -> [Journal] in
            var volume = try loaded(id, &all)
            try admit(id, generation: generation, &volume, what: what)
            let gone = volume.journals.values.filter(condition)
            for journal in gone {
                volume.journals[journal.sco] = nil
                volume.unsynced[journal.sco] = nil
            }
            all[id] = volume
            return gone
        }
        // The files are not closed here: a sync of another connection may be using one (each closes when its last
        // user lets go of it).
        for journal in gone {
            try fs.unlinkIfPresent(path + "/" + journalName(epoch: journal.epoch, sco: journal.sco))
        }
        if !gone.isEmpty { try fs.syncDirectory(path) }
    }

    /// The journals of every epoch after `epoch`, oldest first, each whole, for a taker of `generation`: from now
    /// on appends of older generations are refused (the owner being taken over cannot change them any more).
    package func journals(
        volume id: VolumeID, generation: UInt64, afterEpoch epoch: UInt64
    ) throws(VDError) -> [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)] {
        let held = try volumes.withLock { (all) throws(VDError) -> [Journal] in
            var volume = try loaded(id, &all)
            try admit(id, generation: generation, &volume, what: "a fetch")
            all[id] = volume
            return volume.journals.values.filter { $0.epoch > epoch }.sorted {
                ($0.epoch, $0.sco) < ($1.epoch, $1.sco)
            }
        }
        var result: [(epoch: UInt64, sco: SCONumber, bytes: ByteBuffer)] = []
        for journal in held {
            let length = Int(journal.lengthBytes)
            var buffer = ByteBufferAllocator().buffer(capacity: length)
            let read = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) {
                (raw) throws(VDError) -> Int in
                try journal.file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]), at: 0)
            }
            guard read == length else {
                throw VDError(.corrupt, "volume \(id): the DTL copy of SCO \(journal.sco.hex) is shorter than written")
            }
            result.append((journal.epoch, journal.sco, buffer))
        }
        return result
    }

    /// Bytes held for volume `id`, and the newest generation seen.
    package func usage(volume id: VolumeID) throws(VDError) -> (bytes: UInt64, generation: UInt64) {
        try volumes.withLock { (all) throws(VDError) -> (UInt64, UInt64) in
            let volume = try loaded(id, &all)
            return (volume.bytes, volume.generation)
        }
    }

    /// Closes every file.
    package func close() {
        volumes.withLock { all in
            for volume in all.values { for journal in volume.journals.values { journal.file.close() } }
            all = [:]
        }
    }
}
