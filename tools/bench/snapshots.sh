#!/usr/bin/env bash
# Snapshot and clone creation time against data written (default 1, 10 and 50 GiB), and the read throughput of a
# clone (reading through to its parent's snapshot) against the parent's, on the embedded backend.
#
#   tools/bench/snapshots.sh [--written "1 10 50"] [--dir DIR]
# Times are what the management API takes (curl on DATA/api.sock), and what the vd command takes end to end.
# A benchmark, not a test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WRITTEN="1 10 50"
DIR="${BENCH_DIR:-/var/tmp/vd-bench-snap}"
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
# The backend compresses SCOs and fio writes data that compresses to about a third, so 50 GiB written fits on a
# modest disk (the local-directory backend otherwise stores every byte written).
cat > "$DIR/vd.toml" <<TOML
[cache]
size = "8G"
[backends.local]
compression = true
TOML
"$VD" volume create parent --size "$((max + 8))G" --data-dir "$DIR/data" --config "$DIR/vd.toml" >/dev/null 2>&1
"$VD" serve --data-dir "$DIR/data" --config "$DIR/vd.toml" --drain-timeout 0 >"$DIR/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "^ready" "$DIR/serve.log" && break; sleep 0.1; done
api() { curl -s -o /dev/null -w "%{time_total}" --unix-socket "$DIR/data/api.sock" -X POST -H 'Content-Type: application/json' -d "$2" "http://vd$1"; }
U="nbd+unix:///parent?socket=$DIR/data/nbd.sock"
unstored() { curl -s --unix-socket "$DIR/data/api.sock" http://vd/metrics | awk '/^vd_volume_unstored_bytes\{volume="parent"\}/ {print $2}'; }
# "busy": right after the fill, while up to upload.max_pending of it is still being sealed and uploaded (the roll's
# file-system syncs then queue behind that write-back); "idle": once the backend holds everything.
printf "%-10s %12s %12s %12s %12s %12s\n" "written" "snap busy s" "snap idle s" "snap CLI s" "clone API s" "clone CLI s"
done_gib=0
for w in $WRITTEN; do
  fio --name=fill --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --offset="${done_gib}G" --size="$((w - done_gib))G" \
    --buffer_compress_percentage=70 --refill_buffers >/dev/null
  done_gib=$w
  snap_busy=$(api /v1/volumes/parent/snapshots "{\"name\":\"busy$w\"}")
  for _ in $(seq 600); do [ "$(unstored)" -lt $((64 << 20)) ] 2>/dev/null && break; sleep 1; done
  sync; sleep 2
  snap_api=$(api /v1/volumes/parent/snapshots "{\"name\":\"a$w\"}")
  t0=$(date +%s.%N); "$VD" snapshot create parent "b$w" --data-dir "$DIR/data" >/dev/null; snap_cli=$(echo "$(date +%s.%N) - $t0" | bc)
  clone_api=$(api /v1/clones "{\"parent\":\"parent\",\"snapshot\":\"a$w\",\"name\":\"c$w\"}")
  t0=$(date +%s.%N); "$VD" clone create "parent@b$w" "d$w" --data-dir "$DIR/data" >/dev/null; clone_cli=$(echo "$(date +%s.%N) - $t0" | bc)
  printf "%-10s %12.3f %12.3f %12.3f %12.3f %12.3f\n" "${w} GiB" "$snap_busy" "$snap_api" "$snap_cli" "$clone_api" "$clone_cli"
done
last=$(echo $WRITTEN | awk '{print $NF}')
read_job() { # uri rw bs depth
  fio --name=r --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="${last}G" --runtime=10 --time_based \
    --output-format=json 2>/dev/null | sed -n '/^{/,$p' | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; print(round(j["bw_bytes"]/1e6), round(j["iops"]))'
}
echo
printf "%-34s %12s %12s\n" "read (10 s)" "parent" "clone c$last"
for job in "read 1M 8" "randread 4k 32"; do
  set -- $job
  p=$(read_job "$U" "$1" "$2" "$3"); c=$(read_job "nbd+unix:///c$last?socket=$DIR/data/nbd.sock" "$1" "$2" "$3")
  printf "%-34s %12s %12s\n" "$1 $2 qd$3 (MB/s IOPS)" "$p" "$c"
done
