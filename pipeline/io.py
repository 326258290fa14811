"""Transitional: the names of the former ``pipeline.io``, now in :mod:`pipeline.reading`,
:mod:`pipeline.sensor_models` and :mod:`pipeline.range_stats` (this module goes once every
import has moved)."""

from pipeline.range_stats import (  # noqa: F401
    SAMPLE_PIXELS,
    deep_pixels,
    dynamic_range,
    range_adjustment,
    sample_pixels,
)
from pipeline.reading import (  # noqa: F401
    BASE_OPTIONS,
    BLOCK_CACHE_BYTES,
    OPEN_DATASETS,
    REMOTE_OPTIONS,
    ImageError,
    ImageInfo,
    RasterSource,
    cap_block_cache,
    describe,
    gdal_env,
    gdal_error_line,
    gdal_path,
    image_segments,
    in_s3,
    lazy_pixels,
    open_image,
    rasterio_env,
    read_options,
    read_window,
    split_segment,
)
from pipeline.sensor_models import (  # noqa: F401
    WGS84,
    AffineSensorModel,
    GCPSensorModel,
    PixelSensorModel,
    RPCSensorModel,
    SensorModel,
    elevation_model,
    footprint,
    sensor_model,
    wrap_longitude,
)
