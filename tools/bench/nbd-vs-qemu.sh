#!/usr/bin/env bash
# Benchmark: fio over NBD against `vd serve` and, in the same run, against
#   qemu-nbd -f raw --cache=none --aio=native
# serving a raw file on the same disk. Prints each figure and the ratio vd/qemu-nbd.
#
#   tools/bench/nbd-vs-qemu.sh [--dir DIR] [--size 4G] [--fill 2G] [--runtime 20] [--repeat 1] [--vd PATH]
#
# Jobs (the targets in docs/performance.md):
#   seqwrite   1 MiB sequential writes, iodepth 8
#   randwrite  4 KiB random writes, iodepth 32
#   randread   4 KiB random reads, iodepth 32, over a region filled first
#   flushwrite 4 KiB random writes, iodepth 1, a flush after every write
# Not a test: numbers vary with the machine and with what else runs on it. Compare only within one run.
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${BENCH_DIR:-/var/tmp/vd-bench}"
size=4G
fill=2G
runtime=20
repeat=1
vd=""
extra_config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --fill) fill="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --vd) vd="$2"; shift 2 ;;
    --config) extra_config="$2"; shift 2 ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

for tool in fio qemu-nbd python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install fio qemu-utils python3)" >&2; exit 1; }
done
if [ -z "$vd" ]; then
  (cd "$here" && swift build -c release --product vd >&2)
  vd="$here/.build/release/vd"
fi

rm -rf "$dir"
mkdir -p "$dir/results"
stop_targets() {
  [ -n "${vd_pid:-}" ] && kill "$vd_pid" 2>/dev/null && wait "$vd_pid" 2>/dev/null || true
  [ -n "${qemu_pid:-}" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null || true
  vd_pid=; qemu_pid=
}
trap stop_targets EXIT

config_args=()
[ -n "$extra_config" ] && config_args=(--config "$extra_config")
# Each round starts from an empty volume and an empty raw file: a log-structured volume keeps overwritten data
# until `vd scrub` runs, so rounds of overwrites would otherwise fill the disk.
start_targets() {
  rm -rf "$dir/vd" "$dir/qemu"
  mkdir -p "$dir/vd" "$dir/qemu"
  "$vd" volume create bench --size "$size" --data-dir "$dir/vd/data" "${config_args[@]}" >/dev/null
  "$vd" serve --data-dir "$dir/vd/data" --nbd-socket "$dir/vd/nbd.sock" --drain-timeout 0 "${config_args[@]}" \
    >"$dir/vd/serve.log" 2>&1 &
  vd_pid=$!
  truncate -s "$size" "$dir/qemu/disk.raw"
  qemu-nbd -k "$dir/qemu/nbd.sock" -f raw --cache=none --aio=native -t -e 8 "$dir/qemu/disk.raw" &
  qemu_pid=$!
  for _ in $(seq 100); do
    [ -S "$dir/vd/nbd.sock" ] && [ -S "$dir/qemu/nbd.sock" ] && break
    sleep 0.1
  done
}

declare -A uri=(
  [vd]="nbd+unix:///bench?socket=$dir/vd/nbd.sock"
  [qemu]="nbd+unix:///?socket=$dir/qemu/nbd.sock"
)

run_fio() { # target name args...
  local target="$1" name="$2"; shift 2
  fio --output-format=json --name="$name" --ioengine=nbd --uri="${uri[$target]}" "$@" \
    > "$dir/results/$target-$name.raw" 2>"$dir/results/$target-$name.err" || {
      echo "fio $name against $target failed:" >&2; cat "$dir/results/$target-$name.err" >&2; exit 1; }
  sed -n '/^{/,$p' "$dir/results/$target-$name.raw" > "$dir/results/$target-$name.json"
}

for round in $(seq "$repeat"); do
  start_targets
  for target in vd qemu; do
    run_fio "$target" "seqwrite.$round" --rw=write --bs=1M --iodepth=8 --size="$size" --runtime="$runtime" --time_based
  done
  for target in vd qemu; do
    run_fio "$target" "randwrite.$round" --rw=randwrite --bs=4k --iodepth=32 --size="$size" --runtime="$runtime" --time_based
  done
  for target in vd qemu; do
    run_fio "$target" "fill.$round" --rw=write --bs=1M --iodepth=8 --size="$fill"
    run_fio "$target" "randread.$round" --rw=randread --bs=4k --iodepth=32 --size="$fill" --runtime="$runtime" --time_based
  done
  for target in vd qemu; do
    run_fio "$target" "flushwrite.$round" --rw=randwrite --bs=4k --iodepth=1 --fsync=1 --size="$size" --runtime="$runtime" --time_based
  done
  stop_targets
done
rm -rf "$dir/vd" "$dir/qemu"

python3 - "$dir/results" "$repeat" <<'PY'
import json, statistics, sys
results, repeat = sys.argv[1], int(sys.argv[2])
def figure(target, job, round):
    data = json.load(open(f"{results}/{target}-{job}.{round}.json"))["jobs"][0]
    side = data["read"] if job == "randread" else data["write"]
    return side["bw_bytes"] / 1e6 if job == "seqwrite" else side["iops"]
rows = [("seqwrite", "seq write 1M qd8", "MB/s", 1.0),
        ("randwrite", "randwrite 4k qd32", "IOPS", 1.2),
        ("randread", "randread 4k qd32 (after fill)", "IOPS", 0.9),
        ("flushwrite", "randwrite 4k qd1 + flush each", "IOPS", 0.9)]
print(f"{'job':34} {'vd':>10} {'qemu-nbd':>10} {'unit':>5} {'vd/qemu':>8} {'target':>7}")
for job, label, unit, target in rows:
    vd = statistics.median(figure("vd", job, r) for r in range(1, repeat + 1))
    qemu = statistics.median(figure("qemu", job, r) for r in range(1, repeat + 1))
    ratio = vd / qemu if qemu else float("nan")
    mark = "ok" if ratio >= target else "MISS"
    print(f"{label:34} {vd:10.0f} {qemu:10.0f} {unit:>5} {ratio:8.2f} {'>=' + str(target):>6} {mark}")
PY
