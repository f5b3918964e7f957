# Replays a short, hand-written sequence of steps against a fresh `vd serve` and checks every export after each
# step: the tool for reducing a failure found by torture.py to a few operations. Run with the system Python:
#
#   /usr/bin/python3 tools/torture/scenario.py --vd .build/debug/vd "write vol 0 32768" "snapshot vol s1" \
#       "write vol 0 32768" "snapshot vol s2" "delete-while-writing vol s1 0 8 4096"
#   (deleting s1 while writes land makes clusters of s2 read zeroes: seen in about half the runs)
#
# Steps: write VOL FIRST COUNT | zero VOL FIRST COUNT | trim VOL FIRST COUNT | flush VOL | snapshot VOL SNAP |
# snapshot-while VOL SNAP KIND FIRST COUNT N (N requests of KIND write|zero|trim, 8 in flight at a time, while the
# snapshot is taken) | delete VOL SNAP | delete-while-writing VOL SNAP FIRST COUNT N (N writes of
# COUNT sectors from FIRST on, 16 in flight at a time) | rollback VOL SNAP | clone VOL SNAP CLONE | scrub VOL | kill | restart-from-backend |
# load VOL FIRST COUNT N (N writes of COUNT sectors from FIRST on, in flight while the next step runs) | check VOL.
# Exit 1 at the first export that differs from the model (the differences are printed), 0 when all steps pass.

import argparse
import json
import os
import shutil
import sys
import tempfile

from model import SECTOR, Disk, payload, report
from nbdio import Batch, Request, close, connect, read
from vdproc import VD

SECTORS = (32 << 20) // SECTOR


class Scenario:
    def __init__(self, vd):
        self.vd = vd
        self.disks = {"vol": Disk(SECTORS)}
        self.snapshots = {}          # (volume, snap) -> Disk, in creation order
        self.handles = {}
        self.wid = 0
        self.pending_load = None     # requests to keep in flight during the next step

    def connect_all(self):
        for name in self.disks:
            for conn in (0, 1):
                old = self.handles.pop((name, conn), None)
                if old is not None:
                    close(old)
                self.handles[(name, conn)] = connect(self.vd.socket, name)

    def io(self, kind, name, first, count):
        request = Request(name, 0, kind, first, count)
        if kind == "write":
            self.wid += 1
            request.wid, request.data = self.wid, payload(self.wid, first, count)
        return request

    def apply(self, request):
        disk = self.disks[request.target]
        if request.kind == "write":
            disk.set(request.first, request.count, request.wid)
        elif request.kind == "zero":
            disk.set(request.first, request.count, 0)
        elif request.kind == "trim":
            start = -(-request.first // 8) * 8
            end = (request.first + request.count) // 8 * 8
            disk.set(start, max(0, end - start), 0)

    def run(self, requests):
        batch = Batch(requests, self.handles)
        batch.submit()
        batch.drive()
        for request in requests:
            if request.state != "ok":
                sys.exit(f"request failed: {request.describe()}: {request.error}")
            self.apply(request)

    def step(self, text):
        words = text.split()
        verb, args = words[0], words[1:]
        load = self.pending_load
        self.pending_load = None
        batch = None
        if load:
            batch = Batch(load, self.handles)
            batch.submit()
        if verb in ("write", "zero", "trim"):
            self.run([self.io(verb, args[0], int(args[1]), int(args[2]))])
        elif verb == "flush":
            self.run([Request(args[0], 0, "flush")])
        elif verb == "load":
            name, first, count, n = args[0], int(args[1]), int(args[2]), int(args[3])
            self.pending_load = [self.io("write", name, first + i * count, count) for i in range(n)]
        elif verb == "snapshot":
            self.vd.run("snapshot", "create", args[0], args[1])
            self.snapshots[(args[0], args[1])] = self.disks[args[0]].copy()
        elif verb == "delete-while-writing":
            # delete VOL SNAP while N sequential writes of COUNT sectors go to FIRST (and go on after it returns)
            name, snap, first, count, n = args[0], args[1], int(args[2]), int(args[3]), int(args[4])
            process = self.vd.spawn("snapshot", "delete", name, snap)
            for i in range(0, n, 16):  # 16 writes in flight at a time, on both connections
                group = [self.io("write", name, (first + j * count) % SECTORS, count) for j in range(i, min(n, i + 16))]
                for j, request in enumerate(group):
                    request.conn = j % 2
                self.run(group)
            if process.wait(timeout=120) != 0:
                sys.exit(f"snapshot delete failed: {process.communicate()}")
            del self.snapshots[(name, snap)]
        elif verb == "snapshot-while":
            # snapshot VOL SNAP while N requests of KIND (write, zero, trim) of COUNT sectors from FIRST on run, 8 in
            # flight at a time: each sector they touch may be old or new in the snapshot
            name, snap, kind, first, count, n = args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5])
            frozen = self.disks[name].copy()
            process = self.vd.spawn("snapshot", "create", name, snap)
            for i in range(0, n, 8):
                group = [self.io(kind, name, (first + j * count) % SECTORS, count) for j in range(i, min(n, i + 8))]
                for j, request in enumerate(group):
                    request.conn = j % 2
                self.run(group)
                for request in group:
                    if kind == "trim":
                        start = -(-request.first // 8) * 8
                        frozen.allow(start, max(0, (request.first + request.count) // 8 * 8 - start), 0)
                    else:
                        frozen.allow(request.first, request.count, request.wid if kind == "write" else 0)
            if process.wait(timeout=120) != 0:
                sys.exit(f"snapshot create failed: {process.communicate()}")
            self.snapshots[(name, snap)] = frozen
        elif verb == "delete":
            self.vd.run("snapshot", "delete", args[0], args[1])
            del self.snapshots[(args[0], args[1])]
        elif verb == "rollback":
            self.vd.run("snapshot", "rollback", args[0], args[1], "--force")
            self.disks[args[0]] = self.snapshots[(args[0], args[1])].copy()
            listed = {s["name"] for s in json.loads(self.vd.run("snapshot", "list", args[0], "--json").stdout)}
            for key in [k for k in self.snapshots if k[0] == args[0] and k[1] not in listed]:
                del self.snapshots[key]
            self.connect_all()
        elif verb == "clone":
            self.vd.run("clone", "create", f"{args[0]}@{args[1]}", args[2])
            self.disks[args[2]] = self.snapshots[(args[0], args[1])].copy()
            self.connect_all()
        elif verb == "scrub":
            print(self.vd.run("scrub", "--volume", args[0], "--threshold", "0.9").stdout.strip())
        elif verb == "check":
            found = json.loads(self.vd.run("check", args[0], "--json", check=False).stdout)
            if found["problems"]:
                sys.exit(f"vd check {args[0]}: problems {found['problems']}")
        elif verb == "kill":
            self.vd.kill9()
            self.vd.start("scenario")
            self.connect_all()
        elif verb == "restart-from-backend":
            for handle in self.handles.values():
                close(handle)
            self.handles.clear()
            self.vd.terminate()
            shutil.rmtree(os.path.join(self.vd.data, "flash"))
            self.vd.start("scenario, from the backend")
            self.connect_all()
        else:
            sys.exit(f"unknown step {text!r}")
        if batch:
            batch.drive()
            for request in load:
                if request.state != "ok":
                    sys.exit(f"request failed: {request.describe()}: {request.error}")
                self.apply(request)

    def verify(self, after):
        exports = [(name, disk) for name, disk in self.disks.items()]
        exports += [(f"{v}@{s}", disk) for (v, s), disk in self.snapshots.items()]
        for export, disk in exports:
            handle = connect(self.vd.socket, export)
            data = read(handle, 0, SECTORS)
            close(handle)
            differences = disk.compare(0, data, resolve=True)
            if differences:
                print(f"FAILED after step {after!r}: export {export} differs from the model")
                print("\n".join(report(differences, lambda wid: f"write #{wid}")))
                return False
        return True


def main():
    parser = argparse.ArgumentParser(description="Replay a short sequence of vd operations and check every export.")
    parser.add_argument("--vd", required=True)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--verify-at-end", action="store_true", help="check the exports only after the last step")
    parser.add_argument("steps", nargs="+")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="vd-scenario-")
    vd = VD(args.vd, work)
    vd.run("volume", "create", "vol", "--size", str(SECTORS * SECTOR))
    vd.start("scenario")
    scenario = Scenario(vd)
    scenario.connect_all()
    ok = True
    try:
        for text in args.steps:
            print(f"step: {text}", flush=True)
            scenario.step(text)
            vd.check_alive()
            if (not args.verify_at_end or text == args.steps[-1]) and not scenario.verify(text):
                ok = False
                break
    except BaseException:
        ok = False
        raise
    finally:
        vd.stop_quietly()
        print(f"vd serve log: {vd.log_path}" if (args.keep or not ok) else "", end="")
        if not args.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
    print("PASSED" if ok else "")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
