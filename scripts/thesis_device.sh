#!/usr/bin/env bash
# One device call (one H200) of the thesis experiment, scripts/thesis.py, on the proving-ground model; a rerun within
# the machine's warm window resumes it (trainings from their checkpoints, evaluations from their videos).
#   [BASE=outputs/carry/proving] [ARMS="a b" ARGS_a="..." ARGS_b="..."] bash scripts/thesis_device.sh DEADLINE_S [args]
# BASE is the dense proving model's deploy folder (carry it: the pack of `scripts/world_models.py proving --pack`,
# unpacked, without its components/). ARMS (default: one arm, `main`) run side by side on the one GPU, each
# `thesis.py --out outputs/thesis/<arm> [args] $ARGS_<arm>` (e.g. two learning rates); the data cache is built once
# before them. Back in $OUT: thesis_results.tar.gz (per arm: tables, results, contact sheets, training curves), and
# KEEP="arm/key ..." (e.g. KEEP="main/qat_fp8_k12") brings those deploys' weights back as <arm>_<key>.safetensors
# (9.6 MB each; a call returns at most 8 files, 64 MiB). Carry [".whl/site.tar.xz", "outputs/carry/proving"]
# (scripts/pack_device_site.sh): the tracked tree (~25 MB) + the wheels (~37 MB) + the base (9.6 MB) exceed the
# 64 MiB a call carries, so move assets/demo_qat (not used here) out of the tree for the call and
# `git checkout assets/demo_qat` after it.
set -u
deadline=${1:?deadline in seconds}; shift
started=$SECONDS
source scripts/device_env.sh || exit 1
OUT=${OUT:-outputs/device_out}; mkdir -p "$OUT"
BASE=${BASE:-outputs/carry/proving}
ARMS=${ARMS:-main}
python scripts/thesis.py --base "$BASE" --out outputs/thesis/data --data-only "$@" 2>&1 | tail -n 3
left=$((deadline - (SECONDS - started)))
for arm in $ARMS; do
  extra=ARGS_$arm
  # shellcheck disable=SC2086  # the arm's arguments split on spaces, as written
  timeout $((left + 45)) python scripts/thesis.py --base "$BASE" --out "outputs/thesis/$arm" --deadline "$left" \
    "$@" ${!extra:-} > "$OUT/thesis_$arm.log" 2>&1 &
done
wait
cd outputs/thesis || exit 1
files=()
for arm in $ARMS; do
  grep -v "it/s]" "$OUT/thesis_$arm.log" | tail -n 60
  files+=($(ls "$arm"/thesis.md "$arm"/report.json "$arm"/thesis.log "$arm"/schedules/* "$arm"/eval/*/results.* \
    "$arm"/eval/*/*.png "$arm"/runs/*/logs/metrics.csv "$arm"/runs/*.log "$arm"/deploys/*.log "$arm"/eval/*.log \
    2>/dev/null))
done
tar czf "$OUT/thesis_results.tar.gz" "${files[@]}"
for key in ${KEEP:-}; do
  cp "${key%%/*}/deploys/${key#*/}/diffusion_pytorch_model.safetensors" "$OUT/${key%%/*}_${key#*/}.safetensors"
done
rm -f "$OUT"/thesis_*.log
ls -la "$OUT"
