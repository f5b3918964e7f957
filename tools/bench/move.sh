#!/usr/bin/env bash
# Benchmark: moving a volume between two routers on one backend (`vd volume move`), against the data not yet on the
# backend when the move starts; taking a volume over from a dead router (`vd volume takeover`, kill -9) against the
# lease period; and the cost of serving under an owner lease (`--node`) on write throughput.
#
#   tools/bench/move.sh [--dir DIR] [--sizes "16M 256M 1G"] [--leases "3 10 20"] [--vd PATH] [--runtime 8]
#
# Both routers run on this machine and share a local-directory backend (what the embedded default does; with S3 the
# drain is an upload at the store's speed: docs/performance.md has those rates). Not a test.
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${BENCH_DIR:-/var/tmp/vd-bench-move}"
sizes="16M 256M 1G"
runtime=8
leases="3 10 20"
vd=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --sizes) sizes="$2"; shift 2 ;;
    --vd) vd="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --leases) leases="$2"; shift 2 ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null || { echo "missing fio" >&2; exit 1; }
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
  "$vd" serve --data-dir "$dir/$node" --nbd-socket "$dir/$node.sock" --config "$dir/vd.toml" --drain-timeout 600 "$@" \
    >"$dir/$node.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do grep -q '^ready' "$dir/$node.log" 2>/dev/null && return; sleep 0.05; done
  echo "vd serve $node did not start:" >&2; cat "$dir/$node.log" >&2; exit 1
}
fresh() {
  cleanup
  rm -rf "$dir"
  mkdir -p "$dir/shared"
  printf '[backends.local]\nurl = "file://%s/shared"\n[upload]\nmax_age_seconds = 600\n' "$dir" > "$dir/vd.toml"
}

echo "move time against data not yet on the backend"
printf '%-10s %14s %12s %12s\n' written unstored drain total
for size in $sizes; do
  fresh
  "$vd" volume create vol --size 4G --data-dir "$dir/a" --config "$dir/vd.toml" >/dev/null
  start a --node a --cluster-listen 127.0.0.1:0
  start b --node b --cluster-listen 127.0.0.1:0
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///vol?socket=$dir/a.sock" --rw=write --bs=1M --iodepth=8 \
    --size="$size" >/dev/null
  out=$("$vd" volume move vol --to b --data-dir "$dir/a" --config "$dir/vd.toml")
  # moved volume vol from a to b (generation 2) in 0.34 s; 16 MiB were uploaded first (0.28 s)
  total=$(echo "$out" | sed -n 's/.* in \([0-9.]*\) s;.*/\1/p')
  unstored=$(echo "$out" | sed -n 's/.*; \(.*\) were uploaded first.*/\1/p')
  drain=$(echo "$out" | sed -n 's/.*first (\([0-9.]*\) s).*/\1/p')
  printf '%-10s %14s %11ss %11ss\n' "$size" "$unstored" "$drain" "$total"
done

echo
echo "takeover of a dead router's volume (kill -9; 256 MiB written, everything stored first) against the lease"
printf '%-8s %12s %12s\n' lease minimum takeover
for lease in $leases; do
  fresh
  printf '[cluster]\nlease_seconds = %s\n' "$lease" >> "$dir/vd.toml"
  "$vd" volume create vol --size 4G --data-dir "$dir/a" --config "$dir/vd.toml" >/dev/null
  start a --node a
  start b --node b
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///vol?socket=$dir/a.sock" --rw=write --bs=1M --iodepth=8 \
    --size=256M >/dev/null
  "$vd" snapshot create vol stored --data-dir "$dir/a" --config "$dir/vd.toml" >/dev/null
  for _ in $(seq 600); do
    unstored=$("$vd" volume info vol --json --data-dir "$dir/a" --config "$dir/vd.toml" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["space"]["unstoredBytes"])')
    [ "$unstored" -le 1048576 ] && break
    sleep 0.1
  done
  kill -9 "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
  t0=$(date +%s.%N)
  "$vd" volume takeover vol --data-dir "$dir/b" --config "$dir/vd.toml" >/dev/null
  t1=$(date +%s.%N)
  minimum=$(python3 -c "print(round($lease * 1.01 / 0.99 + 1, 2))")
  printf '%-8s %11ss %11ss\n' "${lease}s" "$minimum" "$(python3 -c "print(round($t1 - $t0, 2))")"
done

echo
echo "write throughput with and without an owner lease (randwrite 4k qd32, seq write 1M qd8, ${runtime} s each)"
for mode in plain lease; do
  fresh
  "$vd" volume create vol --size 4G --data-dir "$dir/a" --config "$dir/vd.toml" >/dev/null
  if [ "$mode" = lease ]; then start a --node a; else start a; fi
  rw=$(fio --name=rw --ioengine=nbd --uri="nbd+unix:///vol?socket=$dir/a.sock" --rw=randwrite --bs=4k --iodepth=32 \
    --size=4G --runtime="$runtime" --time_based --output-format=json | sed -n '/^{/,$p' \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
  sw=$(fio --name=sw --ioengine=nbd --uri="nbd+unix:///vol?socket=$dir/a.sock" --rw=write --bs=1M --iodepth=8 \
    --size=4G --runtime="$runtime" --time_based --output-format=json | sed -n '/^{/,$p' \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6))')
  printf '%-6s randwrite %6s IOPS   seq write %5s MB/s\n' "$mode" "$rw" "$sw"
done
cleanup
rm -rf "$dir"
