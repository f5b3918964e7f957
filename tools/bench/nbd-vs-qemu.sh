#!/usr/bin/env bash
# Benchmark: fio over NBD against `vd serve` (embedded backend) and, in the same run, against
#   qemu-nbd -f raw --cache=none --aio=native   serving a raw file on the same disk (the peer),
#   nbdkit memory                               a server that does no work (the NBD ceiling of this machine),
#   the local disk itself                       fio with libaio + O_DIRECT on a file (the disk ceiling).
# Prints each figure with its p99 completion latency, the ratios vd/qemu-nbd and vd/nbdkit, and the targets of
# docs/performance.md.
#
#   tools/bench/nbd-vs-qemu.sh [--dir DIR] [--size 4G] [--fill 2G] [--runtime 8] [--repeat 2] [--vd PATH]
#                              [--config FILE] [--jobs "seqwrite randwrite ..."] [--targets "vd qemu nbdkit disk"]
#
# Jobs:
#   seqwrite   1 MiB sequential writes, iodepth 8
#   randwrite  4 KiB random writes, iodepth 32
#   randread   4 KiB random reads, iodepth 32, over a region filled first
#   flushwrite 4 KiB random writes, iodepth 1, a flush after every write
#   randwrite2 4 KiB random writes, 2 connections x iodepth 16
# Every round starts every target empty. Not a test: numbers vary with the machine and with what else runs on it.
# Compare only within one run.
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${BENCH_DIR:-/var/tmp/vd-bench}"
size=4G
fill=2G
runtime=8
repeat=2
vd=""
extra_config=""
jobs="seqwrite randwrite randread flushwrite randwrite2"
targets="vd qemu nbdkit disk"
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --fill) fill="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --vd) vd="$2"; shift 2 ;;
    --config) extra_config="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

for tool in fio qemu-nbd nbdkit python3; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool (tools/deps.sh --bench, or apt-get install fio qemu-utils nbdkit python3)" >&2; exit 1; }
done
if [ -z "$vd" ]; then
  (cd "$here" && swift build -c release --product vd >&2)
  vd="$here/.build/release/vd"
fi

rm -rf "$dir"
mkdir -p "$dir/results"
pids=()
stop_targets() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_targets EXIT

config_args=()
[ -n "$extra_config" ] && config_args=(--config "$extra_config")
has_target() { [[ " $targets " == *" $1 "* ]]; }
# Each round starts from an empty volume, file and memory disk: a log-structured volume keeps overwritten data
# until `vd scrub` runs, so rounds of overwrites would otherwise fill the disk.
start_targets() {
  rm -rf "$dir/vd" "$dir/qemu" "$dir/nbdkit" "$dir/disk"
  mkdir -p "$dir/vd" "$dir/qemu" "$dir/nbdkit" "$dir/disk"
  local sockets=()
  if has_target vd; then
    "$vd" volume create bench --size "$size" --data-dir "$dir/vd/data" "${config_args[@]}" >/dev/null
    "$vd" serve --data-dir "$dir/vd/data" --nbd-socket "$dir/vd/nbd.sock" --drain-timeout 0 "${config_args[@]}" \
      >"$dir/vd/serve.log" 2>&1 &
    pids+=($!)
    echo $! > "$dir/vd/pid"
    sockets+=("$dir/vd/nbd.sock")
  fi
  if has_target qemu; then
    truncate -s "$size" "$dir/qemu/disk.raw"
    qemu-nbd -k "$dir/qemu/nbd.sock" -f raw --cache=none --aio=native -t -e 8 "$dir/qemu/disk.raw" &
    pids+=($!)
    sockets+=("$dir/qemu/nbd.sock")
  fi
  if has_target nbdkit; then
    nbdkit -f -U "$dir/nbdkit/nbd.sock" memory "$size" &
    pids+=($!)
    sockets+=("$dir/nbdkit/nbd.sock")
  fi
  if has_target disk; then
    fallocate -l "$size" "$dir/disk/file"
  fi
  for _ in $(seq 100); do
    local ready=1
    for socket in "${sockets[@]}"; do [ -S "$socket" ] || ready=0; done
    [ "$ready" = 1 ] && break
    sleep 0.1
  done
}

run_fio() { # target name args...
  local target="$1" name="$2"; shift 2
  local io=()
  case "$target" in
    vd) io=(--ioengine=nbd --uri="nbd+unix:///bench?socket=$dir/vd/nbd.sock") ;;
    qemu) io=(--ioengine=nbd --uri="nbd+unix:///?socket=$dir/qemu/nbd.sock") ;;
    nbdkit) io=(--ioengine=nbd --uri="nbd+unix:///?socket=$dir/nbdkit/nbd.sock") ;;
    disk) io=(--ioengine=libaio --direct=1 --filename="$dir/disk/file") ;;
  esac
  fio --output-format=json --name="$name" "${io[@]}" "$@" \
    > "$dir/results/$target-$name.raw" 2>"$dir/results/$target-$name.err" || {
      echo "fio $name against $target failed:" >&2; cat "$dir/results/$target-$name.err" >&2; exit 1; }
  sed -n '/^{/,$p' "$dir/results/$target-$name.raw" > "$dir/results/$target-$name.json"
}

has_job() { [[ " $jobs " == *" $1 "* ]]; }
for round in $(seq "$repeat"); do
  start_targets
  for target in $targets; do
    has_job seqwrite && run_fio "$target" "seqwrite.$round" --rw=write --bs=1M --iodepth=8 --size="$size" \
      --runtime="$runtime" --time_based
    has_job randwrite && run_fio "$target" "randwrite.$round" --rw=randwrite --bs=4k --iodepth=32 --size="$size" \
      --runtime="$runtime" --time_based
    if has_job randread; then
      run_fio "$target" "fill.$round" --rw=write --bs=1M --iodepth=8 --size="$fill"
      run_fio "$target" "randread.$round" --rw=randread --bs=4k --iodepth=32 --size="$fill" --runtime="$runtime" \
        --time_based
    fi
    has_job flushwrite && run_fio "$target" "flushwrite.$round" --rw=randwrite --bs=4k --iodepth=1 --fsync=1 \
      --size="$size" --runtime="$runtime" --time_based
    has_job randwrite2 && run_fio "$target" "randwrite2.$round" --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 \
      --group_reporting --size="$size" --runtime="$runtime" --time_based
    true
  done
  stop_targets
done
rm -rf "$dir/vd" "$dir/qemu" "$dir/nbdkit" "$dir/disk"

python3 - "$dir/results" "$repeat" "$jobs" "$targets" <<'PY'
import json, os, statistics, sys
results, repeat, jobs, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
def load(target, job, round):
    path = f"{results}/{target}-{job}.{round}.json"
    if not os.path.exists(path):
        return None
    data = json.load(open(path))["jobs"][0]
    side = data["read"] if job == "randread" else data["write"]
    figure = side["bw_bytes"] / 1e6 if job == "seqwrite" else side["iops"]
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6
    return figure, p99
def median(target, job):
    runs = [load(target, job, r) for r in range(1, repeat + 1)]
    runs = [r for r in runs if r]
    if not runs:
        return None
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
# job, label, unit, target vd/qemu, target vd/nbdkit
rows = [("seqwrite", "seq write 1M qd8", "MB/s", 1.5),
        ("randwrite", "randwrite 4k qd32", "IOPS", 1.5),
        ("randread", "randread 4k qd32", "IOPS", None),
        ("flushwrite", "randwrite 4k qd1 + flush", "IOPS", 1.2),
        ("randwrite2", "randwrite 4k 2 conn x qd16", "IOPS", None)]
names = {"vd": "vd", "qemu": "qemu-nbd", "nbdkit": "nbdkit mem", "disk": "disk"}
header = f"{'workload':28}" + "".join(f" {names[t]:>20}" for t in targets)
header += f" {'vd/qemu':>8} {'vd/ceil':>8} {'p99<=qemu':>9}  targets"
print(header)
for job, label, unit, qemu_target in rows:
    if job not in jobs:
        continue
    figures = {t: median(t, job) for t in targets}
    line = f"{label:28}"
    for t in targets:
        f = figures[t]
        line += f" {f[0]:9.0f} {unit:>4} {f[1]:5.2f}ms" if f else f" {'-':>20}"
    vd, qemu, ceil = figures.get("vd"), figures.get("qemu"), figures.get("nbdkit")
    notes = []
    rq = vd[0] / qemu[0] if vd and qemu and qemu[0] else None
    rc = vd[0] / ceil[0] if vd and ceil and ceil[0] else None
    p99ok = vd[1] <= qemu[1] if vd and qemu else None
    if rc is not None:
        notes.append(f">=0.5x ceiling {'ok' if rc >= 0.5 else 'MISS'}")
    if rq is not None and qemu_target:
        notes.append(f">={qemu_target}x qemu {'ok' if rq >= qemu_target else 'MISS'}")
    if p99ok is not None:
        notes.append(f"p99 {'ok' if p99ok else 'MISS'}")
    line += f" {rq:8.2f}" if rq is not None else f" {'-':>8}"
    line += f" {rc:8.2f}" if rc is not None else f" {'-':>8}"
    line += f" {('yes' if p99ok else 'no') if p99ok is not None else '-':>9}  " + ", ".join(notes)
    print(line)
one, two = median("vd", "randwrite"), median("vd", "randwrite2")
if one and two:
    print(f"vd scaling, randwrite 4k: 2 connections x qd16 / 1 connection x qd32 = {two[0] / one[0]:.2f}")
PY
