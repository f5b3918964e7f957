#!/usr/bin/env bash
# A quick S3 server for poking at things by hand: moto_server on 127.0.0.1, started in 1 s. It checks no signatures
# (so it cannot test authentication) and keeps everything in memory. RGW (tools/s3/rgw.sh) is the reference server
# for the tests; this is an optional helper only.
#
#   tools/s3/moto.sh start DIR [BUCKET]   starts moto_server (pip install 'moto[server]' if missing), creates BUCKET
#                                        (default vd-test) and writes DIR/env like rgw.sh
#   tools/s3/moto.sh stop DIR
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR [BUCKET]" >&2; exit 2; }
[ $# -ge 2 ] || usage
COMMAND="$1"
DIR="$2"
BUCKET="${3:-vd-test}"

case "$COMMAND" in
start)
    [ -e "$DIR/moto.pid" ] && { echo "moto.sh: $DIR already has a server; run: $0 stop $DIR" >&2; exit 1; }
    command -v moto_server >/dev/null 2>&1 || python3 -m pip install --quiet 'moto[server]'
    mkdir -p "$DIR"
    port=$((20000 + RANDOM % 10000))
    setsid moto_server -H 127.0.0.1 -p "$port" >"$DIR/moto.log" 2>&1 </dev/null &
    echo $! >"$DIR/moto.pid"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    # Path-style bucket creation needs no signature on moto.
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'PUT /%s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$BUCKET" "$port" >&3
    read -r -t 5 status <&3 || true
    exec 3<&-
    cat >"$DIR/env" <<ENV
export VD_TEST_S3_ENDPOINT=127.0.0.1:$port
export VD_TEST_S3_ACCESS_KEY=moto
export VD_TEST_S3_SECRET_KEY=moto
export VD_TEST_S3_BUCKET=$BUCKET
ENV
    echo "moto.sh: S3 (unsigned) at 127.0.0.1:$port, bucket $BUCKET created (${status:-no answer})" >&2
    cat "$DIR/env"
    ;;
stop)
    if [ -f "$DIR/moto.pid" ]; then
        kill "$(cat "$DIR/moto.pid")" 2>/dev/null || true
        rm -f "$DIR/moto.pid"
    fi
    ;;
*) usage ;;
esac
