#!/usr/bin/env bash
# The GPU worker path on a machine with a GPU and PyTorch but without this package's
# dependencies installed: wheels for Python 3.12 are in .whl/ (see the closing notes for how
# they were fetched) and pure-Python packages in .whl/pure/. Writes logs to ${OUT:-/tmp}.
set -o pipefail
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && cp -r .whl/pure/. /tmp/site/ || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, rasterio, distributed, geopandas, pandas, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'rasterio', rasterio.__version__, 'distributed', distributed.__version__, 'pandas', pandas.__version__, 'numpy', numpy.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest.log" | tail -15
timeout 330 python3 benchmarks/bench_gpu.py "$@" 2>&1 | grep -v -e Warning -e "dataset = " | tee "$out/bench.log"
