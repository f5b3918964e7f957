// What a clone reads through where it never wrote: its parent volume as it was at the snapshot the clone was made
// from. Either the parent `Volume` open on this router, or, when another router owns the parent, a
// `BackendParentView` of the parent's namespace on the backend (the parent's TLogs and SCOs up to the snapshot are
// immutable there; the view follows the owner's scrubs by replaying again when an SCO it points at is gone).

import BlockMap
import NIOCore
import Synchronization
package import VolumeCore

/// What a cluster reads as in one version: zeroes, or the bytes at a place (volume, SCO, offset).
package struct ClusterContent: Hashable, Sendable {
    var volume: VolumeID
    var location: ClusterLocation?

    func sameBytes(as other: ClusterContent) -> Bool {
        switch (location, other.location) {
        case (nil, nil): true
        case (let a?, let b?): volume == other.volume && a.sco == b.sco && a.offset == b.offset
        default: false
        }
    }
}

/// A volume as a clone's parent: read at an epoch (a snapshot of it).
package protocol CloneParentSource: AnyObject, Sendable {
    var name: VolumeName { get }
    /// The parent's snapshot table (where the clone's snapshot and registration are looked up at open).
    var snapshotTable: SnapshotTable { get }
    func readSparse(offset: UInt64, length: UInt32, atEpoch epoch: UInt64) async throws(VDError) -> SparseData
    func allocation(offset: UInt64, length: UInt64, atEpoch epoch: UInt64?) async throws(VDError) -> [BlockExtent]
    /// Addresses in `[start, end)` the parent may hold data for, at any epoch (a superset).
    func addressesPossiblyWithData(
        from start: ClusterAddress, to end: ClusterAddress
    ) throws(VDError)
        -> [ClusterAddress]
    /// What `address` reads as at the end of `epoch` (nil: now).
    func content(_ address: ClusterAddress, atEpoch epoch: UInt64?) throws(VDError) -> ClusterContent
    /// Releases what the source holds for the clone (a backend view's temporary map); the open parent volume
    /// does nothing.
    func detach()
}

/// A clone's link to its parent at the snapshot's epoch. The source can be replaced while the clone is open (the
/// parent moves to another router: the clone goes on reading through a backend view); a call that failed on a
/// source replaced meanwhile is made again on the new one.
package final class ParentLink: Sendable {
    package let epoch: UInt64
    private let current: Mutex<any CloneParentSource>

    package init(source: any CloneParentSource, epoch: UInt64) {
        self.epoch = epoch
        current = Mutex(source)
    }

    package var source: any CloneParentSource { current.withLock { $0 } }

    /// True when the clone reads through a backend view (its parent is owned elsewhere).
    package var readsThroughBackend: Bool { source is BackendParentView }

    /// Replaces the source; the previous one is detached.
    package func replace(with source: any CloneParentSource) {
        let previous = current.withLock { current in
            let previous = current
            current = source
            return previous
        }
        if previous !== source { previous.detach() }
    }

    package func detach() { source.detach() }

    func readSparse(offset: UInt64, length: UInt32) async throws(VDError) -> SparseData {
        let used = source
        do {
            return try await used.readSparse(offset: offset, length: length, atEpoch: epoch)
        } catch {
            let now = source
            guard now !== used else { throw error }
            return try await now.readSparse(offset: offset, length: length, atEpoch: epoch)
        }
    }

    func allocation(offset: UInt64, length: UInt64) async throws(VDError) -> [BlockExtent] {
        let used = source
        do {
            return try await used.allocation(offset: offset, length: length, atEpoch: epoch)
        } catch {
            let now = source
            guard now !== used else { throw error }
            return try await now.allocation(offset: offset, length: length, atEpoch: epoch)
        }
    }

    func addressesPossiblyWithData(
        from start: ClusterAddress, to end: ClusterAddress
    ) throws(VDError) -> [ClusterAddress] {
        let used = source
        do {
            return try used.addressesPossiblyWithData(from: start, to: end)
        } catch {
            let now = source
            guard now !== used else { throw error }
            return try now.addressesPossiblyWithData(from: start, to: end)
        }
    }

    func content(_ address: ClusterAddress) throws(VDError) -> ClusterContent {
        let used = source
        do {
            return try used.content(address, atEpoch: epoch)
        } catch {
            let now = source
            guard now !== used else { throw error }
            return try now.content(address, atEpoch: epoch)
        }
    }
}

extension Volume: CloneParentSource {
    package func detach() {}
}
