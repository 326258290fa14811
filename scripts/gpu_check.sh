#!/usr/bin/env bash
# The GPU worker path on a machine with a GPU and PyTorch (Python 3.12, numpy, pandas,
# pyarrow, scipy, xarray already there) but without the rest of this package's dependencies:
# runs tests/test_gpu.py (on CUDA) and benchmarks/bench_gpu.py with the given arguments, and
# writes their logs to ${OUT:-/tmp}. Fetch the missing wheels into .whl/ first (git ignores
# it), at the versions of constraints.txt:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl rasterio==1.4.4 pyproj==3.7.2 shapely==2.2.0 \
#     geopandas==1.2.0 pydantic==2.14.4 pydantic_core==2.50.5 dask==2026.8.0 distributed==2026.8.0 \
#     tornado==6.6.1 zict==3.0.0 tblib==3.2.2 locket==1.0.0 partd==1.4.2 affine==3.0.1 cligj==0.7.2 \
#     click-plugins==1.1.1.2 rioxarray==0.19.0 mercantile==1.2.1 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 boto3==1.43.117 s3transfer==0.19.3 jmespath==1.1.0 lazy-importer==0.1.0
# and unzip botocore's wheel into .whl/pure/ without the service models that no job here
# uses (botocore/data/*/ except s3, sts, sagemaker*, sns, sqs, kinesis), which keeps what
# travels under 64 MiB.
set -o pipefail
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && cp -r .whl/pure/. /tmp/site/ || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, rasterio, distributed, geopandas, pandas, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'rasterio', rasterio.__version__, 'distributed', distributed.__version__, 'pandas', pandas.__version__, 'numpy', numpy.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest.log" | tail -15
timeout 330 python3 benchmarks/bench_gpu.py "$@" 2>&1 | grep -v -e Warning -e "dataset = " | tee "$out/bench.log"
