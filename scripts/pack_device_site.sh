#!/usr/bin/env bash
# Pack the device wheels (.whl/*.whl from ../shared/tools/device-wheels.sh) as .whl/site.tar.xz: the wheels unpacked
# into one site folder and xz-compressed, ~30% smaller than the wheels, for device calls whose working tree leaves
# too little of the 64 MiB a call carries. scripts/device_env.sh unpacks it when it is present (carry [".whl/site.tar.xz"]).
set -euo pipefail
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" "$tmp/site"; done
tar cJf .whl/site.tar.xz.part -C "$tmp/site" . && mv .whl/site.tar.xz.part .whl/site.tar.xz
ls -la .whl/site.tar.xz
