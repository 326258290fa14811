"""Dask Model Runner: run ML models over very large overhead images.

Data flows one way: request → plan → read → infer → geolocate → merge → write. Each stage is
a module here and takes and returns plain values; ``graphs`` wires them into Dask graphs.
"""

from pipeline.api import detect, run
from pipeline.detections import Detections
from pipeline.io import open_image
from pipeline.request import ImageRequest, RequestError

__all__ = ["Detections", "ImageRequest", "RequestError", "detect", "open_image", "run"]
__version__ = "0.1.0"
