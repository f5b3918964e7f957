// EventLoopTaskExecutor
// A Swift concurrency TaskExecutor that runs jobs on a NIO event loop, so a task started with this executor as its
// preference runs its nonisolated async code (our device calls) on the connection's own event loop thread: no hop to
// the global pool and back per request. Device code isolated to an actor still runs on that actor's executor; the
// task comes back to the event loop afterwards.
//
// Faults it must survive: jobs enqueued from any thread (execute is thread-safe), and a loop that is shutting down
// (execute then drops the job; the server stops its loops only after its connections are gone).

import NIOCore

final class EventLoopTaskExecutor: TaskExecutor {
    let eventLoop: any EventLoop

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}
