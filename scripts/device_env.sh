# Source on the lent GPU machine (device tool): installs the carried wheels into /tmp/site, maps kernels/ to
# fpsa_kernels, and exports PYTHONPATH.
#   source scripts/device_env.sh
# The wheels come from ../shared/tools/device-wheels.sh (.whl/*.whl, ~53 MB). When the working tree plus the wheels
# exceed what a device call carries (64 MiB), carry instead .whl/site.tar.xz, the same wheels unpacked and
# xz-compressed (~37 MB), made here by `bash scripts/pack_device_site.sh`: it is used when present.
if [ -f .whl/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site || return 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
fi
ln -sfn "$PWD/kernels" /tmp/site/fpsa_kernels
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
