"""Dask Model Runner: run ML models over very large overhead images.

Data flows one way: request → plan → read → infer → geolocate → merge → write. Each stage is
a module here and takes and returns plain values; ``graphs`` wires them into Dask graphs.
"""

from pipeline.api import detect, image_job, lazy_features, open_image, run
from pipeline.detections import Detections
from pipeline.request import ImageRequest, RequestError
from pipeline.segmentation.api import segment

__all__ = [
    "Detections", "ImageRequest", "RequestError", "detect", "image_job", "lazy_features", "open_image", "run",
    "segment",
]
__version__ = "0.1.0"
