#!/usr/bin/env bash
# Runs every test: installs the packages (native libraries, NBD clients, Ceph RGW), builds with warnings checked,
# starts a real S3-compatible server (Ceph RGW) on loopback for the S3 tests, runs `swift test`, stops the server.
#
#   tools/test.sh [--filter PATTERN]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PATH="/opt/swift/usr/bin:$PATH"
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --filter) filter=(--filter "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
started=$(date +%s)
tools/deps.sh --test

# Build first and refuse warnings in our own sources (dependencies may warn).
log=$(mktemp)
swift build --build-tests 2>&1 | tee "$log" | grep -E "error:|Compiling|Build complete" | tail -3
if grep -E "^/.*(Sources|Tests)/.*warning:" "$log" | grep -v "/.build/" | grep -q .; then
  echo "warnings in VolumeDriver sources:" >&2
  grep -E "^/.*(Sources|Tests)/.*warning:" "$log" | grep -v "/.build/" | sort -u >&2
  exit 1
fi
if grep -q "error:" "$log"; then exit 1; fi

export VD_TEST_TMP="${VD_TEST_TMP:-/tmp}"
if [ -x tools/s3/with-rgw.sh ]; then
  tools/s3/with-rgw.sh swift test --skip-build "${filter[@]}"
else
  swift test --skip-build "${filter[@]}"
fi
echo "all tests passed in $(( $(date +%s) - started )) s"
