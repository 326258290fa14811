# The Dask worker (and scheduler) image for clusters on ECS/Fargate/EC2 (configs/clusters/).
# It pins the same lock file as `make install`, so client and workers run the same versions
# (Dask refuses mismatched ones). Not built in CI:
#   docker build -t dask-model-runner:0.1.0 .
#   docker run --rm dask-model-runner:0.1.0 dask worker tcp://SCHEDULER:8786 --nthreads 1
# GPU models: build FROM an image with CUDA and add your framework to the install line.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/model-runner
# the lock first, so that code changes reuse the dependency layer
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY graphs/ graphs/
COPY configs/ configs/
# extras: cloud (dask-cloudprovider); add onnx for the ONNX example (`--build-arg EXTRAS=cloud,onnx`)
ARG EXTRAS=cloud
RUN pip install --constraint constraints.txt ".[${EXTRAS}]" \
 && useradd --create-home --uid 1000 dask
USER dask

# dask-cloudprovider starts `dask scheduler` / `dask worker` with its own arguments
ENTRYPOINT ["tini", "-g", "--"]
CMD ["dask", "worker", "--help"]
