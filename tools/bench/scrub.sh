#!/usr/bin/env bash
# Scrub throughput (MB of SCOs processed per second) and a guest's 4 KiB random-write IOPS during a scrub compared
# with without one, on the embedded backend.
#
#   tools/bench/scrub.sh [--garbage 4G] [--dir DIR]
# A benchmark, not a test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
GARBAGE=4
DIR="${BENCH_DIR:-/var/tmp/vd-bench-scrub}"
while [ $# -gt 0 ]; do
  case "$1" in
    --garbage) GARBAGE="${2%G}"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    *) echo "usage: $0 [--garbage 4G] [--dir DIR]" >&2; exit 2 ;;
  esac
done
(cd "$ROOT" && swift build -c release --product vd >&2)
VD="$ROOT/.build/release/vd"
rm -rf "$DIR"; mkdir -p "$DIR"
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$DIR"' EXIT
size=$((GARBAGE * 2 + 4))
"$VD" volume create v --size "${size}G" --data-dir "$DIR/data" >/dev/null 2>&1
"$VD" serve --data-dir "$DIR/data" --drain-timeout 0 >"$DIR/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "^ready" "$DIR/serve.log" && break; sleep 0.1; done
U="nbd+unix:///v?socket=$DIR/data/nbd.sock"
# Garbage: GARBAGE GiB written, snapshotted, overwritten, snapshot deleted. Plus half-live SCOs in another region.
fio --name=a --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --size="${GARBAGE}G" >/dev/null
"$VD" snapshot create v s --data-dir "$DIR/data" >/dev/null
fio --name=b --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --size="${GARBAGE}G" >/dev/null
"$VD" snapshot delete v s --data-dir "$DIR/data" >/dev/null
sleep 35   # sealed (max_age_seconds) and uploaded
guest() { # seconds
  fio --name=g --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --offset="$((GARBAGE + 1))G" --size=2G \
    --runtime="$1" --time_based --output-format=json 2>/dev/null | sed -n '/^{/,$p' | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}
alone=$(guest 15)
guest 60 > "$DIR/during" &
gpid=$!
sleep 2
start=$(date +%s.%N)
"$VD" scrub --volume v --data-dir "$DIR/data" --json > "$DIR/scrub.json"
seconds=$(echo "$(date +%s.%N) - $start" | bc)
wait $gpid
during=$(cat "$DIR/during")
python3 - "$DIR/scrub.json" "$seconds" "$alone" "$during" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))[0]
seconds, alone, during = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"scrub: {summary['rewrittenSCOs']} SCOs, {summary['sourceBytes']/1e6:.0f} MB processed in {seconds:.1f} s: "
      f"{summary['sourceBytes']/1e6/seconds:.0f} MB/s; copied {summary['copiedBytes']/1e6:.0f} MB; "
      f"reclaimable {summary['reclaimableBytes']/1e6:.0f} MB")
print(f"guest randwrite 4k qd32: {alone} IOPS alone, {during} IOPS over 60 s with the scrub running: ratio {during/alone:.2f}")
PY
