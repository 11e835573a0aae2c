#!/usr/bin/env bash
# Create the virtual environment and install fpsa into it (editable, with the test extras), every dependency at
# the version pinned in constraints.txt (the lock; `make lock` regenerates it, see scripts/lock.sh).
#
# torch is chosen here rather than by pip's resolver, because a bare `torch` requirement on Linux pulls a
# CUDA build of several GB even on hosts that have no GPU:
#   - a torch already importable in the venv is kept;
#   - GPU host (nvidia-smi lists a device): a CUDA torch importable by $PYTHON is reused (its site-packages is
#     linked into the venv), otherwise the default PyPI build (CUDA) is installed;
#   - CPU host: the CPU wheel torch==2.13.0+cpu from pip's find-links (on the build machines it lies on disk),
#     else from the PyTorch CPU index.
# Usage: bash scripts/install.sh [VENV_DIR]   (default .venv; PYTHON selects the interpreter, default python3;
#        FPSA_EXTRAS selects the optional dependencies, default `dev`, empty for none)
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

"$python" - <<'PY' || { echo "fpsa needs Python >= 3.10 (found $("$python" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then has_gpu=1; fi

host_site=""
if [ "$has_gpu" = 1 ]; then
  # The site-packages holding the interpreter's CUDA torch (a system Python or another venv, as on GPU images).
  host_site=$("$python" -c "import os, torch; assert torch.version.cuda; print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null || true)
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  if [ -n "$host_site" ]; then
    # A .pth line appends the host's site-packages after the venv's own, so its CUDA torch (and whatever else
    # it has) is reused instead of downloaded; `venv --system-site-packages` would miss it when $python is a venv.
    purelib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$host_site" > "$purelib/_fpsa_host_site.pth"
    echo "[install] GPU host: the venv reuses the CUDA torch in $host_site"
  fi
fi
pip=("$venv/bin/python" -m pip)

# The lock. On GPU hosts torch's CUDA stack (triton, nvidia-*, cuda-*) is whatever the chosen torch brings, so
# those lines are left out there.
lock=constraints.txt
[ -f "$lock" ] || { echo "[install] $lock is missing: run from the project root (or make lock)" >&2; exit 1; }
if [ "$has_gpu" = 1 ]; then
  gpu_lock=$(mktemp)
  trap 'rm -f "$gpu_lock"' EXIT
  grep -v -E '^(triton|nvidia-|cuda-)' "$lock" > "$gpu_lock"
  lock=$gpu_lock
fi
install=("${pip[@]}" install -q --constraint "$lock")

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] keeping torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
elif [ "$has_gpu" = 1 ]; then
  echo "[install] GPU host: installing the CUDA build of torch"
  "${install[@]}" "torch>=2.4"
else
  echo "[install] CPU host: installing the CPU wheel of torch"
  "${install[@]}" "torch==2.13.0+cpu" 2>/dev/null \
    || "${install[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi

if [ "$has_gpu" = 0 ] && ! "$venv/bin/python" -c "import triton" 2>/dev/null && [ "$(uname -s)" = Linux ]; then
  # CPU host: the kernels' tests run in Triton's interpreter; use the Triton the GPU image runs (3.6.0).
  "${install[@]}" "triton==3.6.0"
fi

if [ "$(uname -s)" = Linux ] && ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  # DeepSpeed ships as an sdist whose build imports torch: build it against the torch chosen above (an isolated
  # build would fetch another torch), with no ops compiled ahead of time (they compile just in time when used).
  echo "[install] DeepSpeed (pure-python build against this torch)"
  "${install[@]}" setuptools  # >= 70.1 builds wheels itself (no `wheel` package)
  DS_BUILD_OPS=0 "${install[@]}" --no-build-isolation "deepspeed>=0.15"
fi

extras=${FPSA_EXTRAS-dev}  # the test extras by default; FPSA_EXTRAS= installs only what training needs
"${install[@]}" -e ".${extras:+[$extras]}"
"$venv/bin/python" -c "import torch, fpsa_train, fpsa_kernels; print('[install] ok: torch', torch.__version__, '| cuda', torch.version.cuda)"
