#!/usr/bin/env bash
# Diff time (`vd snapshot diff` through the management API) against data written (default 1, 10 and 50 GiB), for
# 1% of it changed and for a fixed 16 MiB changed, on the embedded backend: the time follows the change, not the
# volume. Changes are random 64 KiB writes over the written area (fio randwrite).
#
#   tools/bench/diff.sh [--written "1 10 50"] [--dir DIR]
# A benchmark, not a test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WRITTEN="1 10 50"
DIR="${BENCH_DIR:-/var/tmp/vd-bench-diff}"
while [ $# -gt 0 ]; do
  case "$1" in
    --written) WRITTEN="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    *) echo "usage: $0 [--written \"1 10 50\"] [--dir DIR]" >&2; exit 2 ;;
  esac
done
(cd "$ROOT" && swift build -c release --product vd >&2)
VD="$ROOT/.build/release/vd"
rm -rf "$DIR"; mkdir -p "$DIR"
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$DIR"' EXIT
max=0; for w in $WRITTEN; do [ "$w" -gt "$max" ] && max=$w; done
cat > "$DIR/vd.toml" <<TOML
[cache]
size = "8G"
[backends.local]
compression = true
TOML
"$VD" volume create vol --size "$((max + 8))G" --data-dir "$DIR/data" --config "$DIR/vd.toml" >/dev/null 2>&1
"$VD" serve --data-dir "$DIR/data" --config "$DIR/vd.toml" --drain-timeout 0 >"$DIR/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "^ready" "$DIR/serve.log" && break; sleep 0.1; done
U="nbd+unix:///vol?socket=$DIR/data/nbd.sock"
post() { curl -s --unix-socket "$DIR/data/api.sock" -X POST -H 'Content-Type: application/json' -d "$2" "http://vd$1"; }
timed_diff() { # from to -> "seconds extents changed_bytes"
  local t0 out t1
  t0=$(date +%s.%N)
  out=$(post /v1/volumes/vol/diff "{\"from\":\"$1\",\"to\":\"$2\"}")
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc) $(echo "$out" | python3 -c 'import json,sys; e=json.load(sys.stdin)["extents"]; print(len(e), sum(x["length"] for x in e))')"
}
change() { # name size_bytes span_gib
  fio --name="$1" --ioengine=nbd --uri="$U" --rw=randwrite --bs=64k --iodepth=16 --size="${3}G" --io_size="$2" \
    --randrepeat=0 --buffer_compress_percentage=70 --refill_buffers >/dev/null
}
printf "%-10s %-16s %10s %10s %14s\n" "written" "changed" "diff s" "extents" "changed bytes"
done_gib=0
for w in $WRITTEN; do
  fio --name=fill --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --offset="${done_gib}G" --size="$((w - done_gib))G" \
    --buffer_compress_percentage=70 --refill_buffers >/dev/null
  done_gib=$w
  post /v1/volumes/vol/snapshots "{\"name\":\"base$w\"}" >/dev/null
  change pct$w "$(( w * 1024 * 1024 * 1024 / 100 ))" "$w"
  post /v1/volumes/vol/snapshots "{\"name\":\"pct$w\"}" >/dev/null
  change fixed$w $((16 << 20)) "$w"
  post /v1/volumes/vol/snapshots "{\"name\":\"fixed$w\"}" >/dev/null
  read -r s1 e1 b1 <<<"$(timed_diff "base$w" "pct$w")"
  read -r s2 e2 b2 <<<"$(timed_diff "pct$w" "fixed$w")"
  printf "%-10s %-16s %10.3f %10s %14s\n" "${w} GiB" "1% ($((w * 1024 / 100)) MiB)" "$s1" "$e1" "$b1"
  printf "%-10s %-16s %10.3f %10s %14s\n" "${w} GiB" "16 MiB" "$s2" "$e2" "$b2"
done
