#!/usr/bin/env bash
# Runs every test: installs the packages (native libraries, NBD clients, Ceph RGW), builds with warnings checked,
# starts a real S3-compatible server (Ceph RGW) on loopback for the S3 tests, runs the test targets, stops the server.
#
#   tools/test.sh [--filter PATTERN]
#
# Test targets run one at a time (the suites inside a target run in parallel): several tests hold timing bounds
# ("an authentication error comes back within seconds", "the server answers within 5 s") that a 2-core machine
# running every suite at once, plus fio and RGW, cannot honour. Each target's log is kept in $VD_TEST_TMP.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PATH="/opt/swift/usr/bin:$PATH"
filter=""
while [ $# -gt 0 ]; do
  case "$1" in
    --filter) filter="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
started=$(date +%s)
tools/deps.sh --test

# Build first and refuse warnings in our own sources (dependencies may warn).
log=$(mktemp)
swift build --build-tests 2>&1 | tee "$log" | grep -E "error:|Build complete" | tail -3 || true
if grep -E "^/.*(Sources|Tests)/.*warning:" "$log" | grep -v "/.build/" | grep -q .; then
  echo "warnings in VolumeDriver sources:" >&2
  grep -E "^/.*(Sources|Tests)/.*warning:" "$log" | grep -v "/.build/" | sort -u >&2
  exit 1
fi
if grep -q "error:" "$log" || ! grep -q "Build complete" "$log"; then exit 1; fi
echo "built in $(( $(date +%s) - started )) s"

# The simulation replays a seed exactly only with deterministic hashing (dictionary order).
export VD_TEST_TMP="${VD_TEST_TMP:-/tmp}" VD_TEST_FILTER="$filter" SWIFT_DETERMINISTIC_HASHING=1
run_targets() {
  local failed=0 target t0 summary log
  for target in VolumeCoreTests VDCommandsTests VolumeRouterTests SimulationTests NBDServerTests ObjectStoreTests IntegrationTests; do
    t0=$(date +%s)
    log="$VD_TEST_TMP/vd-test-$target.log"
    if [ -n "$VD_TEST_FILTER" ]; then
      swift test --skip-build --filter "^$target\\." --filter "$VD_TEST_FILTER" >"$log" 2>&1 || true
    else
      swift test --skip-build --filter "^$target\\." >"$log" 2>&1 || true
    fi
    summary=$(grep -E "^(✔|✘) Test run with" "$log" | tail -1 || true)
    echo "$target ($(( $(date +%s) - t0 )) s): ${summary:-no result, see $log}"
    if ! grep -q "^✔ Test run with" "$log"; then
      grep -E "^✘|recorded an issue|Fatal error|exited with" "$log" | head -40 || true
      failed=1
    fi
  done
  return $failed
}
export -f run_targets
failed=0
tools/s3/with-rgw.sh bash -c run_targets || failed=1
# A bounded torture run over real NBD (tools/torture.sh): seeded I/O, snapshots, clones, rollbacks, scrubs (killed),
# kill -9 and restarts from the backend, every export checked against a model. Seeds that once failed.
if [ -z "$VD_TEST_FILTER" ]; then
  for seed in 24 4; do
    t0=$(date +%s)
    log="$VD_TEST_TMP/vd-test-torture-$seed.log"
    if VD_BIN="$(swift build --show-bin-path)/vd" tools/torture.sh --seed "$seed" --ops 150 >"$log" 2>&1; then
      echo "torture seed $seed ($(( $(date +%s) - t0 )) s): $(tail -1 "$log")"
    else
      echo "torture seed $seed FAILED ($(( $(date +%s) - t0 )) s), see $log:" >&2
      tail -40 "$log" >&2
      failed=1
    fi
  done
fi
if [ $failed -eq 0 ]; then
  echo "all tests passed in $(( $(date +%s) - started )) s"
else
  echo "tests FAILED after $(( $(date +%s) - started )) s" >&2
  exit 1
fi
