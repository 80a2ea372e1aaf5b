#!/usr/bin/env bash
# The GPU check of issue 17, as one prepared script for a lent GPU machine (about 5 minutes; never CI).
#
# Here, once:   make gpu-wheels          (MONAI, Opacus, nibabel, pydicom as wheels in .whl/, ignored by git)
#               make data                (data/br35h, optional: the Br35H rounds are skipped without it)
# There:        bash benchmarks/gpu_check.sh     (device tool: carry [".whl", "data/br35h"])
# Writes gpu.json and gpu.md into $OUT (the device tool's folder) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-benchmarks/results}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# the gpu-marked tests (skipped without a GPU): cuda against cpu, resume on the CPU of a run started on the GPU, bf16
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_devices.py -k gpu -rs 2>&1 | tee "$OUTDIR/gpu_tests.log"
timeout 300 $PY benchmarks/gpu_check.py --out "$OUTDIR" "$@"
