"""Dask Model Runner: run ML models over very large overhead images.

Data flows one way: request → plan → read → infer → geolocate → merge → write. Each stage is
a module here and takes and returns plain values; ``graphs`` wires them into Dask graphs.

The names below are imported on first use (PEP 562), so that importing a stage, or the
command line's ``--help``, does not import Dask, GDAL and geopandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api import detect, image_job, lazy_features, open_image, run
    from pipeline.detections import Detections
    from pipeline.request import ImageRequest, RequestError
    from pipeline.segmentation.api import segment

#: public name → the module that defines it
_LAZY = {
    "detect": "pipeline.api", "image_job": "pipeline.api", "lazy_features": "pipeline.api",
    "open_image": "pipeline.api", "run": "pipeline.api", "Detections": "pipeline.detections",
    "ImageRequest": "pipeline.request", "RequestError": "pipeline.request",
    "segment": "pipeline.segmentation.api",
}

__all__ = [
    "Detections", "ImageRequest", "RequestError", "detect", "image_job", "lazy_features", "open_image", "run",
    "segment",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
