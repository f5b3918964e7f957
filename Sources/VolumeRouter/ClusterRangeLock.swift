// Serializes writes that touch the same clusters. A partial-cluster write is a read-modify-write; without this, two
// in-flight writes to different sectors of one cluster could each read the old cluster and the second would undo the
// first. Non-overlapping writes never wait. Waiters are granted in arrival order among those that no longer overlap.

import Synchronization
import VolumeCore

final class ClusterRangeLock: Sendable {
    private struct Waiter {
        var range: ClosedRange<ClusterAddress>
        var continuation: CheckedContinuation<Void, Never>
    }

    private struct State {
        var held: [ClosedRange<ClusterAddress>] = []
        var waiters: [Waiter] = []

        func isFree(_ range: ClosedRange<ClusterAddress>) -> Bool {
            !held.contains { $0.overlaps(range) }
        }
    }

    private let state = Mutex(State())

    func acquire(_ range: ClosedRange<ClusterAddress>) async {
        let granted = state.withLock { state -> Bool in
            guard state.isFree(range), !state.waiters.contains(where: { $0.range.overlaps(range) }) else {
                return false
            }
            state.held.append(range)
            return true
        }
        if granted { return }
        await withCheckedContinuation { continuation in
            let grantedNow = state.withLock { state -> Bool in
                if state.isFree(range) && !state.waiters.contains(where: { $0.range.overlaps(range) }) {
                    state.held.append(range)
                    return true
                }
                state.waiters.append(Waiter(range: range, continuation: continuation))
                return false
            }
            if grantedNow { continuation.resume() }
        }
    }

    func release(_ range: ClosedRange<ClusterAddress>) {
        let wake = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            if let index = state.held.firstIndex(of: range) { state.held.remove(at: index) }
            var woken: [CheckedContinuation<Void, Never>] = []
            var blocked: [ClosedRange<ClusterAddress>] = []
            var remaining: [Waiter] = []
            for waiter in state.waiters {
                if state.isFree(waiter.range) && !blocked.contains(where: { $0.overlaps(waiter.range) }) {
                    state.held.append(waiter.range)
                    woken.append(waiter.continuation)
                } else {
                    blocked.append(waiter.range)
                    remaining.append(waiter)
                }
            }
            state.waiters = remaining
            return woken
        }
        for continuation in wake { continuation.resume() }
    }
}
