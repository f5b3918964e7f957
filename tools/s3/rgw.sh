#!/usr/bin/env bash
# A throw-away Ceph RGW (S3-compatible) server on loopback for the S3 tests and benchmarks.
#
#   tools/s3/rgw.sh start DIR   installs the Debian packages if missing, starts one mon, one memstore OSD and radosgw
#                               with all state, logs and pids under DIR, creates a test user, waits until S3 answers,
#                               and writes DIR/env (VD_TEST_S3_* variables; `source DIR/env`).
#   tools/s3/rgw.sh env DIR     prints DIR/env.
#   tools/s3/rgw.sh stop DIR    kills every process this script started for DIR (TERM, then KILL after 10 s).
#
# Everything listens on 127.0.0.1 only. Data lives in the OSD's memory (memstore, bounded to 3 GiB; deleted data is
# garbage-collected within seconds): nothing survives `stop`. Idle it takes ~150 MB; each stored byte costs about
# two bytes of OSD memory.
# Needs root for apt-get on a fresh Debian 12 machine; afterwards any user can run it.
set -euo pipefail

readonly ACCESS_KEY="VDTESTACCESSKEY00001"
readonly SECRET_KEY="vdtestsecretkey0000000000000000000000001"
readonly BUCKET_PREFIX="vd-test"
readonly START_ATTEMPTS="${VD_RGW_START_ATTEMPTS:-3}"

usage() {
    echo "usage: $0 start|stop|env DIR" >&2
    exit 2
}

log() { echo "rgw.sh: $*" >&2; }

die() {
    log "error: $*"
    exit 1
}

install_packages() {
    local missing=()
    for tool in radosgw ceph-mon ceph-osd radosgw-admin monmaptool ceph ceph-authtool; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing radosgw ceph-mon ceph-osd (missing: ${missing[*]})"
    [ "$(id -u)" -eq 0 ] || die "radosgw/ceph are not installed and this is not root: run as root or apt-get install radosgw ceph-mon ceph-osd"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd >/dev/null
    fi
}

# shellcheck source=tools/s3/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Runs "$@" in the background detached from the terminal, appends its pid to DIR/pids.
spawn() {
    local name="$1"
    shift
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo "$! $name" >>"$DIR/pids"
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.2 s; returns 1 (after printing the logs) if it never
# succeeds within SECONDS.
wait_for() {
    local what="$1" limit="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "$what was not ready after ${limit} s; last log lines:"
            tail -n 5 "$DIR"/log/*.log "$DIR"/log/*.out >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.2
    done
}

s3_answers() {
    # Any HTTP status line from the beast frontend means RGW serves S3.
    exec 3<>"/dev/tcp/127.0.0.1/$RGW_PORT" || return 1
    printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
    local line
    read -r -t 5 line <&3 || return 1
    exec 3<&-
    [[ "$line" == HTTP/1.1* ]]
}

osd_up() {
    ceph -c "$CONF" --connect-timeout 5 osd stat 2>/dev/null | grep -q '1 up'
}

start() {
    [ -e "$DIR/pids" ] && die "$DIR already holds a running (or unstopped) cluster; run: $0 stop $DIR"
    install_packages
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    local started=$SECONDS
    # Should a fresh cluster still fail to come up, starting over from nothing is cheap and reliable.
    for attempt in $(seq 1 $START_ATTEMPTS); do
        if start_once; then
            log "ready in $((SECONDS - started)) s: S3 at 127.0.0.1:$RGW_PORT (source $DIR/env)"
            cat "$DIR/env"
            return 0
        fi
        stop_all
        log "start attempt $attempt of $START_ATTEMPTS failed"
        [ "$attempt" -lt $START_ATTEMPTS ] && rm -rf "${DIR:?}"/{mon,osd,run,log,rgw,ceph.conf,keyring,monmap,env}
    done
    die "could not start RGW in $START_ATTEMPTS attempts; logs in $DIR/log"
}

start_once() {
    mkdir -p "$DIR"/{mon,osd,run,log,rgw}
    local fsid osd_uuid mon_port
    fsid="$(cat /proc/sys/kernel/random/uuid)"
    osd_uuid="$(cat /proc/sys/kernel/random/uuid)"
    mon_port="$(free_port)"
    RGW_PORT="$(free_port)"
    CONF="$DIR/ceph.conf"
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
mon initial members = a
ms bind msgr2 = false
ms bind ipv4 = true
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
log to stderr = false
err to stderr = true
keyring = $DIR/keyring
osd objectstore = memstore
memstore device bytes = 3221225472
osd data = $DIR/osd/\$cluster-\$id
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd crush update on start = false
osd class update on start = false
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data = $DIR/mon/\$cluster-\$id
mon data avail warn = 1
mon data avail crit = 0
mon max pg per osd = 1000
osd max object name len = 460
osd max object namespace len = 64

[client.rgw.vd]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $DIR/rgw
rgw dns name = localhost
rgw thread pool size = 64
# Deleted objects' data goes to RGW's garbage collector, which by default waits 2 hours: in a memstore OSD that is
# memory. Collect within seconds instead, so long test and benchmark runs stay within the memstore bound.
rgw gc obj min wait = 1
rgw gc processor period = 2
rgw gc processor max time = 2
EOF
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    monmaptool --create --addv a "[v1:127.0.0.1:$mon_port]" --fsid "$fsid" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" || return 1
    spawn mon ceph-mon -c "$CONF" -i a -f
    wait_for "ceph-mon" 30 ceph -c "$CONF" --connect-timeout 5 mon stat || return 1

    local osd_id
    osd_id="$(ceph -c "$CONF" --connect-timeout 10 osd new "$osd_uuid")" || return 1
    # Place the OSD in the CRUSH map here rather than from the OSD's start-up: its own start-up commands can race
    # its first monmap and be refused ("wrong fsid"), which leaves the OSD down.
    ceph -c "$CONF" --connect-timeout 10 osd crush add-bucket vdhost host >/dev/null 2>&1 || return 1
    ceph -c "$CONF" --connect-timeout 10 osd crush move vdhost root=default >/dev/null 2>&1 || return 1
    ceph -c "$CONF" --connect-timeout 10 osd crush add "osd.$osd_id" 1.0 host=vdhost >/dev/null 2>&1 || return 1
    mkdir -p "$DIR/osd/ceph-$osd_id"
    ceph-osd -c "$CONF" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/osd-mkfs.out" 2>&1 || return 1
    spawn osd ceph-osd -c "$CONF" -i "$osd_id" -f
    wait_for "ceph-osd" 30 osd_up || return 1

    spawn rgw radosgw -c "$CONF" -n client.rgw.vd -f
    timeout 60 radosgw-admin -c "$CONF" user create --uid=vdtest --display-name="VolumeDriver tests" \
        --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null || return 1
    wait_for "radosgw" 60 s3_answers || return 1

    cat >"$DIR/env" <<EOF
export VD_TEST_S3_ENDPOINT=127.0.0.1:$RGW_PORT
export VD_TEST_S3_ACCESS_KEY=$ACCESS_KEY
export VD_TEST_S3_SECRET_KEY=$SECRET_KEY
export VD_TEST_S3_BUCKET=$BUCKET_PREFIX
EOF
}

stop_all() {
    [ -f "$DIR/pids" ] || return 0
    local pids=()
    # Reverse start order: radosgw, osd, mon.
    while read -r pid name; do pids=("$pid" "${pids[@]}"); done <"$DIR/pids"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$DIR/pids"
}

[ $# -eq 2 ] || usage
COMMAND="$1"
DIR="$2"
case "$COMMAND" in
start) start ;;
stop)
    stop_all
    log "stopped (state left in $DIR)"
    ;;
env)
    [ -f "$DIR/env" ] || die "no $DIR/env: run $0 start $DIR first"
    cat "$DIR/env"
    ;;
*) usage ;;
esac
