#!/usr/bin/env bash
# Create the virtual environment and install fpsa into it (editable, with the test extras).
#
# torch is chosen here rather than by pip's resolver, because a bare `torch` requirement on Linux pulls a
# CUDA build of several GB even on hosts that have no GPU:
#   - a torch already importable in the venv is kept;
#   - GPU host (nvidia-smi lists a device): a CUDA torch in the system Python is kept (the venv then sees
#     system site-packages), otherwise the default PyPI build (CUDA) is installed;
#   - CPU host: the CPU wheel torch==2.13.0+cpu from pip's find-links (on the build machines it lies on disk),
#     else from the PyTorch CPU index.
# Usage: bash scripts/install.sh [VENV_DIR]   (default .venv; PYTHON selects the interpreter, default python3)
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

"$python" - <<'PY' || { echo "fpsa needs Python >= 3.10 (found $("$python" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then has_gpu=1; fi

if [ ! -x "$venv/bin/python" ]; then
  site_flag=""
  if [ "$has_gpu" = 1 ] && "$python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    site_flag="--system-site-packages"
    echo "[install] GPU host with a CUDA torch in $python: the venv reuses it"
  fi
  "$python" -m venv $site_flag "$venv"
fi
pip=("$venv/bin/python" -m pip)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] keeping torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
elif [ "$has_gpu" = 1 ]; then
  echo "[install] GPU host: installing the CUDA build of torch"
  "${pip[@]}" install -q "torch>=2.4"
else
  echo "[install] CPU host: installing the CPU wheel of torch"
  "${pip[@]}" install -q "torch==2.13.0+cpu" 2>/dev/null \
    || "${pip[@]}" install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi

"${pip[@]}" install -q -e ".[dev]"
"$venv/bin/python" -c "import torch, fpsa_train, fpsa_kernels; print('[install] ok: torch', torch.__version__, '| cuda', torch.version.cuda)"
