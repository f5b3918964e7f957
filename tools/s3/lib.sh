# Shared by the loopback S3 server scripts (rgw.sh, rclone.sh); sourced, not run. Callers define die().

# A TCP port on 127.0.0.1 that nothing listens on: random in BASE..BASE+9999 (default 20000), probed with bash's
# /dev/tcp. The two servers use different ranges so they never pick the same port.
free_port() {
    local base="${1:-20000}" port
    for _ in $(seq 1 100); do
        port=$((base + RANDOM % 10000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free TCP port found on 127.0.0.1"
}
