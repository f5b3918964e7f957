#!/usr/bin/env bash
# Benchmark: write throughput and latency with the distributed transaction log off, async and sync (docs/performance.md,
# "DTL"), in one run: router a owns the volume, router b on the same machine is its DTL peer (loopback), one
# local-directory backend. In the same run, qemu-nbd on a raw file on the same disk, for scale.
#
#   tools/bench/dtl.sh [--dir DIR] [--runtime 10] [--vd PATH] [--modes "none async sync"] [--rounds 1]
#                      [--peer-dir DIR] [--jobs "randwrite-qd32 randwrite-qd1+flush seqwrite-1M"]
#
# Jobs (fio over NBD): randwrite 4k qd32; randwrite 4k qd1 with a flush after every write; seq write 1M qd8 (--jobs
# runs some of them only, by name: more rounds of one job in the same time).
# With --rounds N the modes run N times in turn (each mode from an empty directory, after the previous one's data
# was written back: `sync`), and the median of each job and the ratio of each mode to `none` close the run.
# The target is sync >= 0.7x none on randwrite qd32 and seq write. Not a test.
# By default both routers and the local-directory backend share one disk, so with a mode the disk writes every byte
# three times (owner journal, peer journal, backend) instead of twice: seq write is bound by that. --peer-dir puts the
# peer router's data directory elsewhere (another disk; /dev/shm stands in for the peer machine's own disk, with an
# fdatasync that costs nothing there).
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${BENCH_DIR:-/var/tmp/vd-bench-dtl}"
runtime=10
modes="none async sync"
rounds=1
vd=""
peer_dir=""
jobs="randwrite-qd32 randwrite-qd1+flush seqwrite-1M"
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --vd) vd="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --peer-dir) peer_dir="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
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
export VD_CLUSTER_TOKEN="bench-cluster-token-0123456789"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done; pids=(); }
trap cleanup EXIT

start() { # node [extra args...]
  local node="$1"; shift
  local data="$dir/$node"
  if [ "$node" = b ] && [ -n "$peer_dir" ]; then data="$peer_dir/b"; fi
  "$vd" serve --data-dir "$data" --nbd-socket "$dir/$node.sock" --config "$dir/vd.toml" --node "$node" \
    --cluster-listen 127.0.0.1:0 --dtl-listen 127.0.0.1:0 "$@" >"$dir/$node.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 400); do grep -q '^ready' "$dir/$node.log" 2>/dev/null && return; sleep 0.05; done
  echo "vd serve $node did not start:" >&2; cat "$dir/$node.log" >&2; exit 1
}

# fio JSON -> "IOPS MB/s p99-microseconds"
summary='import json,sys
j=json.loads(sys.stdin.read())["jobs"][0]["write"]
p=j.get("clat_ns",{}).get("percentile",{}).get("99.000000",0)/1000
print("%d %.0f %.0f" % (j["iops"], j["bw_bytes"]/1e6, p))'
run_jobs() { # uri label
  local uri="$1" label="$2" out
  for job in "randwrite-qd32:--rw=randwrite --bs=4k --iodepth=32" \
             "randwrite-qd1+flush:--rw=randwrite --bs=4k --iodepth=1 --fsync=1" \
             "seqwrite-1M:--rw=write --bs=1M --iodepth=8"; do
    name="${job%%:*}"; args="${job#*:}"
    case " $jobs " in *" $name "*) ;; *) continue ;; esac
    # shellcheck disable=SC2086
    out=$(fio --name="$name" --ioengine=nbd --uri="$uri" $args --size=2G --runtime="$runtime" --time_based \
      --output-format=json | sed -n '/^{/,$p' | python3 -c "$summary")
    read -r iops mbs p99 <<<"$out"
    printf '%-14s %-22s %9s IOPS %7s MB/s   p99 %8s us\n' "$label" "$name" "$iops" "$mbs" "$p99"
    echo "$label|$name|$iops|$mbs" >>"$results"
  done
}
results="$(mktemp)"
trap 'cleanup; rm -f "$results"' EXIT

echo "fio over NBD, ${runtime} s per job; DTL peer on loopback (same machine, data in ${peer_dir:-the same directory}); $rounds round(s)"
for round in $(seq "$rounds"); do
for mode in $modes; do
  cleanup
  rm -rf "$dir"
  if [ -n "$peer_dir" ]; then rm -rf "$peer_dir/b"; fi
  sync
  mkdir -p "$dir/shared"
  printf '[backends.local]\nurl = "file://%s/shared"\n' "$dir" > "$dir/vd.toml"
  "$vd" volume create vol --size 4G --data-dir "$dir/a" --config "$dir/vd.toml" >/dev/null
  start a
  start b
  "$vd" volume dtl vol --mode "$mode" --peer b --data-dir "$dir/a" --config "$dir/vd.toml" >/dev/null
  if [ "$mode" != none ]; then
    for _ in $(seq 200); do
      "$vd" volume info vol --data-dir "$dir/a" --config "$dir/vd.toml" | grep -q "in sync" && break
      sleep 0.05
    done
  fi
  run_jobs "nbd+unix:///vol?socket=$dir/a.sock" "vd dtl=$mode"
  "$vd" volume info vol --data-dir "$dir/a" --config "$dir/vd.toml" | grep "DTL" || true
done
done
cleanup
if [ -n "$peer_dir" ]; then rm -rf "$peer_dir/b"; fi

rm -rf "$dir"
mkdir -p "$dir"
truncate -s 4G "$dir/raw.img"
qemu-nbd --persistent --shared=8 --format=raw --cache=none --aio=native --socket="$dir/qemu.sock" "$dir/raw.img" &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/qemu.sock" ] && break; sleep 0.05; done
run_jobs "nbd+unix:///?socket=$dir/qemu.sock" "qemu-nbd raw"
cleanup
rm -rf "$dir"

# Medians per mode and job (IOPS for random writes, MB/s for the sequential one), and each mode against `none`.
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.strip().split("|") for line in open(sys.argv[1]) if line.strip()]
med = {}
for label, job in dict.fromkeys((r[0], r[1]) for r in rows):
    values = [float(r[3] if job.startswith("seq") else r[2]) for r in rows if r[0] == label and r[1] == job]
    med[(label, job)] = (statistics.median(values), len(values))
print("\nmedians (IOPS; MB/s for seqwrite), and against dtl=none:")
for (label, job), (value, n) in med.items():
    base = med.get(("vd dtl=none", job))
    ratio = "  %.2fx" % (value / base[0]) if base and base[0] and label.startswith("vd dtl=") else ""
    print("%-14s %-22s %9.0f  (%d run%s)%s" % (label, job, value, n, "" if n == 1 else "s", ratio))
PY
