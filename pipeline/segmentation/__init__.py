"""Segmentation: models that answer per pixel, stitched across tiles and chunks.

- :mod:`~pipeline.segmentation.contract`: what a segmentation model answers per tile (class ids
  ``H × W`` or class scores ``K × H × W``, plus class names) and the encoded array bodies of
  endpoint answers;
- :mod:`~pipeline.segmentation.models`: the targets (``BUILTIN`` rule-based segmenters,
  ``PYTHON``, ``HTTP_ENDPOINT``, ``SM_ENDPOINT``);
- :mod:`~pipeline.segmentation.stitch`: one chunk's tiles → blended (or core-cropped) scores and
  class ids over the chunk's own pixels;
- :mod:`~pipeline.segmentation.raster`: per-chunk GeoTIFF parts → one COG per image;
- :mod:`~pipeline.segmentation.polygons`: class regions → polygons, dissolved across chunk seams;
- :mod:`~pipeline.segmentation.api`: :func:`segment`, a DataArray of classes for a window.
"""

from pipeline.segmentation.contract import SegmentationOptions, Segmenter

__all__ = ["SegmentationOptions", "Segmenter"]
