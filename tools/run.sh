#!/usr/bin/env bash
# The main job: install what is needed, build vd (release), create a demo volume if there is none, and run the
# volume router on the embedded default backend (a local directory), exporting every volume over NBD.
#
#   tools/run.sh [--data-dir DIR] [--size 20G] [--volume vol1]
#
# Stop it with Ctrl-C (it uploads everything to the backend, then exits).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="$here/vd-data"
size=20G
volume=vol1
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) data="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --volume) volume="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done
PATH="/opt/swift/usr/bin:$PATH"
"$here/tools/deps.sh"
(cd "$here" && swift build -c release --product vd)
vd="$here/.build/release/vd"
if ! "$vd" volume list --data-dir "$data" | grep -q "^$volume "; then
  "$vd" volume create "$volume" --size "$size" --data-dir "$data"
fi
exec "$vd" serve --data-dir "$data"
