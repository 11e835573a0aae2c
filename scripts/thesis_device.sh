#!/usr/bin/env bash
# One device call (one H200) of the thesis experiment, scripts/thesis.py, on the proving-ground model; a rerun within
# the machine's warm window resumes it (trainings from their checkpoints, evaluations from their videos).
#   [BASE=outputs/carry/proving] bash scripts/thesis_device.sh DEADLINE_S [thesis.py args]
# BASE is the dense proving model's deploy folder (carry it: the pack of `scripts/world_models.py proving --pack`,
# unpacked, without its components/). Back in $OUT: thesis_results.tar.gz (tables, results, contact sheets,
# training curves). Carry [".whl/site.tar.xz", "outputs/carry/proving"] (scripts/pack_device_site.sh): the tracked
# tree (~25 MB) + the wheels (~37 MB) + the base (9.6 MB) exceed the 64 MiB a call carries, so move assets/demo_qat
# (not used here) out of the tree for the call and `git checkout assets/demo_qat` after it.
set -u
deadline=${1:?deadline in seconds}; shift
source scripts/device_env.sh || exit 1
OUT=${OUT:-outputs/device_out}; mkdir -p "$OUT"
BASE=${BASE:-outputs/carry/proving}
timeout $((deadline + 45)) python scripts/thesis.py --base "$BASE" --deadline "$deadline" "$@" 2>&1 | grep -v "it/s]" | tail -n 120
cd outputs/thesis && tar czf "$OUT/thesis_results.tar.gz" --ignore-failed-read thesis.md report.json thesis.log \
  schedules $(ls eval/*/results.* eval/*/*.png runs/*/logs/metrics.csv runs/*.log deploys/*.log \
  eval/*.log 2>/dev/null)
ls -la "$OUT"
