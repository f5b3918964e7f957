#!/usr/bin/env bash
# Volumes on S3, measured end to end against a real S3-compatible server (Ceph RGW unless VD_TEST_S3_* points
# elsewhere), with raw libs3 PUT throughput of the same object size measured in the same run:
#   - upload: write DATA to a volume (fio, 1 MiB sequential), then time the SIGTERM drain that uploads it all;
#   - restart: wipe the local flash, `vd volume attach` on a fresh data directory, time `vd serve` until ready;
#   - cold reads after that restart: 10 s of 4 KiB random reads (a cold cache warming up), then 1 MiB sequential
#     reads of everything (the part not yet fetched comes from S3).
#
#   tools/bench/s3-volume.sh [--data "512M 2G"] [--compression true|false] [--signatures "v4 v2"]
# Each data size runs once per signature (V4: AsyncHTTPClient; V2: libs3), so the two transports meet the same
# server in the same run.
# A benchmark, not a test. Compare only figures from the same run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA_SIZES="512M 2G"
COMPRESSION=true
SIGNATURES="v4 v2"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA_SIZES="$2"; shift 2 ;;
    --compression) COMPRESSION="$2"; shift 2 ;;
    --signatures) SIGNATURES="$2"; shift 2 ;;
    *) echo "usage: $0 [--data \"512M 2G\"] [--compression true|false] [--signatures \"v4 v2\"]" >&2; exit 2 ;;
  esac
done
cd "$ROOT"
swift build -c release --product vd >&2
swift build -c release --product vd-bench-s3 >&2
BIN_DIR="$(swift build -c release --show-bin-path)"
export VD="$BIN_DIR/vd" BENCH_S3="$BIN_DIR/vd-bench-s3" DATA_SIZES COMPRESSION SIGNATURES

run_all() {
  set -euo pipefail
  export AWS_ACCESS_KEY_ID="$VD_TEST_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$VD_TEST_S3_SECRET_KEY"
  work="$(mktemp -d /var/tmp/vd-s3bench.XXXXXX)"
  trap 'pkill -f "vd serve --data-dir $work" 2>/dev/null || true; rm -rf "$work"' EXIT
  echo "== raw transports and S3Store PUT throughput, 64 MiB objects (same server, same run)"
  "$BENCH_S3" --objects 8 --size 64M --concurrency 4 --repeat 1 | tail -n 14
  printf "\n%-8s %-4s %14s %14s %14s %14s\n" "data" "sig" "drain MB/s" "restart s" "cold rand IOPS" "seq read MB/s"
  for data in $DATA_SIZES; do
  for signature in $SIGNATURES; do
    bucket="vd-bench-$(date +%s%N)"
    url="s3://$bucket?endpoint=$VD_TEST_S3_ENDPOINT&scheme=http&signature=$signature"
    cat > "$work/vd.toml" <<TOML
default_backend = "s3"
[upload]
max_pending = "8G"
concurrency = 4
[cache]
size = "16G"
[backends.s3]
url = "$url"
compression = $COMPRESSION
TOML
    "$VD" backend check --config "$work/vd.toml" --data-dir "$work/a" --create-bucket >/dev/null
    "$VD" volume create bench --size 8G --config "$work/vd.toml" --data-dir "$work/a" >/dev/null
    "$VD" serve --config "$work/vd.toml" --data-dir "$work/a" --drain-timeout 3600 >"$work/a.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q "^ready" "$work/a.log" && break; sleep 0.1; done
    fio --name=w --ioengine=nbd --uri="nbd+unix:///bench?socket=$work/a/nbd.sock" --rw=write --bs=1M --iodepth=8 \
      --size="$data" >/dev/null
    bytes=$(du -sb "$work/a/flash/bench/sco" | cut -f1)
    start=$(date +%s.%N)
    kill -TERM $pid; wait $pid
    drain=$(echo "$(date +%s.%N) - $start" | bc)
    rm -rf "$work/a"
    "$VD" volume attach bench --config "$work/vd.toml" --data-dir "$work/b" >/dev/null
    start=$(date +%s.%N)
    "$VD" serve --config "$work/vd.toml" --data-dir "$work/b" --drain-timeout 0 >"$work/b.log" 2>&1 &
    pid=$!
    for _ in $(seq 6000); do grep -q "^ready" "$work/b.log" && break; sleep 0.05; done
    restart=$(echo "$(date +%s.%N) - $start" | bc)
    rand_read=$(fio --name=rr --ioengine=nbd --uri="nbd+unix:///bench?socket=$work/b/nbd.sock" --rw=randread --bs=4k \
      --iodepth=32 --size="$data" --runtime=10 --time_based --output-format=json | sed -n '/^{/,$p' | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
    seq_read=$(fio --name=r --ioengine=nbd --uri="nbd+unix:///bench?socket=$work/b/nbd.sock" --rw=read --bs=1M \
      --iodepth=8 --size="$data" --output-format=json | sed -n '/^{/,$p' | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"]/1e6))')
    kill -TERM $pid; wait $pid || true
    rm -rf "$work/b"
    printf "%-8s %-4s %14.0f %14.1f %14s %14s\n" "$data" "$signature" "$(echo "$bytes / 1000000 / $drain" | bc -l)" "$restart" "$rand_read" "$seq_read"
  done
  done
}
export -f run_all
if [ -n "${VD_TEST_S3_ENDPOINT:-}" ]; then run_all; else "$ROOT/tools/s3/with-rgw.sh" bash -c run_all; fi
