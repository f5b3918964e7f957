#!/usr/bin/env bash
# Runs a command with a throw-away Ceph RGW: starts it in a temporary directory (tools/s3/rgw.sh), exports
# VD_TEST_S3_ENDPOINT, VD_TEST_S3_ACCESS_KEY, VD_TEST_S3_SECRET_KEY and VD_TEST_S3_BUCKET, runs the command, stops RGW
# (also on Ctrl-C or failure), removes the directory, and exits with the command's status.
#
#   tools/s3/with-rgw.sh swift test --filter ObjectStoreTests
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="$(mktemp -d "${TMPDIR:-/tmp}/vd-rgw.XXXXXX")"

cleanup() {
    "$HERE/rgw.sh" stop "$DIR" >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$HERE/rgw.sh" start "$DIR" >/dev/null
# shellcheck disable=SC1091
source "$DIR/env"
set +e
"$@"
status=$?
set -e
exit $status
