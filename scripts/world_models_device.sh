#!/usr/bin/env bash
# One device call of the world models (device tool, one H200): demo_base and proving train side by side on the
# one GPU (each is too small to fill it), then each is exported and evaluated. Back in $OUT (the device tool's
# limit is 8 files): <which>_results.tar.gz (report.json, evaluation tables and contact sheets, metrics.csv, the
# log's tail) per model, and demo_base.tar.gz (the packed weights + encoders). A rerun within the machine's warm
# window resumes both runs (checkpoints and data stay under outputs/ and .fpsa_data/).
#   bash scripts/world_models_device.sh DEADLINE_S [extra world_models.py args, for both]
# e.g. bash scripts/world_models_device.sh 560 --reserve 110 --eval-steps 25 --eval-seeds "[1000]"
set -u
deadline=${1:?deadline in seconds}; shift
source scripts/device_env.sh || exit 1
OUT=${OUT:-outputs/device_out}
mkdir -p outputs "$OUT"
for which in demo_base proving; do
  pack=(); [ "$which" = demo_base ] && pack=(--pack outputs/packs)  # proving's weights (72 MB) exceed a file's 16 MB
  python scripts/world_models.py "$which" --deadline "$deadline" "${pack[@]}" "$@" > "outputs/$which.stdout" 2>&1 &
done
sleep 60; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
wait
for which in demo_base proving; do
  run=outputs/$which
  tail -n 80 "outputs/$which.stdout" > "$run/stdout_tail.txt"
  grep -a -o "Epoch [0-9]*:[^]]*it/s[^]]*]" "$run/world_models.log" | tail -n 3 > "$run/speed.txt"
  (cd "$run" && tar czf "$OUT/${which}_results.tar.gz" --ignore-failed-read report.json stdout_tail.txt speed.txt \
     train/logs/metrics.csv $(ls -d eval*/results.md eval*/results.json eval*/*.png 2>/dev/null))
  echo "== $which"; cat "$run/speed.txt"; head -c 4000 "$run/report.json" 2>/dev/null; echo
done
cp outputs/packs/demo_base.tar.gz "$OUT/" 2>/dev/null
ls -la "$OUT"
