"""The Python API, for notebooks and scripts.

* :func:`open_image` — an image as a lazily chunked ``xarray.DataArray`` (header facts and the
  sensor model in ``.attrs``), for inspection.
* :class:`ImageRequest` — a job (``ImageRequest(...)``, ``.parse(dict)``, ``.from_file(path)``).
* :func:`run` — run a job on a Dask cluster; returns a :class:`graphs.JobResult` with
  ``.features`` (a GeoDataFrame), ``.summary``, ``.plot()``, ``.plot_summary()`` and ``.explore()``.
* :func:`detect` — run a model eagerly on a small window and get a GeoDataFrame back, or
  lazily on any chunked ``(band, y, x)`` DataArray (see :mod:`graphs.array_job`).
* :func:`image_job` and :func:`lazy_features` — the lazy Dask collections of a job, to
  ``persist``, ``visualize`` or combine with your own graphs.

Example::

    import pipeline
    image = pipeline.open_image("scene.tif", chunks=2048)
    found = pipeline.detect("scene.tif", model="bright-objects", window=(0, 0, 1024, 1024))
    result = pipeline.run(pipeline.ImageRequest.from_file("job.yaml"), client=client)
    result.features.head(); result.plot(); result.explore()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import reading
from pipeline.geolocate import to_features
from pipeline.infer import detect_chunk
from pipeline.merge import distill
from pipeline.models import ModelError, ModelSpec, check_model
from pipeline.reading import describe, read_window
from pipeline.request import DistillationAlgorithm, ImageRequest, RequestError
from pipeline.sensor_models import sensor_model
from pipeline.tiling import FIXED_STRIDE, TileGrid, chunk_size

ModelLike = ModelSpec | dict[str, Any] | str

#: ``detect`` merges duplicates as a job with the default ``postProcessing`` does
DEFAULT_DISTILLATION = DistillationAlgorithm()


def open_image(url: str, chunks: int | tuple[int, int] = 4096, **options: Any) -> Any:
    """The image at ``url`` (a path, ``s3://``, ``NITF_IM:<n>:<url>`` or ``synthetic://``) as a
    lazily chunked ``xarray.DataArray`` ``(band, y, x)`` with ``.attrs["info"]`` (the header) and
    ``.attrs["sensor_model"]``. ``chunks`` is the chunk side in pixels or ``(rows, cols)``;
    ``options`` go to :func:`pipeline.reading.open_image` (for example ``role=``, ``elevation=``)."""
    if url.startswith("synthetic://"):
        from pipeline import synthetic

        return synthetic.open_image(url, chunks)
    import rioxarray  # noqa: F401 - registers the ``.rio`` accessor that reading.open_image uses

    return reading.open_image(url, chunks, **options)


def as_request(request: ImageRequest | dict[str, Any] | str | Path) -> ImageRequest:
    """An :class:`ImageRequest` from a request, an OSML-style dict or a ``.json``/``.yaml`` path
    (raises :class:`RequestError` with one line)."""
    if isinstance(request, ImageRequest):
        return request
    if isinstance(request, (str, Path)):
        return ImageRequest.from_file(request)
    return ImageRequest.parse(request)


def run(
    request: ImageRequest | dict[str, Any] | str | Path,
    client: Any = None,
    *,
    output_dir: str | Path | None = None,
    progress: bool = False,
    workers: int | None = None,
    tiling: str | None = None,
) -> Any:
    """Run a job and write its outputs; returns a :class:`graphs.JobResult`.

    ``request`` is an :class:`ImageRequest`, a dict in OSML's camelCase wire format, or the path
    of a JSON/YAML request file. ``client`` is a ``distributed.Client``; without one a
    LocalCluster of ``workers`` processes is started for the job and closed after it (without
    ``workers``, a job of local images of at most 4096² pixels in all runs on a cluster in this
    process, as the CLI's does).
    ``output_dir`` adds a LOCAL output (GeoJSON, GeoParquet, summary JSON and chart PNG); a
    request without outputs still returns its features. ``progress`` shows a tqdm bar of tiles.
    ``tiling`` (``FIXED_STRIDE`` or ``VARIABLE_OVERLAP``) overrides the request's
    ``tilingStrategy`` (default ``FIXED_STRIDE``).
    """
    from graphs.cluster import connect
    from graphs.image_job import model_spec, run_job
    from pipeline.plots import write_summary_charts

    request = as_request(request)
    if output_dir is not None:
        request = request.with_output_dir(output_dir)
    if tiling is not None:
        request = ImageRequest.parse({**request.to_wire(), "tilingStrategy": tiling})
    if request.segmentation is not None:  # a segmentation job (pipeline.segmentation)
        from graphs.segment_job import run_segmentation as run_job  # type: ignore[assignment]
    else:
        try:
            check_model(model_spec(request))
        except ModelError as exc:
            raise RequestError(f"invalid request: imageProcessor: {exc}") from None
    bar = _progress_bar if progress else None
    if client is not None:
        result = run_job(request, client, progress=bar)
    else:  # a small job runs in this process, as the CLI's does (graphs.cluster.SMALL_JOB_PIXELS)
        from pipeline.cli import job_pixels

        pixels = job_pixels(request) if workers is None else None
        with connect("local", workers, job_pixels=pixels) as local:
            result = run_job(request, local, progress=bar)
    if request.segmentation is None:
        write_summary_charts(request, result)
    return result


def _progress_bar(total: int) -> Any:
    """A notebook widget where ipywidgets is installed, else a text bar."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, unit="tile", desc="tiles", smoothing=0.1)


def as_model_spec(model: ModelLike, parameters: dict[str, Any] | None = None) -> ModelSpec:
    """A :class:`ModelSpec` from a spec, a dict ``{"type", "name", "parameters"}`` (the type
    defaults to BUILTIN) or a string: a built-in name (``"bright-objects"``) or a Python
    ``"package.module:factory"``. ``parameters`` are the model's ``imageProcessorParameters``."""
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, str):
        spec = ModelSpec("PYTHON" if ":" in model else "BUILTIN", model)
    elif isinstance(model, dict):
        fields = {k: v for k, v in model.items() if k in ("type", "name", "parameters")}
        unknown = sorted(set(model) - set(fields))
        if unknown or "name" not in fields:
            raise ValueError(f"model dict needs 'name' (optional: 'type', 'parameters'), got {sorted(model)}")
        spec = ModelSpec(str(fields.get("type", "BUILTIN")).upper(), fields["name"],
                         dict(fields.get("parameters") or {}))
    else:
        raise TypeError(f"model must be a name, a dict or a ModelSpec, not {type(model).__name__}")
    if parameters:
        spec = ModelSpec(spec.type, spec.name, {**spec.parameters, **parameters}, spec.tile_format,
                         spec.tile_compression, spec.assumed_role)
    return spec


def read_clipped_window(url: str, window: tuple[int, int, int, int] | None
                        ) -> tuple[Any, tuple[int, int, int, int], Any]:
    """The image's info, ``window`` clipped to the image (default: all of it) and its pixels;
    a window that misses the image is a ``ValueError``."""
    info = describe(url)
    x0, y0, x1, y1 = window or (0, 0, info.width, info.height)
    x0, y0 = max(0, int(x0)), max(0, int(y0))
    x1, y1 = min(info.width, int(x1)), min(info.height, int(y1))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"window {window} is outside the {info.width}x{info.height} image {url}")
    pixels = read_window(url, (x0, y0, x1, y1))
    return info, (x0, y0, x1, y1), pixels


def detect(
    url: Any,
    model: ModelLike = "bright-objects",
    window: tuple[int, int, int, int] | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    tile_size: int = 1024,
    overlap: int = 50,
    tiling: str = FIXED_STRIDE,
    range_adjustment: str = "NONE",
    distillation: DistillationAlgorithm | None = DEFAULT_DISTILLATION,
    elevation: dict[str, Any] | None = None,
    compute: bool = False,
    image_url: str | None = None,
) -> Any:
    """Run ``model`` eagerly, in this process, on ``window`` ``(x0, y0, x1, y1)`` (full-image
    pixels; default: the whole image, for small images) of ``url``; return the geolocated
    features (columns as in a job's output).

    ``url`` may instead be a lazily chunked ``(band, y, x)`` ``xarray.DataArray`` (clipped,
    reprojected, a band ratio, a STAC mosaic, ...): the result is then a ``dask.delayed``
    GeoDataFrame (``compute=True``: the GeoDataFrame) built by :func:`graphs.array_job.array_job`,
    with the same tiles, ownership rule and merge as a URL job; its features are in lon/lat
    where the array has rioxarray's CRS and transform (or is an unsliced :func:`open_image` array,
    whose sensor model may be an RPC), else in pixels. ``image_url`` names the
    source in the features (default: the array's name); ``window`` and ``elevation`` are for
    URLs only.

    Tiling, the ownership rule and the merge are a job's, with the window's edges as image
    edges (objects cut by them come back cut). ``model`` is a built-in name, a
    ``"package.module:factory"``, a dict ``{"type", "name", "parameters"}`` or a ModelSpec.
    ``elevation`` (``{"constant": metres}`` or ``{"dem": url}``) sets an RPC image's ground height.
    ``tiling`` is ``FIXED_STRIDE`` or ``VARIABLE_OVERLAP`` (OSML 2.x's grid over the window).
    """
    spec = as_model_spec(model, parameters)
    check_model(spec)
    if not isinstance(url, (str, Path)):
        from graphs.array_job import array_job

        if window is not None or elevation is not None:
            raise ValueError("detect on a DataArray takes no window or elevation: slice or clip the array")
        lazy = array_job(url, spec, tile_size=tile_size, overlap=overlap, tiling=tiling,
                         range_adjustment=range_adjustment, algorithm=distillation, image_url=image_url)
        return lazy.compute() if compute else lazy
    url = str(url)
    info, (x0, y0, x1, y1), pixels = read_clipped_window(url, window)
    width, height = x1 - x0, y1 - y0
    grid = TileGrid(width, height, tile_size, overlap,
                    chunk_size(tile_size, overlap, max(width, height) + tile_size), tiling.upper())
    result = detect_chunk(pixels, (0, 0), (0, 0), grid, spec, range_adjustment.upper(), info.bits)
    if result.failed_tiles:
        first = result.failed_tiles[0]
        raise ModelError(f"{len(result.failed_tiles)} of {result.tiles} tiles failed, first at "
                         f"{first['window']}: {first['reason']}")
    found = distill(result.detections, distillation).shifted(x0, y0)
    ground = sensor_model(info, elevation) if elevation else sensor_model(info)
    return to_features(found, ground, image_url=url, job_id="detect")


def image_job(request: ImageRequest | dict[str, Any] | str | Path) -> dict[str, Any]:
    """The lazy Dask collections of a job: ``{image url: (chunks_y, chunks_x) object array of
    ChunkResult}``. Nothing is read until you compute or persist them."""
    from graphs.image_job import image_job as build

    return build(as_request(request))


def lazy_features(request: ImageRequest | dict[str, Any] | str | Path) -> Any:
    """A ``dask.delayed`` GeoDataFrame of the job's merged, geolocated features (all images),
    reduced as :func:`run` reduces them (same columns, ``sourceMetadata`` included; each image
    planned once; chunks outside the regionOfInterest never read); ``.compute()`` it on your
    client. Its ``.attrs["failedTiles"]`` lists the tiles that failed (``url``, ``window``,
    ``reason``). Writes nothing."""
    from graphs.image_job import lazy_features as build

    return build(as_request(request))


__all__ = ["ImageRequest", "as_model_spec", "as_request", "detect", "image_job", "lazy_features",
           "open_image", "run"]
