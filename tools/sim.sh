#!/usr/bin/env bash
# Runs VolumeDriver's deterministic simulation (Sources/VolumeSimulation) for many seeds, or replays one.
#
#   tools/sim.sh --seeds N [--first S] [--ops M] [--jobs J] [--ownership on|off|by-seed] [--dtl on|off|by-seed]
#                                                  prints every failing seed with its trace; exit 1 if any
#   tools/sim.sh --replay SEED [--ops M] [--ownership on|off|by-seed]   reruns one seed printing its whole trace
#
# Each seed runs a whole node (router, volumes, uploader, scrubber, checker) on a simulated disk, map store, backend
# and clock, with crashes, power losses and backend faults, checked against a model after every step. The build is
# optimized (a seed takes a fraction of a second); SWIFT_DETERMINISTIC_HASHING=1 makes a seed replay exactly.
# Seeds run in batches of VD_SIM_BATCH (100), one process each: a seed's killed routers leave suspended tasks that
# are never freed (a simulated crash drops their jobs), so one process for a thousand seeds would grow without bound.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PATH="/opt/swift/usr/bin:$PATH"
configuration="${VD_SIM_CONFIGURATION:-release}"
swift build -c "$configuration" --product vd-sim 2>&1 | grep -E "error:|warning: .*Sources" || true
binary="$(swift build -c "$configuration" --show-bin-path)/vd-sim"
[ -x "$binary" ] || { echo "error: $binary was not built" >&2; exit 1; }
export SWIFT_DETERMINISTIC_HASHING=1

seeds="" first=1 rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="$2"; shift 2 ;;
    --first) first="$2"; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
[ -n "$seeds" ] || exec "$binary" --first "$first" "${rest[@]}"

batch="${VD_SIM_BATCH:-100}"
failed=0 start=$SECONDS
for ((offset = 0; offset < seeds; offset += batch)); do
  count=$((seeds - offset < batch ? seeds - offset : batch))
  "$binary" --seeds "$count" --first $((first + offset)) "${rest[@]}" || failed=1
done
echo "tools/sim.sh: $seeds seed(s) from $first in $((SECONDS - start)) s: $([ $failed = 0 ] && echo "all passed" || echo "FAILURES above")"
exit $failed
