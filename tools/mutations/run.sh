#!/usr/bin/env bash
# The mutation check of docs/simulation.md: for each named mutation (tools/mutations/apply.py), apply it to this
# checkout's Sources, run the scripted scenarios and map/snapshot/scrub unit tests, then the random simulation (release
# vd-sim, seeds 1-200 x 200 operations), record what failed, and restore Sources. Run on a clean tree.
#
#   tools/mutations/run.sh M1 M4 M17+M19 ...     summary in $VD_TEST_TMP/mutations/summary (default /tmp)
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
[ -z "$(git status --porcelain Sources)" ] || { echo "Sources has uncommitted changes" >&2; exit 2; }
export PATH="/opt/swift/usr/bin:$PATH" SWIFT_DETERMINISTIC_HASHING=1 VD_SKIP_S3=1
out="${VD_TEST_TMP:-/tmp}/mutations"; mkdir -p "$out"
trap 'git checkout -q -- Sources' EXIT
for m in "$@"; do
  git checkout -q -- Sources
  for part in ${m//+/ }; do python3 tools/mutations/apply.py "$part" >/dev/null || { echo "$m: does not apply" | tee -a "$out/summary"; continue 2; }; done
  swift build --build-tests >"$out/$m-build.log" 2>&1 || { echo "$m: build failed" | tee -a "$out/summary"; continue; }
  swift test --skip-build --filter 'DataSafetyScenarioTests|BlockMapTests|SnapshotTests|ScrubTests' >"$out/$m-tests.log" 2>&1
  failing=$(grep -oE "^✘ Test [A-Za-z]+" "$out/$m-tests.log" | sort -u | sed 's/✘ Test //' | tr '\n' ' ')
  swift build -c release --product vd-sim >"$out/$m-release.log" 2>&1
  "$(swift build -c release --show-bin-path)/vd-sim" --seeds 200 --first 1 --ops 200 --jobs 2 --trace-lines 0 >"$out/$m-sim.log" 2>&1
  echo "$m: tests failing: ${failing:-none}; simulation: $(tail -1 "$out/$m-sim.log")" | tee -a "$out/summary"
done
