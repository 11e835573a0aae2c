#!/usr/bin/env bash
# One device call of the world models (device tool, one H200): the runs named in $WHICH (default "proving demo_qat")
# train side by side on the one GPU (each is too small to fill it), then each is exported and evaluated. Back in
# $OUT (the device tool's limit is 8 files): <which>_results.tar.gz (report.json, evaluation tables and contact
# sheets, metrics.csv, the log's tail) and <which>.tar.gz (the packed weights + encoders) per run. A rerun within the
# machine's warm window resumes the runs (checkpoints and data stay under outputs/ and .fpsa_data/).
#   [WHICH="..."] bash scripts/world_models_device.sh DEADLINE_S [extra world_models.py args, for every run]
# Per-run arguments: $ARGS_<which>, e.g. ARGS_demo_qat="--vs-start configs/fps/default.yaml".
# e.g. bash scripts/world_models_device.sh 560 --reserve 110 --eval-steps 25 --eval-seeds "[1000]"
set -u
deadline=${1:?deadline in seconds}; shift
source scripts/device_env.sh || exit 1
OUT=${OUT:-outputs/device_out}
mkdir -p outputs "$OUT"
WHICH=${WHICH:-proving demo_qat}
for which in $WHICH; do
  extra_var="ARGS_$which"; read -r -a extra <<< "${!extra_var:-}"
  python scripts/world_models.py "$which" --deadline "$deadline" --pack outputs/packs "${extra[@]}" "$@" \
    > "outputs/$which.stdout" 2>&1 &
done
sleep 60; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
wait
for which in $WHICH; do
  run=outputs/$which
  tail -n 80 "outputs/$which.stdout" > "$run/stdout_tail.txt"
  grep -a -o "Epoch [0-9]*:[^]]*it/s[^]]*]" "$run/world_models.log" | tail -n 3 > "$run/speed.txt"
  (cd "$run" && tar czf "$OUT/${which}_results.tar.gz" --ignore-failed-read report.json stdout_tail.txt speed.txt \
     train/logs/metrics.csv $(ls -d eval*/results.md eval*/results.json eval*/*.png 2>/dev/null))
  echo "== $which"; cat "$run/speed.txt"; head -c 4000 "$run/report.json" 2>/dev/null; echo
done
for which in $WHICH; do cp "outputs/packs/$which.tar.gz" "$OUT/" 2>/dev/null; done
ls -la "$OUT"
