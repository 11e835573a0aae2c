#!/usr/bin/env bash
# One device call (one H200): attention and one denoising step, for the given schedules, in one run.
#   [SCHEDULES=configs/fps/default.yaml,configs/fps/sparse.yaml] [SHARES="0.5 0.25 0.125 0.0625"] \
#     bash scripts/bench_device.sh [pytest args for GPU tests to run first]
# scripts/bench_attention.py at 480p and 720p: the schedules, plus uniform FP8 + top-k schedules at each share of
# SHARES (the kernel's whole-call density curve, from which any schedule's 50-step speedup is read), against cuDNN
# in the same run; scripts/bench_deploy.py: one Wan-1.3B-480p denoising step (CFG batch 2) per schedule vs dense
# bf16. Carry [".whl/site.tar.xz"] (or ".whl"). Back in $OUT: bench_attention.{md,json,png}, bench_deploy.json.
set -u
source scripts/device_env.sh || exit 1
OUT=${OUT:-outputs/device_out}; mkdir -p "$OUT"
SCHEDULES=${SCHEDULES:-configs/fps/default.yaml,configs/fps/sparse.yaml}
CONFIGS=${CONFIGS:-64x128w4s2,128x128w8s3}
if [ $# -gt 0 ]; then python -m pytest -q -m gpu "$@" 2>&1 | tail -n 15; fi
uniform=""
for share in ${SHARES:-0.5 0.25 0.125 0.0625}; do
  file=/tmp/uniform_$share.yaml
  printf 'regimes:\n  - name: all\n    sigma: [0.0, 1.0]\n    quant: {group: tile}\n    sparsity: {pattern: topk, topk_fraction: %s}\n' \
    "$share" > "$file"
  uniform+=",$file"
done
python scripts/bench_attention.py --shapes 480p,720p --configs "$CONFIGS" --schedules "$SCHEDULES$uniform" --out "$OUT" \
  2>&1 | grep -v "^|" | tail -n 60
python scripts/bench_deploy.py --model wan1_3b --latent 21 60 104 --schedules "$SCHEDULES" --out "$OUT/bench_deploy.json" \
  2>&1 | grep "^|"
cat "$OUT/bench_attention.md"
