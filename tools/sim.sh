#!/usr/bin/env bash
# Runs VolumeDriver's deterministic simulation (Sources/VolumeSimulation) for many seeds, or replays one.
#
#   tools/sim.sh --seeds N [--first S] [--ops M] [--jobs J]   prints every failing seed with its trace; exit 1 if any
#   tools/sim.sh --replay SEED [--ops M]                      reruns one seed printing its whole trace
#
# Each seed runs a whole node (router, volumes, uploader, scrubber, checker) on a simulated disk, map store, backend
# and clock, with crashes, power losses and backend faults, checked against a model after every step. The build is
# optimized (a seed takes a fraction of a second); SWIFT_DETERMINISTIC_HASHING=1 makes a seed replay exactly.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PATH="/opt/swift/usr/bin:$PATH"
configuration="${VD_SIM_CONFIGURATION:-release}"
swift build -c "$configuration" --product vd-sim 2>&1 | grep -E "error:|warning: .*Sources" || true
binary="$(swift build -c "$configuration" --show-bin-path)/vd-sim"
[ -x "$binary" ] || { echo "error: $binary was not built" >&2; exit 1; }
export SWIFT_DETERMINISTIC_HASHING=1
exec "$binary" "$@"
