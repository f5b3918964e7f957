#!/usr/bin/env bash
# Profile: where `vd serve` spends its CPU under one fio workload over NBD (perf, from Debian's linux-perf).
#
#   tools/bench/profile.sh [--job seqwrite|randwrite|randread|flushwrite|randwrite2] [--seconds 8] [--vd PATH]
#                          [--dir DIR] [--size 4G]
#
# Prints the workload's figure, the share of samples per thread, per library, and the heaviest call paths (inclusive)
# and functions (exclusive). The perf data stays in DIR/perf.data for `perf report -i`. Not a test.
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${BENCH_DIR:-/var/tmp/vd-profile}"
job=randwrite
seconds=8
size=4G
vd=""
while [ $# -gt 0 ]; do
  case "$1" in
    --job) job="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --vd) vd="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for tool in fio perf; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install fio linux-perf)" >&2; exit 1; }
done
if [ -z "$vd" ]; then
  (cd "$here" && swift build -c release --product vd >&2)
  vd="$here/.build/release/vd"
fi
rm -rf "$dir"
mkdir -p "$dir"
"$vd" volume create bench --size "$size" --data-dir "$dir/data" >/dev/null
"$vd" serve --data-dir "$dir/data" --nbd-socket "$dir/nbd.sock" --drain-timeout 0 >"$dir/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && break; sleep 0.1; done

uri="nbd+unix:///bench?socket=$dir/nbd.sock"
case "$job" in
  seqwrite) args=(--rw=write --bs=1M --iodepth=8) ;;
  randwrite) args=(--rw=randwrite --bs=4k --iodepth=32) ;;
  randread)
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=2G >/dev/null
    args=(--rw=randread --bs=4k --iodepth=32 --size=2G) ;;
  flushwrite) args=(--rw=randwrite --bs=4k --iodepth=1 --fsync=1) ;;
  randwrite2) args=(--rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --group_reporting) ;;
  *) echo "unknown job $job" >&2; exit 2 ;;
esac
fio --name="$job" --ioengine=nbd --uri="$uri" --size="$size" "${args[@]}" --runtime=$((seconds + 3)) --time_based \
  --output-format=json >"$dir/fio.json" 2>"$dir/fio.err" &
fio_pid=$!
sleep 1.5
perf record -F 999 -g -p "$pid" -o "$dir/perf.data" -- sleep "$seconds" >/dev/null 2>&1
wait "$fio_pid"
python3 - "$dir/fio.json" "$job" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
data = json.loads(text[text.index("{"):])["jobs"][0]
side = data["read"] if sys.argv[2] == "randread" else data["write"]
print(f"{sys.argv[2]}: {side['iops']:.0f} IOPS, {side['bw_bytes'] / 1e6:.0f} MB/s, "
      f"p99 {side['clat_ns']['percentile']['99.000000'] / 1e6:.2f} ms")
PY
echo "--- samples per thread"
perf report -i "$dir/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null | grep '%' | head -8
echo "--- samples per library"
perf report -i "$dir/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep '%' | head -8
echo "--- heaviest call paths (inclusive, VolumeDriver and RocksDB frames)"
perf report -i "$dir/perf.data" --children --sort sym --stdio -g none 2>/dev/null | grep '%' \
  | grep -E 'VolumeRouter|BlockMap|NBDServer|TransactionLog|FlashIO|rocksdb::DBImpl|rocksdb::CompactionJob::Run|crc32c|pwritev|fdatasync' \
  | head -25 | cut -c1-160
echo "--- heaviest functions (exclusive)"
perf report -i "$dir/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep '%' | head -25 | cut -c1-160
