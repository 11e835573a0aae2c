#!/usr/bin/env bash
# Issue 19's end-to-end measurements on one lent H200 (device tool), as stages that fit its 10-minute calls:
#   bash scripts/bench_e2e.sh STAGE...      results (JSON, logs) under $OUT (default /tmp/e2e)
# Stages:
#   tests      the gpu-marked tests of the deploy runtime, compile, selection and the training kernels
#   probe      scripts/experiments/probe_ws2d.py at 480p (warp-specialised forward variants)
#   1.3b[-compile][-fp8][-gluon]   bench_deploy at Wan-1.3B 480p (latent 21×60×104), default and sparse schedules;
#              the eager one also times a whole 50-step sample and profiles each step (breakdown)
#   14b-<schedule>[-compile][-fp8][-gluon]   bench_deploy at Wan-14B 720p (latent 21×90×160), one schedule per stage,
#              random weights built on the GPU (--no-export), one timed step after one untimed
# Suffixes: -compile (--compile), -fp8 (--fp8-linears), -gluon (--gluon: the kernel's Gluon forward).
# Each stage has its own time limit so one hang cannot eat the call. Then `python scripts/bench_e2e_report.py`
# (here) turns the JSON files into docs/bench_e2e_h200.{md,png}.
# Needs: source scripts/device_env.sh (carry .whl/site.tar.xz).
set -u
OUT=${OUT:-/tmp/e2e}
mkdir -p "$OUT"
run() {  # run NAME LIMIT CMD...: stdout+stderr to $OUT/NAME.log; its status and seconds to stages.tsv
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/stages.tsv"
  tail -4 "$OUT/$name.log"
}
flags() {  # the bench_deploy flags of a stage name's suffixes
  case $1 in *-compile*) printf -- '--compile ';; esac
  case $1 in *-fp8*) printf -- '--fp8-linears ';; esac
  case $1 in *-gluon*) printf -- '--gluon ';; esac
}
for stage in "$@"; do
  case $stage in
    tests)
      run tests 300 python -m pytest -m gpu -q -p no:cacheprovider tests/test_compile_gpu.py \
        tests/kernels/test_select_gpu.py tests/test_deploy_gpu.py tests/kernels/test_training_gpu.py ;;
    probe)
      run probe 300 python scripts/experiments/probe_ws2d.py --shape 480p --timeout 45 ;;
    1.3b*)
      extra=""
      [ "$stage" = 1.3b ] && extra="--sample-steps 50 --breakdown"
      # shellcheck disable=SC2046,SC2086
      run "$stage" 420 python scripts/bench_deploy.py --model wan1_3b --latent 21 60 104 --no-export \
        --schedules configs/fps/default.yaml,configs/fps/sparse.yaml $(flags "$stage") $extra \
        --out "$OUT/bench_deploy_$stage.json" ;;
    14b-*)
      sched=${stage#14b-}; sched=${sched%%-*}
      extra=""
      [ "$stage" = "14b-$sched" ] && extra="--breakdown"
      # shellcheck disable=SC2046,SC2086
      run "$stage" 560 python scripts/bench_deploy.py --model wan14b --latent 21 90 160 --no-export --reps 1 \
        --warmup 0 --schedules "configs/fps/$sched.yaml" $(flags "$stage") $extra \
        --out "$OUT/bench_deploy_$stage.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
