# NBD I/O for the torture test through libnbd (Debian's python3-libnbd): connections to exports, and batches of
# requests kept in flight together on several connections (aio_* calls driven by one select loop), which can be
# stopped part-way so the router can be killed while requests are in flight.

import select
import time

import nbd

from model import SECTOR


class IOFailure(Exception):
    """An NBD request failed or hung where it had to succeed."""


def connect(socket, export):
    handle = nbd.NBD()
    handle.set_handle_name(export)
    handle.set_export_name(export)
    try:
        handle.connect_unix(socket)
    except nbd.Error as error:
        raise IOFailure(f"cannot connect to NBD export {export}: {error}")
    return handle


def close(handle):
    """Disconnects politely when the connection still works; the handle is freed when the last reference goes."""
    try:
        if not handle.aio_is_dead() and not handle.aio_is_closed():
            handle.shutdown()
    except nbd.Error:
        pass


def read(handle, first, count):
    """Reads sectors synchronously, in pieces of at most 8 MiB."""
    pieces = []
    step = (8 << 20) // SECTOR
    for s in range(first, first + count, step):
        n = min(step, first + count - s)
        pieces.append(handle.pread(n * SECTOR, s * SECTOR))
    return b"".join(pieces)


class Request:
    """One NBD request of a batch: kind is write, zero, trim, read or flush."""

    def __init__(self, target, conn, kind, first=0, count=0, flags=0, wid=0, data=None):
        self.target, self.conn, self.kind = target, conn, kind
        self.first, self.count, self.flags, self.wid, self.data = first, count, flags, wid, data
        self.state = "new"  # new, sent, ok, failed
        self.error = None
        self.result = None
        self._buffer = None
        self._cookie = None

    def sectors(self):
        return range(self.first, self.first + self.count)

    def describe(self):
        flags = []
        if self.flags & nbd.CMD_FLAG_FUA:
            flags.append("fua")
        if self.flags & nbd.CMD_FLAG_NO_HOLE:
            flags.append("no_hole")
        text = f"{self.kind} {self.target}#{self.conn}"
        if self.kind != "flush":
            text += f" s{self.first}+{self.count}"
        if self.kind == "write":
            text += f" wid={self.wid}"
        return text + (" " + ",".join(flags) if flags else "")

    def submit(self, handle):
        offset, length = self.first * SECTOR, self.count * SECTOR
        if self.kind == "write":
            self._buffer = nbd.Buffer.from_bytearray(bytearray(self.data))
            self._cookie = handle.aio_pwrite(self._buffer, offset, flags=self.flags)
        elif self.kind == "read":
            self._buffer = nbd.Buffer(length)
            self._cookie = handle.aio_pread(self._buffer, offset)
        elif self.kind == "zero":
            self._cookie = handle.aio_zero(length, offset, flags=self.flags)
        elif self.kind == "trim":
            self._cookie = handle.aio_trim(length, offset, flags=self.flags)
        elif self.kind == "flush":
            self._cookie = handle.aio_flush()
        else:
            raise AssertionError(self.kind)
        self.state = "sent"

    def poll(self, handle):
        """Retires the request if it completed; returns whether it is done (ok or failed)."""
        if self.state != "sent":
            return True
        try:
            if not handle.aio_command_completed(self._cookie):
                return False
            self.state = "ok"
            if self.kind == "read":
                self.result = bytes(self._buffer.to_bytearray())
        except nbd.Error as error:
            self.state, self.error = "failed", str(error)
        self._buffer = None
        return True


class Batch:
    """Requests in flight together. `handles` maps (target, conn) to an nbd handle."""

    def __init__(self, requests, handles):
        self.requests = requests
        self.handles = handles

    def handle(self, request):
        return self.handles[(request.target, request.conn)]

    def submit(self):
        for request in self.requests:
            try:
                request.submit(self.handle(request))
            except nbd.Error as error:
                request.state, request.error = "failed", str(error)

    def pending(self):
        return [r for r in self.requests if not r.poll(self.handle(r))]

    def drive(self, until=None, timeout=60.0, tolerate_dead=False):
        """Runs the select loop until every request is done (or `until` of them are). A request still unanswered
        after `timeout` seconds is an IOFailure, unless tolerate_dead (after a kill, when every connection dies)."""
        deadline = time.monotonic() + timeout
        while True:
            pending = self.pending()
            done = len(self.requests) - len(pending)
            if not pending or (until is not None and done >= until):
                return
            handles = {id(h): h for h in (self.handle(r) for r in pending)}.values()
            readers, writers = {}, {}
            for h in handles:
                try:
                    if h.aio_is_dead() or h.aio_is_closed():
                        continue
                    direction = h.aio_get_direction()
                    if direction & nbd.AIO_DIRECTION_READ:
                        readers[h.aio_get_fd()] = h
                    if direction & nbd.AIO_DIRECTION_WRITE:
                        writers[h.aio_get_fd()] = h
                except nbd.Error:
                    continue
            if not readers and not writers:
                if tolerate_dead:
                    return
                raise IOFailure("NBD connections died with requests in flight: "
                                + "; ".join(r.describe() for r in pending))
            left = deadline - time.monotonic()
            if left <= 0:
                if tolerate_dead:
                    return
                raise IOFailure(f"NBD requests unanswered after {timeout:.0f} s: "
                                + "; ".join(r.describe() for r in pending))
            ready_r, ready_w, _ = select.select(list(readers), list(writers), [], min(left, 1.0))
            for fd in ready_r:
                try:
                    readers[fd].aio_notify_read()
                except nbd.Error:
                    pass
            for fd in ready_w:
                try:
                    writers[fd].aio_notify_write()
                except nbd.Error:
                    pass
