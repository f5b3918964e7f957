#!/usr/bin/env bash
# Runs a command with two throw-away S3 servers: Ceph RGW (tools/s3/rgw.sh; signatures V2 and V4) and rclone serve s3
# (tools/s3/rclone.sh; V4 only, an independent implementation), in a temporary directory. Exports
# VD_TEST_S3_ENDPOINT, VD_TEST_S3_ACCESS_KEY, VD_TEST_S3_SECRET_KEY, VD_TEST_S3_BUCKET (RGW) and
# VD_TEST_S3_RCLONE_ENDPOINT, VD_TEST_S3_RCLONE_ACCESS_KEY, VD_TEST_S3_RCLONE_SECRET_KEY, runs the command, stops
# both (also on Ctrl-C or failure), removes the directory, and exits with the command's status.
#
#   tools/s3/with-rgw.sh swift test --filter ObjectStoreTests
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="$(mktemp -d "${TMPDIR:-/tmp}/vd-rgw.XXXXXX")"

cleanup() {
    "$HERE/rgw.sh" stop "$DIR" >/dev/null 2>&1 || true
    "$HERE/rclone.sh" stop "$DIR/rclone" >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$HERE/rgw.sh" start "$DIR" >/dev/null
# shellcheck disable=SC1091
source "$DIR/env"
"$HERE/rclone.sh" start "$DIR/rclone" >/dev/null
# shellcheck disable=SC1091
source "$DIR/rclone/env"
set +e
"$@"
status=$?
set -e
exit $status
