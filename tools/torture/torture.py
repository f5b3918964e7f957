# Process-level torture test of VolumeDriver (run it through tools/torture.sh). Starts `vd serve` on a temporary
# data directory with one 32 MiB volume, then runs a seeded random sequence of operations -- NBD I/O on the volume
# and its clones (several requests in flight on two connections), snapshots, rollbacks, clones, scrubs (killed or
# under load), kill -9 and SIGTERM of the router, restarts from the backend alone, `vd check` -- and checks every
# export (volumes, clones, read-only snapshot exports) against an exact model after each step that matters.
# Prints one trace line per operation; on the first mismatch prints what differs and exits 1.

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

import nbd

from model import SECTOR, Disk, payload, report
from nbdio import Batch, IOFailure, Request, close, connect, read
from vdproc import VD, VDFailure, wait_until

VOLUME_BYTES = 32 << 20
SECTORS = VOLUME_BYTES // SECTOR
CLUSTER = 8                # sectors per 4 KiB cluster (the default cluster size)
HOT = 4096                 # most I/O goes to the first 2 MiB, so SCOs get overwritten and scrubs find work
MAX_SNAPSHOTS = 5          # per volume
MAX_CLONES = 4
TRACE_TAIL = 30

# Operation weights (percent-ish).
OPERATIONS = [
    ("io", 26), ("batch", 17), ("read", 6), ("flush", 2), ("snapshot", 7), ("delete_snapshot", 5),
    ("rollback", 3), ("clone", 3), ("scrub", 8), ("kill", 3), ("restart_from_backend", 3), ("check", 3),
    ("verify", 2),
]


class Mismatch(Exception):
    """What a volume, clone or snapshot read differs from the model (or VolumeDriver broke a promise)."""

    def __init__(self, message, details=()):
        super().__init__(message)
        self.details = list(details)


class Volume:
    """A volume or clone: its model, its snapshots (frozen models, in creation order) and who reads through them."""

    def __init__(self, name, disk, parent=None):
        self.name = name
        self.disk = disk
        self.parent = parent            # (volume, snapshot) for a clone
        self.snapshots = {}             # name -> Disk
        self.clones = {}                # snapshot name -> [clone names]

    def has_clones(self, snapshot):
        return bool(self.clones.get(snapshot))


class Torture:
    def __init__(self, seed, vd, trace_path):
        self.seed = seed
        self.rng = random.Random(seed)
        self.vd = vd
        self.volumes = {}
        self.handles = {}           # (volume, connection 0 or 1) -> nbd handle
        self.origins = [None]       # write id -> index of the operation that issued it
        self.index = 0
        self.trace = []
        self.trace_file = open(trace_path, "w")
        self.counters = {"snapshot": 0, "clone": 0}
        self.started = time.monotonic()
        self.verifications = 0

    # ---- trace and model helpers

    def log(self, text):
        line = f"[{self.index:4d} {time.monotonic() - self.started:6.1f}s] {text}"
        self.trace.append(line)
        self.trace_file.write(line + "\n")
        self.trace_file.flush()
        print(line, flush=True)

    def new_wid(self):
        self.origins.append(self.index)
        return len(self.origins) - 1

    def origin(self, wid):
        return f"op {self.origins[wid]}" if 0 < wid < len(self.origins) else "unknown write"

    def pick_volume(self):
        names = sorted(self.volumes)
        return self.rng.choices(names, [3 if n == "vol" else 1 for n in names])[0]

    def all_snapshots(self):
        return [(v.name, s) for v in self.volumes.values() for s in v.snapshots]

    # ---- connections

    def connect_volume(self, name):
        for conn in (0, 1):
            self.handles[(name, conn)] = connect(self.vd.socket, name)

    def disconnect_volume(self, name):
        for conn in (0, 1):
            handle = self.handles.pop((name, conn), None)
            if handle is not None:
                close(handle)

    def reconnect_all(self):
        for name in list(self.volumes):
            self.disconnect_volume(name)
            self.connect_volume(name)

    # ---- requests and the model

    def random_extent(self):
        r = self.rng.random()
        count = (self.rng.randint(1, 16) if r < 0.55 else
                 self.rng.randint(17, 128) if r < 0.9 else self.rng.randint(129, 512))
        first = self.rng.randrange(HOT) if self.rng.random() < 0.75 else self.rng.randrange(SECTORS)
        if self.rng.random() < 0.3:  # whole clusters now and then
            first -= first % CLUSTER
            count = -(-count // CLUSTER) * CLUSTER
        return min(first, SECTORS - count), count

    def random_request(self, volume, busy, kinds=None):
        """A request on `volume` touching no sector of `busy` (volume -> set of sectors in flight), or None."""
        kinds = kinds or [("write", 45), ("fua", 10), ("zero", 8), ("zero_nohole", 6), ("trim", 9), ("read", 17),
                          ("flush", 5)]
        kind = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        conn = self.rng.randrange(2)
        if kind == "flush":
            return Request(volume, conn, "flush")
        taken = busy.setdefault(volume, set())
        for _ in range(20):
            first, count = self.random_extent()
            if taken.isdisjoint(range(first, first + count)):
                break
        else:
            return None
        taken.update(range(first, first + count))
        flags = 0
        if kind == "fua":
            kind, flags = "write", nbd.CMD_FLAG_FUA
        elif kind == "zero_nohole":
            kind, flags = "zero", nbd.CMD_FLAG_NO_HOLE
        elif kind in ("zero", "trim") and self.rng.random() < 0.2:
            flags = nbd.CMD_FLAG_FUA
        request = Request(volume, conn, kind, first, count, flags)
        if kind == "write":
            request.wid = self.new_wid()
            request.data = payload(request.wid, first, count)
        return request

    @staticmethod
    def trimmed(request):
        """TRIM unmaps the whole clusters in its range (they read as zeroes) and leaves partial clusters as they were."""
        start = -(-request.first // CLUSTER) * CLUSTER
        end = (request.first + request.count) // CLUSTER * CLUSTER
        return start, max(0, end - start)

    def effect(self, request):
        """(first, count, wid) the request stores, or None for reads and flushes."""
        if request.kind == "write":
            return request.first, request.count, request.wid
        if request.kind == "zero":
            return request.first, request.count, 0
        if request.kind == "trim":
            first, count = self.trimmed(request)
            return first, count, 0
        return None

    def apply(self, request):
        """Takes a replied request into the model (a read is compared with it)."""
        disk = self.volumes[request.target].disk
        if request.kind == "read":
            differences = disk.compare(request.first, request.result)
            if differences:
                raise Mismatch(f"read of {request.target} sectors {request.first}+{request.count} "
                               f"(connection {request.conn}) differs from the model", report(differences, self.origin))
            return
        change = self.effect(request)
        if change:
            disk.set(*change)

    def apply_unreplied(self, request):
        """A request in flight when the router died: each sector it touches may be old or new."""
        change = self.effect(request)
        if change and request.target in self.volumes:
            self.volumes[request.target].disk.allow(*change)

    def run_requests(self, requests):
        batch = Batch(requests, self.handles)
        batch.submit()
        batch.drive()
        for request in requests:
            if request.state != "ok":
                raise Mismatch(f"NBD request failed: {request.describe()}: {request.error}")
            self.apply(request)

    def random_batch(self, targets, size):
        busy = {}
        requests = []
        for _ in range(size):
            request = self.random_request(self.rng.choice(targets), busy)
            if request:
                requests.append(request)
        return requests

    # ---- verification

    def verify_export(self, export, disk, handle=None, resolve=False):
        own = handle is None
        if own:
            handle = connect(self.vd.socket, export)
        try:
            data = read(handle, 0, SECTORS)
        except nbd.Error as error:
            raise Mismatch(f"reading export {export} failed: {error}")
        finally:
            if own:
                close(handle)
        differences = disk.compare(0, data, resolve=resolve)
        if differences:
            raise Mismatch(f"export {export} differs from the model", report(differences, self.origin))

    def family(self, name):
        """`name` and every clone that reads through it, directly or through other clones."""
        names = [name]
        for volume in self.volumes.values():
            if volume.parent and volume.parent[0] == name:
                names += self.family(volume.name)
        return names

    def verify_all(self, why, resolve=False, only=None):
        """Every volume and clone (or those named in `only`), and their snapshot exports, read whole against the
        model."""
        started = time.monotonic()
        exports = 0
        for volume in self.volumes.values():
            if only is not None and volume.name not in only:
                continue
            # Alternate connections without drawing from the generator: how often this runs depends on timing
            # (a scrub killed or finished first), and the sequence of choices must not.
            self.verifications += 1
            conn = self.verifications % 2
            self.verify_export(volume.name, volume.disk, self.handles[(volume.name, conn)], resolve=resolve)
            exports += 1
            for snapshot, disk in volume.snapshots.items():
                self.verify_export(f"{volume.name}@{snapshot}", disk)
                exports += 1
        self.log(f"  verified {exports} export(s) after {why} ({time.monotonic() - started:.1f} s)")

    def check(self, name, why):
        """`vd check NAME` must find no problem; orphans (left by killed scrubs, or waiting for deletion) are listed
        in the trace only. Returns the report."""
        result = self.vd.run("check", name, "--json", check=False)
        try:
            found = json.loads(result.stdout)
        except ValueError:
            raise Mismatch(f"`vd check {name}` ({why}) exited {result.returncode} without a JSON report: "
                           f"{(result.stderr + result.stdout).strip()}")
        if found.get("problems"):
            raise Mismatch(f"`vd check {name}` ({why}) reports problems", ["  " + p for p in found["problems"]])
        return found

    def expect_snapshot_list(self, name):
        listed = json.loads(self.vd.run("snapshot", "list", name, "--json").stdout)
        names = sorted(s["name"] for s in listed)
        if names != sorted(self.volumes[name].snapshots):
            raise Mismatch(f"`vd snapshot list {name}` shows {names}, the model has {sorted(self.volumes[name].snapshots)}")

    # ---- background load while a vd command runs

    @contextlib.contextmanager
    def side_generator(self):
        """Load whose amount depends on timing draws from its own generator, seeded from the main one, so the main
        sequence of choices (and so every later operation) stays the same for a seed."""
        main = self.rng
        self.rng = random.Random(main.getrandbits(64))
        try:
            yield
        finally:
            self.rng = main

    def load_while(self, process, targets, timeout=180):
        """Random batches on `targets` while `process` runs (at most a random budget of them, so a slow command does
        not turn into a flood of writes); returns the completed requests."""
        done = []
        deadline = time.monotonic() + timeout
        first_wid = len(self.origins)
        with self.side_generator():
            budget = self.rng.randint(10, 120)
            while process.poll() is None and time.monotonic() < deadline and budget > 0:
                requests = self.random_batch(targets, self.rng.randint(1, 6))
                self.run_requests(requests)
                done.extend(requests)
                budget -= 1
        self.log(f"  load on {','.join(targets)}: {len(done)} request(s), wids {first_wid}..{len(self.origins) - 1}"
                 + ("" if process.poll() is None else " (the command finished first)"))
        return done

    def finish(self, process, what, timeout=180):
        try:
            out, err = process.communicate(timeout=timeout)
        except Exception:
            process.kill()
            raise VDFailure(f"`{what}` did not finish within {timeout} s")
        if process.returncode != 0:
            raise VDFailure(f"`{what}` exited {process.returncode}: {(err + out).strip()}")
        return out

    # ---- operations

    def op_io(self):
        volume = self.pick_volume()
        kinds = [("write", 55), ("fua", 15), ("zero", 10), ("zero_nohole", 8), ("trim", 12)]
        request = self.random_request(volume, {}, kinds)
        self.run_requests([request])
        text = request.describe()
        if self.rng.random() < 0.3:
            check = Request(volume, self.rng.randrange(2), "read", request.first, request.count)
            self.run_requests([check])
            text += ", read back"
        self.log(text)

    def op_batch(self):
        names = sorted(self.volumes)
        targets = [self.pick_volume()] if self.rng.random() < 0.6 else names
        requests = self.random_batch(targets, self.rng.randint(2, 10))
        self.log("batch: " + "; ".join(r.describe() for r in requests))
        self.run_requests(requests)

    def op_read(self):
        snapshots = self.all_snapshots()
        if snapshots and self.rng.random() < 0.3:
            volume, snapshot = self.rng.choice(snapshots)
            first, count = self.random_extent()
            export = f"{volume}@{snapshot}"
            handle = connect(self.vd.socket, export)
            try:
                data = read(handle, first, count)
            finally:
                close(handle)
            self.log(f"read {export} s{first}+{count}")
            differences = self.volumes[volume].snapshots[snapshot].compare(first, data)
            if differences:
                raise Mismatch(f"snapshot export {export} differs from the model", report(differences, self.origin))
            return
        volume = self.pick_volume()
        request = self.random_request(volume, {}, [("read", 1)])
        self.log(request.describe())
        self.run_requests([request])

    def op_flush(self):
        volume = self.pick_volume()
        request = Request(volume, self.rng.randrange(2), "flush")
        self.log(request.describe())
        self.run_requests([request])

    def op_snapshot(self):
        volume = self.volumes[self.pick_volume()]
        if len(volume.snapshots) >= MAX_SNAPSHOTS:
            return self.op_delete_snapshot()
        self.counters["snapshot"] += 1
        name = f"s{self.counters['snapshot']}"
        loaded = self.rng.random() < 0.5
        self.log(f"snapshot create {volume.name}@{name}" + (" while writing to it" if loaded else ""))
        frozen = volume.disk.copy()
        process = self.vd.spawn("snapshot", "create", volume.name, name)
        if loaded:
            # Requests that ran meanwhile may or may not be in the snapshot: each sector they touched may hold
            # the value before or the value after; the read of the new export below settles which.
            for request in self.load_while(process, [volume.name]):
                change = self.effect(request)
                if change:
                    frozen.allow(*change)
        self.finish(process, f"vd snapshot create {volume.name} {name}")
        volume.snapshots[name] = frozen
        self.verify_export(f"{volume.name}@{name}", frozen, resolve=True)

    def op_delete_snapshot(self):
        snapshots = self.all_snapshots()
        if not snapshots:
            return self.op_snapshot()
        name, snapshot = self.rng.choice(snapshots)
        volume = self.volumes[name]
        if volume.has_clones(snapshot):
            self.log(f"snapshot delete {name}@{snapshot} (has clones {volume.clones[snapshot]}: must be refused)")
            result = self.vd.run("snapshot", "delete", name, snapshot, check=False)
            if result.returncode == 0:
                raise Mismatch(f"`vd snapshot delete {name} {snapshot}` succeeded although clones read through it")
            self.expect_snapshot_list(name)
            return
        loaded = self.rng.random() < 0.6
        self.log(f"snapshot delete {name}@{snapshot}" + (" under load" if loaded else ""))
        process = self.vd.spawn("snapshot", "delete", name, snapshot)
        if loaded:
            self.load_while(process, sorted(self.volumes))
        self.finish(process, f"vd snapshot delete {name} {snapshot}")
        del volume.snapshots[snapshot]
        try:
            close(connect(self.vd.socket, f"{name}@{snapshot}"))
            raise Mismatch(f"the export {name}@{snapshot} still accepts connections after the snapshot was deleted")
        except IOFailure:
            pass
        for other, disk in volume.snapshots.items():
            self.verify_export(f"{name}@{other}", disk)
        self.verify_export(name, volume.disk, self.handles[(name, 0)])
        self.log(f"  verified {name} and its {len(volume.snapshots)} other snapshot(s)")

    def op_rollback(self):
        candidates = [(v, s) for v, s in self.all_snapshots()]
        if not candidates:
            return self.op_snapshot()
        name, snapshot = self.rng.choice(candidates)
        volume = self.volumes[name]
        order = list(volume.snapshots)
        later = order[order.index(snapshot) + 1:]
        blocked = [s for s in later if volume.has_clones(s)]
        force = self.rng.random() < 0.3
        if blocked:
            self.log(f"snapshot rollback {name}@{snapshot}" + (" --force" if force else "")
                     + f" (later snapshots {blocked} have clones: must be refused)")
            result = self.vd.run("snapshot", "rollback", name, snapshot, *(["--force"] if force else []), check=False)
            if result.returncode == 0:
                raise Mismatch(f"rollback of {name} to {snapshot} succeeded over later snapshots with clones")
            self.expect_snapshot_list(name)
            # A refused forced rollback still disconnects the clients (vd disconnects before it checks the clones).
            self.disconnect_volume(name)
            self.connect_volume(name)
            self.verify_export(name, volume.disk, self.handles[(name, 0)])
            return
        self.log(f"snapshot rollback {name}@{snapshot}" + (" --force (clients connected)" if force else "")
                 + (f", dropping later {later}" if later else ""))
        if force:
            self.vd.run("snapshot", "rollback", name, snapshot, "--force")
        else:
            self.disconnect_volume(name)
            wait_until(lambda: json.loads(self.vd.run("volume", "info", name, "--json").stdout)["connections"] == 0,
                       30, f"the router to see the clients of {name} gone")
            self.vd.run("snapshot", "rollback", name, snapshot)
        self.disconnect_volume(name)
        self.connect_volume(name)
        volume.disk = volume.snapshots[snapshot].copy()
        listed = {s["name"] for s in json.loads(self.vd.run("snapshot", "list", name, "--json").stdout)}
        for gone in later:
            # A later snapshot taken at the same epoch (nothing written to the volume in between) has the target's
            # content and is kept; any other later snapshot must go.
            if gone in listed and volume.snapshots[gone].wids == volume.disk.wids:
                self.log(f"  {name}@{gone} stays (same content as {snapshot}: same epoch)")
                continue
            del volume.snapshots[gone]
            volume.clones.pop(gone, None)
        self.expect_snapshot_list(name)
        self.verify_export(name, volume.disk, self.handles[(name, 1)])
        for other, disk in volume.snapshots.items():
            self.verify_export(f"{name}@{other}", disk)
        self.log(f"  verified {name} and its {len(volume.snapshots)} snapshot(s)")

    def op_clone(self):
        snapshots = self.all_snapshots()
        clones = sum(1 for v in self.volumes.values() if v.parent)
        if not snapshots or clones >= MAX_CLONES:
            return self.op_snapshot() if not snapshots else self.op_scrub()
        parent, snapshot = self.rng.choice(snapshots)
        self.counters["clone"] += 1
        name = f"c{self.counters['clone']}"
        self.log(f"clone create {parent}@{snapshot} {name}")
        self.vd.run("clone", "create", f"{parent}@{snapshot}", name)
        source = self.volumes[parent]
        self.volumes[name] = Volume(name, source.snapshots[snapshot].copy(), parent=(parent, snapshot))
        source.clones.setdefault(snapshot, []).append(name)
        self.connect_volume(name)
        self.verify_export(name, self.volumes[name].disk, self.handles[(name, 0)])

    def op_scrub(self):
        name = self.pick_volume()
        r = self.rng.random()
        variant = "killed" if r < 0.25 else "under load" if r < 0.55 else "router killed" if r < 0.62 else "plain"
        # vd scrub spends its first 1.5 s taking the lease (write, settle, read back): most kills land after that,
        # while it reads, packs, uploads and records its result (one draw, so the sequence of choices is unchanged).
        u = self.rng.random()
        # A scrub to be killed reads at --rate 4M, so it spends a second or more copying, where a kill matters most.
        delay = 0.05 + 1.45 * u / 0.3 if u < 0.3 else 1.5 + 2.0 * (u - 0.3) / 0.7
        self.log(f"scrub {name} --threshold 0.9 ({variant}"
                 + (f" after {delay:.2f} s" if "killed" in variant else "") + ")")
        rate = ["--rate", "4M"] if "killed" in variant else []
        process = self.vd.spawn("scrub", "--volume", name, "--threshold", "0.9", "--json", *rate)
        if variant == "killed":
            try:
                process.wait(timeout=delay)
                self.log("  scrub finished before the kill")
            except Exception:
                process.kill()
                process.communicate()
                self.log("  scrub killed (SIGKILL)")
                self.verify_all("a killed scrub", only=self.family(name))
                found = self.check(name, "after a killed scrub")
                self.log(f"  vd check {name}: no problems, {len(found.get('orphans', []))} orphan(s)")
                return
        elif variant == "under load":
            self.load_while(process, self.family(name))
        elif variant == "router killed":
            try:
                process.wait(timeout=delay)
            except Exception:
                pass
            self.vd.kill9()
            self.log("  router killed (SIGKILL) during the scrub")
        out = self.finish(process, f"vd scrub --volume {name}")
        summary = json.loads(out)[0] if out.strip().startswith("[") else {}
        self.log(f"  scrub: {summary.get('rewrittenSCOs', '?')} SCO(s) rewritten, result {summary.get('resultID')}")
        if variant == "router killed":
            self.vd.start(f"after kill -9 during scrub, op {self.index}")
            self.reconnect_all()
        self.verify_all(f"the scrub (the exports of {name} and its clones)", only=self.family(name))
        # Once applied, the router deletes the replaced SCOs (after the grace period): wait for that, then read
        # everything again (a source deleted too early shows here).
        found = wait_until(lambda: (lambda r: r if not r.get("orphans") else None)(self.check(name, "after scrub")),
                           60, f"the router to apply the scrub result of {name} and delete the replaced SCOs")
        self.log(f"  vd check {name}: clean, {found.get('liveVersions')} live versions in "
                 f"{found.get('referencedSCOs')} SCOs")
        self.verify_all("the replaced SCOs were deleted", only=self.family(name))

    def crash_batch(self, stop):
        """Requests in flight on every volume when the router is stopped by `stop` (kill -9 or SIGTERM). Replied
        requests are exact; the others leave each sector they touch old or new."""
        requests = self.random_batch(sorted(self.volumes), self.rng.randint(3, 12))
        requests = [r for r in requests if r.kind != "read"]
        replied_before = self.rng.randrange(len(requests) + 1)
        self.log(f"  in flight: " + "; ".join(r.describe() for r in requests)
                 + f" (stop after {replied_before} replies)")
        batch = Batch(requests, self.handles)
        batch.submit()
        batch.drive(until=replied_before)
        stop()
        batch.drive(tolerate_dead=True, timeout=10)
        replied = 0
        for request in requests:
            if request.state == "ok":
                replied += 1
                self.apply(request)
            else:
                self.apply_unreplied(request)
        self.log(f"  {replied} of {len(requests)} replied")

    def wait_uploaded(self):
        """Polls until the router reports nothing written that the backend lacks, for every volume (the open SCO is
        sealed after upload.max_age_seconds, so this comes by itself). The header block of the new open SCO always
        counts as unstored (4096 bytes); any write adds a batch header and more."""
        def largest():
            return max(json.loads(self.vd.run("volume", "info", name, "--json").stdout)["space"]["unstoredBytes"]
                       for name in self.volumes)
        wait_until(lambda: largest() <= 4096, 60, "the router to upload everything (unstoredBytes <= 4096)",
                   interval=0.2)

    def op_kill(self):
        r = self.rng.random()
        if r < 0.25:
            # Everything replied is on the backend once unstoredBytes is 0: a crash that also loses the local flash
            # must then lose nothing.
            self.log("kill -9 vd serve once the backend holds everything, wipe the local flash, restart")
            self.wait_uploaded()
            self.vd.kill9()
            shutil.rmtree(os.path.join(self.vd.data, "flash"))
            self.vd.start(f"after kill -9 and a flash wipe, op {self.index}")
            self.reconnect_all()
            self.verify_all("kill -9, flash wipe and restart")
            for name in self.volumes:
                self.expect_snapshot_list(name)
            return
        inflight = r < 0.7
        self.log("kill -9 vd serve" + (" with requests in flight" if inflight else ""))
        if inflight:
            self.crash_batch(self.vd.kill9)
        else:
            self.vd.kill9()
        self.vd.start(f"after kill -9, op {self.index}")
        self.reconnect_all()
        self.verify_all("kill -9 and restart", resolve=True)

    def op_restart_from_backend(self):
        inflight = self.rng.random() < 0.3
        self.log("SIGTERM vd serve, wipe the local flash, restart from the backend"
                 + (" (requests in flight at SIGTERM)" if inflight else ""))
        if inflight:
            self.crash_batch(self.vd.terminate)
        else:
            if self.rng.random() < 0.5:
                for name in list(self.volumes):
                    self.disconnect_volume(name)
            self.vd.terminate()
        shutil.rmtree(os.path.join(self.vd.data, "flash"))
        self.vd.start(f"from the backend, op {self.index}")
        self.reconnect_all()
        self.verify_all("a restart from the backend", resolve=True)
        for name in self.volumes:
            self.expect_snapshot_list(name)

    def op_check(self):
        name = self.pick_volume()
        found = self.check(name, f"op {self.index}")
        self.log(f"check {name}: no problems, {len(found.get('orphans', []))} orphan(s), "
                 f"{found.get('liveVersions')} live versions")

    def op_verify(self):
        self.log("verify everything")
        self.verify_all("a random pick")

    # ---- the run

    def setup(self):
        self.vd.run("volume", "create", "vol", "--size", str(VOLUME_BYTES))
        self.volumes["vol"] = Volume("vol", Disk(SECTORS))
        self.vd.start("initial")
        self.connect_volume("vol")

    def run(self, count):
        self.log(f"seed {self.seed}: {count} operations on a {VOLUME_BYTES >> 20} MiB volume; data dir {self.vd.data}")
        self.setup()
        names = [n for n, _ in OPERATIONS]
        weights = [w for _, w in OPERATIONS]
        for self.index in range(1, count + 1):
            getattr(self, "op_" + self.rng.choices(names, weights)[0])()
            self.vd.check_alive()
        self.index = count + 1
        self.log("final: verify, check every volume, restart from the backend, verify and check again")
        self.verify_all("the last operation")
        for name in self.volumes:
            self.check(name, "final")
        self.op_restart_from_backend()
        for name in self.volumes:
            self.check(name, "final, after the restart from the backend")
        for name in list(self.volumes):
            self.disconnect_volume(name)
        self.vd.terminate()


def main():
    parser = argparse.ArgumentParser(description="Seeded random torture test of vd (see tools/torture.sh).")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument("--vd", required=True, help="the vd binary")
    parser.add_argument("--work", help="work directory (default: a new one under $TMPDIR)")
    args = parser.parse_args()

    work = args.work or tempfile.mkdtemp(prefix=f"vd-torture-{args.seed}-")
    os.makedirs(work, exist_ok=True)
    if os.listdir(work):
        sys.exit(f"torture: the work directory {work} is not empty (a run needs a fresh data directory)")
    vd = VD(args.vd, work)
    torture = Torture(args.seed, vd, os.path.join(work, "trace.log"))
    started = time.monotonic()
    try:
        torture.run(args.ops)
    except (Mismatch, VDFailure, IOFailure) as failure:
        vd.stop_quietly()
        print(f"\nTORTURE FAILED: seed {args.seed}, operation {torture.index} of {args.ops}: {failure}")
        for line in getattr(failure, "details", []):
            print(line)
        print(f"last {TRACE_TAIL} trace lines:")
        for line in torture.trace[-TRACE_TAIL:]:
            print("  " + line)
        conclude(args, work, vd, failed=True)
        sys.exit(1)
    except BaseException:
        vd.stop_quietly()
        traceback.print_exc()
        print(f"\nTORTURE TOOL ERROR (not a verdict on vd): seed {args.seed}, operation {torture.index}")
        conclude(args, work, vd, failed=True)
        sys.exit(2)
    print(f"\nPASSED: seed {args.seed}, {args.ops} operations in {time.monotonic() - started:.0f} s, "
          f"{vd.starts} router start(s)")
    conclude(args, work, vd, failed=False)


def conclude(args, work, vd, failed):
    """Keeps what debugging needs: everything with --keep; on failure the logs (not the data); nothing on success."""
    if args.keep:
        print(f"kept: {work} (vd serve log {vd.log_path}, trace {os.path.join(work, 'trace.log')})")
    elif failed:
        shutil.rmtree(vd.data, ignore_errors=True)
        print(f"vd serve log: {vd.log_path}\ntrace: {os.path.join(work, 'trace.log')}\n"
              f"(data directory removed; rerun with --keep to keep it)")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
