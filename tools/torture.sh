#!/usr/bin/env bash
# Process-level torture test: a seeded random sequence of NBD I/O, snapshots, rollbacks, clones, scrubs (killed or
# under load), kill -9 / SIGTERM of `vd serve` and restarts from the backend alone, checked against an exact model
# (tools/torture/torture.py does the work). Exit 0 when every operation passed, 1 on the first mismatch (seed,
# operation, trace tail, differing sectors and the vd serve log path are printed), 2 on an error of the tool itself.
#
#   tools/torture.sh --seed S [--ops N] [--keep] [--work DIR]
#
# Uses $VD_BIN when set, else builds vd (debug) in this checkout's .build. Installs python3-libnbd with apt if missing.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

usage() { echo "usage: $0 --seed S [--ops N] [--keep] [--work DIR]" >&2; exit 2; }
args=()
seen_seed=no
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) [ $# -ge 2 ] || usage; args+=(--seed "$2"); seen_seed=yes; shift 2 ;;
    --ops|--work) [ $# -ge 2 ] || usage; args+=("$1" "$2"); shift 2 ;;
    --keep) args+=(--keep); shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[ "$seen_seed" = yes ] || usage

# libnbd's Python binding comes from Debian and is importable by the system Python only.
python=/usr/bin/python3
if ! "$python" -c 'import nbd' 2>/dev/null; then
  echo "torture: installing python3-libnbd" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3 python3-libnbd >/dev/null
fi

if [ -n "${VD_BIN:-}" ]; then
  vd="$VD_BIN"
else
  PATH="/opt/swift/usr/bin:$PATH"
  "$here/tools/deps.sh"
  build_log="$(mktemp -t vd-torture-build.XXXXXX)"
  if ! (cd "$here" && swift build --product vd) >"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    echo "torture: building vd failed (full log: $build_log)" >&2
    exit 2
  fi
  rm -f "$build_log"
  vd="$(cd "$here" && swift build --product vd --show-bin-path)/vd"
fi
[ -x "$vd" ] || { echo "torture: no vd binary at $vd" >&2; exit 2; }

exec "$python" "$here/tools/torture/torture.py" --vd "$vd" "${args[@]}"
