#!/usr/bin/env bash
# Memory against data written: the peak RSS of `vd serve` (filling the volume, then `vd volume info`, then
# `vd snapshot delete` under it) and its RSS once uploads caught up, of `vd scrub` and of `vd check`, on a volume with 1, 10 and 50 GiB written (each
# level adds to the previous one). Target: flat beyond the configured map cache (`map_cache_entries`, ~64 MiB at the
# default 1 Mi entries), under 512 MiB at 50 GiB.
#
#   tools/bench/memory.sh [--written "1 10 50"] [--dir DIR]
# A benchmark, not a test. Uses the embedded backend with compression (fio's data compresses to about a third).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WRITTEN="1 10 50"
DIR="${BENCH_DIR:-/var/tmp/vd-bench-mem}"
while [ $# -gt 0 ]; do
  case "$1" in
    --written) WRITTEN="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    *) echo "usage: $0 [--written \"1 10 50\"] [--dir DIR]" >&2; exit 2 ;;
  esac
done
(cd "$ROOT" && PATH="/opt/swift/usr/bin:$PATH" swift build -c release --product vd >&2)
VD="$ROOT/.build/release/vd"
rm -rf "$DIR"; mkdir -p "$DIR"
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
max=0; for w in $WRITTEN; do [ "$w" -gt "$max" ] && max=$w; done
cat > "$DIR/vd.toml" <<TOML
[cache]
size = "8G"
[backends.local]
compression = true
TOML
"$VD" volume create vol1 --size "$((max + 8))G" --data-dir "$DIR/data" --config "$DIR/vd.toml" >/dev/null 2>&1
start_serve() {
  "$VD" serve --data-dir "$DIR/data" --config "$DIR/vd.toml" --drain-timeout 600 >>"$DIR/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do grep -q "^ready" "$DIR/serve.log" && break; sleep 0.1; done
}
stop_serve() { kill -TERM "$pid"; wait "$pid" || true; pid=""; : >"$DIR/serve.log"; }
mib() { echo $(( $1 / 1024 )); }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$pid/status"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
unstored() { curl -s --unix-socket "$DIR/data/api.sock" http://vd/metrics | awk '/^vd_volume_unstored_bytes\{volume="vol1"\}/ {print $2}'; }
U="nbd+unix:///vol1?socket=$DIR/data/nbd.sock"
printf "%-9s %14s %14s %14s %16s %12s %12s\n" "written" "serve peak MiB" "serve idle MiB" "serve info MiB" "snap delete MiB" "scrub MiB" "check MiB"
done_gib=0
snap=0
for w in $WRITTEN; do
  start_serve
  fio --name=fill --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --offset="${done_gib}G" --size="$((w - done_gib))G" \
    --buffer_compress_percentage=70 --refill_buffers >/dev/null
  done_gib=$w
  # A snapshot, then 1% of the data overwritten: history versions for the snapshot, garbage for the scrubber.
  snap=$((snap + 1))
  "$VD" snapshot create vol1 "s$snap" --data-dir "$DIR/data" >/dev/null
  fio --name=over --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size="${w}G" \
    --io_size="$((w * 1024 * 1024 / 100))k" --buffer_compress_percentage=70 --refill_buffers >/dev/null
  fill=$(hwm)
  for _ in $(seq 900); do [ "$(unstored)" -lt $((64 << 20)) ] 2>/dev/null && break; sleep 1; done
  sleep 5
  idle=$(rss)
  "$VD" volume info vol1 --data-dir "$DIR/data" >/dev/null
  info=$(hwm)
  "$VD" snapshot delete vol1 "s$snap" --data-dir "$DIR/data" >/dev/null
  sleep 5  # the dead history is dropped in the background
  delete=$(hwm)
  stop_serve  # drains: the scrubber and the check work from the backend
  /usr/bin/time -f "%M" -o "$DIR/scrub.rss" "$VD" scrub --volume vol1 --threshold 0.9 --data-dir "$DIR/data" --config "$DIR/vd.toml" >/dev/null 2>&1 || true
  /usr/bin/time -f "%M" -o "$DIR/check.rss" "$VD" check vol1 --quick --data-dir "$DIR/data" --config "$DIR/vd.toml" >/dev/null 2>&1 || true
  scrub=$(tail -1 "$DIR/scrub.rss"); check=$(tail -1 "$DIR/check.rss")
  printf "%-9s %14s %14s %14s %16s %12s %12s\n" "${w} GiB" "$(mib "$fill")" "$(mib "$idle")" "$(mib "$info")" "$(mib "$delete")" "$(mib "$scrub")" "$(mib "$check")"
done
