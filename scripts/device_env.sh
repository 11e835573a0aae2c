# Source on the lent GPU machine (device tool): installs the carried wheels (.whl, from
# ../shared/tools/device-wheels.sh) into /tmp/site, maps kernels/ to fpsa_kernels, and exports PYTHONPATH.
#   source scripts/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
ln -sfn "$PWD/kernels" /tmp/site/fpsa_kernels
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
