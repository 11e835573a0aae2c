#!/usr/bin/env bash
# Pack the device wheels (.whl/*.whl from ../shared/tools/device-wheels.sh) as .whl/site.tar.xz: the wheels unpacked
# into one site folder and xz-compressed, ~30% smaller than the wheels, for device calls whose working tree leaves
# too little of the 64 MiB a call carries. scripts/device_env.sh unpacks it when it is present (carry [".whl/site.tar.xz"]).
# torchao (the `fp8` extra: FP8 linears, fpsa_train/fp8_linears.py) is added here at the lock's version when .whl/ lacks
# it; its float8 path is pure Python over torch._scaled_mm, so its C++ extensions (_C_cutlass_90a, _C_mxfp8: sparse
# and MX kernels built for one torch ABI) are left out of the pack (0.6 MB of xz; nothing for the device's torch to
# refuse at import).
set -euo pipefail
torchao=$(grep -m1 '^torchao==' constraints.txt)
ls .whl/torchao-"${torchao#torchao==}"-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl "$torchao"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# Unpack keeping each member's mode bits: `python -m zipfile -e` drops them, and wandb's service binary
# (wandb/bin/wandb-core) then fails on the device with PermissionError when the logger starts.
python3 - "$tmp/site" .whl/*.whl <<'PY'
import os, sys, zipfile
site = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
PY
rm -f "$tmp"/site/torchao/_C*.so
tar cJf .whl/site.tar.xz.part -C "$tmp/site" . && mv .whl/site.tar.xz.part .whl/site.tar.xz
ls -la .whl/site.tar.xz
