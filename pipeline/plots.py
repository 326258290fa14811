"""Pictures of a job: quick looks with features, the summary chart and interactive maps.

* :func:`summary_chart` — time per stage, tiles/s over time and features per class, from a
  job summary (and its features); :func:`write_summary_charts` puts it beside each local
  summary as ``<jobId>.summary.png`` (the CLI and ``pipeline.run`` do, after the job).
* :func:`plot_result` — ``JobResult.plot()``: an image overview with its features drawn.
* :func:`explore` — ``JobResult.explore()``: a folium map through ``GeoDataFrame.explore``.

File-writing paths use matplotlib's object API (no pyplot state), so they are safe in threads
and on headless machines.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from pipeline.quicklook import draw, feature_boxes
from pipeline.redact import public_url

log = logging.getLogger(__name__)

#: axes title height: a fixed one spares matplotlib fitting each title above the tick labels
TITLE_Y = 1.01
#: stages in the order they run; anything else in the summary follows
STAGE_ORDER = ("plan", "read", "encode", "model", "merge", "geolocate", "write")


def stage_seconds(summary: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage, summed over the images, plus the workers' ``read`` and ``encode``
    and the job's ``write`` and ``total``.

    ``read``, ``encode`` and ``model`` are worker time summed over all chunks, so with several
    workers they can exceed ``total`` (wall-clock time).
    """
    seconds: dict[str, float] = {}
    for image in summary.get("images", []):
        for name, value in (image.get("seconds") or {}).items():
            seconds[name] = seconds.get(name, 0.0) + float(value)
    job = summary.get("seconds") or {}
    for name in ("read", "encode"):
        if name in (job.get("workers") or {}):
            seconds[name] = float(job["workers"][name])
    if "write" in job:
        seconds["write"] = seconds.get("write", 0.0) + float(job["write"])
    ordered = {k: seconds[k] for k in STAGE_ORDER if k in seconds}
    ordered.update({k: v for k, v in seconds.items() if k not in ordered})
    if "total" in job:
        ordered["total"] = float(job["total"])
    return ordered


def tile_rate(summary: dict[str, Any], bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """``(bin edges in seconds, tiles per second in each bin)`` from the summary's ``timeline``
    (cumulative tiles done at each chunk's completion); empty if there is none."""
    timeline = summary.get("timeline") or {}
    seconds = np.asarray(timeline.get("seconds", []), dtype=np.float64)
    tiles = np.asarray(timeline.get("tiles", []), dtype=np.float64)
    if len(seconds) < 2 or seconds[-1] <= seconds[0]:
        return np.empty(0), np.empty(0)
    edges = np.linspace(seconds[0], seconds[-1], max(2, min(bins, len(seconds))) + 1)
    done = np.interp(edges, seconds, tiles)
    return edges, np.diff(done) / np.diff(edges)


def class_counts(features: Any) -> pd.Series:
    """Features per class (the first ``featureClasses`` entry), most frequent first."""
    _, classes = feature_boxes(features)
    return pd.Series(classes, dtype=object).value_counts()


def summary_chart(summary: dict[str, Any], features: Any = None, fig: Any = None) -> Any:
    """A matplotlib ``Figure`` with three panels: time per stage, tiles/s over time and
    features per class (the summary's ``classes``, else counted in ``features``)."""
    if fig is None:
        from matplotlib.figure import Figure

        # a fixed layout: constrained layout measured every label and took half of the chart's
        # 0.25 s, which a job pays at its end
        fig = Figure(figsize=(13, 3.8), dpi=100)
        fig.subplots_adjust(left=0.075, right=0.985, bottom=0.14, top=0.83, wspace=0.32)
    stages_ax, rate_ax, class_ax = fig.subplots(1, 3, width_ratios=(1, 1.3, 1))
    from matplotlib.ticker import MaxNLocator

    for axis in (stages_ax.xaxis, rate_ax.xaxis, rate_ax.yaxis, class_ax.xaxis):
        axis.set_major_locator(MaxNLocator(4))  # every tick is a label to lay out and draw

    stages = stage_seconds(summary)
    names = list(stages)[::-1]
    colours = ["0.35" if n == "total" else "tab:blue" for n in names]
    stages_ax.barh(names, [stages[n] for n in names], color=colours)
    for y, name in enumerate(names):
        stages_ax.annotate(f"{stages[name]:.2f}", (stages[name], y), xytext=(3, 0),
                           textcoords="offset points", va="center", fontsize="small")
    stages_ax.set_xlabel("seconds (read, encode, model: summed over workers)")
    stages_ax.set_title("time per stage", y=TITLE_Y)
    stages_ax.margins(x=0.2)

    edges, rate = tile_rate(summary)
    if len(rate):
        rate_ax.stairs(rate, edges, fill=True, alpha=0.6)
        tiles = sum(int(i.get("tiles") or 0) for i in summary.get("images", []))
        rate_ax.set_title(f"tiles/s over time ({tiles} tiles)", y=TITLE_Y)
    else:
        rate_ax.text(0.5, 0.5, "no timeline in this summary", ha="center", va="center",
                     transform=rate_ax.transAxes)
        rate_ax.set_title("tiles/s over time", y=TITLE_Y)
    rate_ax.set_xlabel("seconds since the job started")
    rate_ax.set_ylabel("tiles/s")

    if summary.get("classes") is not None:  # counted as the job wrote them
        counts = pd.Series(summary["classes"], dtype=np.int64).sort_values(ascending=False, kind="stable")
    else:
        counts = class_counts(features) if features is not None else pd.Series(dtype=int)
    if len(counts):
        shown = counts.iloc[:12][::-1]
        class_ax.barh([str(c) for c in shown.index], shown.to_numpy(), color="tab:orange")
        class_ax.set_xlabel("features")
    else:
        known = summary.get("classes") is not None or features is not None
        class_ax.text(0.5, 0.5, "no detections" if known else "no features given",
                      ha="center", va="center", transform=class_ax.transAxes)
    class_ax.set_title(f"features per class ({int(counts.sum())})", y=TITLE_Y)

    fig.suptitle(f"job {summary.get('jobId', '?')}: {summary.get('status', '?')}, "
                 f"{summary.get('features', 0)} features, "
                 f"{float((summary.get('seconds') or {}).get('total', 0.0)):.1f} s")
    return fig


def write_summary_chart(summary: dict[str, Any], path: str | Path, features: Any = None) -> Path:
    """Write :func:`summary_chart` as a PNG; it appears at ``path`` only when complete."""
    from pipeline.sinks import staged_file

    path = Path(path)
    fig = summary_chart(summary, features)
    with staged_file(path.parent, ".png") as staged:
        fig.savefig(staged, format="png")
        os.replace(staged, path)
    return path


def write_summary_charts(request: Any, result: Any) -> list[str]:
    """Draw a job's summary chart as ``<jobId>.summary.png`` beside the summary of each LOCAL
    output of ``request`` and add the paths to ``result.outputs`` (a
    :class:`graphs.JobResult`). The CLI and :func:`pipeline.run` call it after the job: the
    chart is a report of the job, not part of it. A chart that fails is logged, never fatal.
    Returns the paths written."""
    written = []
    for output in request.all_outputs:
        if output.type != "LOCAL":
            continue
        path = Path(output.path) / f"{request.job_id}.summary.png"
        try:
            written.append(str(write_summary_chart(result.summary, path, result.features)))
        except Exception as exc:  # noqa: BLE001 - a chart must never fail a job
            log.warning("summary chart for %s not written: %s", request.job_id, str(exc).splitlines()[0])
    result.outputs.extend(written)
    return written


def _pyplot() -> Any:
    """pyplot, imported only for interactive figures (it hooks into Jupyter's display)."""
    import matplotlib.pyplot as plt

    return plt


def show_summary(summary: dict[str, Any], features: Any = None) -> Any:
    """:func:`summary_chart` for notebooks: a ``Figure`` that Jupyter displays once (made
    through pyplot so that the notebook's display hook is on, then released by pyplot)."""
    plt = _pyplot()
    fig = plt.figure(figsize=(13, 3.8), dpi=100, layout="constrained")
    plt.close(fig)
    return summary_chart(summary, features, fig=fig)


def plot_result(result: Any, image: str | None = None, ax: Any = None, max_side: int = 1024,
                truth: Any = None) -> Any:
    """Draw the overview of ``image`` (default: the first readable image of the job) with the
    job's features on it, one colour per class; returns the matplotlib ``Axes``."""
    images = [i["url"] for i in result.summary.get("images", []) if i.get("width")]
    if image is None:
        if not images:
            raise ValueError("the job has no readable image to plot")
        image = images[0]
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(7, 7), layout="constrained")
    boxes, classes = feature_boxes(result.features, image)
    draw(ax, image, boxes, classes, truth=truth, max_side=max_side)
    ax.set_title(f"{Path(public_url(image)).name}: {len(boxes)} features")
    ax.set_xlabel("column (pixels)")
    ax.set_ylabel("row (pixels)")
    return ax


def explore(features: Any, **kwargs: Any) -> Any:
    """A folium map of ``features`` (class and score in the tooltip, one colour per class).

    Keyword arguments go to ``GeoDataFrame.explore``. Needs the optional ``folium`` and
    ``mapclassify`` packages; raises a one-line ``ImportError`` without them.
    """
    missing = []
    for name in ("folium", "mapclassify"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"explore() needs {' and '.join(missing)}: pip install folium mapclassify")
    if features.crs is None:
        raise ValueError("the features are in pixel coordinates (the image is not georeferenced): "
                         "use plot() instead")
    _, classes = feature_boxes(features)
    scores = [c[0]["score"] if c else np.nan for c in features["featureClasses"]] if len(features) else []
    light = gpd.GeoDataFrame(
        {"id": features["id"].to_numpy(), "image_url": features["image_url"].to_numpy(),
         "class": classes, "score": np.asarray(scores, dtype=np.float64)},
        geometry=features.geometry.to_numpy(), crs=features.crs,
    )
    options: dict[str, Any] = {"column": "class", "tooltip": ["class", "score", "id"],
                               "style_kwds": {"fill": False, "weight": 2}}
    options.update(kwargs)
    return light.explore(**options)
