"""Dask resources that a model's inference tasks need (for example ``{"GPU": 1}``).

A ``PYTHON`` model declares them as a ``resources`` attribute of its factory (class or
function), read in the client without loading the weights; ``imageProcessorParameters.resources``
overrides it. The graph annotates only the model tasks with them.
"""

from __future__ import annotations

from typing import Any

from pipeline.models.base import ModelError, ModelSpec


def model_resources(spec: ModelSpec) -> dict[str, float]:
    """The resources of ``spec``'s inference tasks (``{}``: any worker)."""
    value: Any = spec.options.get("resources")
    if value is None:
        value = spec.parameters.get("resources")
    if value is None and spec.type.upper() == "PYTHON":
        from pipeline.models.python import load_factory

        value = getattr(load_factory(spec.name), "resources", None)
    if not value:
        return {}
    try:
        return {str(k): float(v) for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise ModelError(f"model resources must map names to numbers, got {value!r}") from None


def missing_resources(needed: dict[str, float], workers: list[dict[str, float]]) -> str | None:
    """Why no worker can run a task needing ``needed`` (None when one can)."""
    if not needed:
        return None
    if any(all(w.get(k, 0) >= v for k, v in needed.items()) for w in workers):
        return None
    wanted = " ".join(f"{k}={v:g}" for k, v in needed.items())
    have = sorted({f"{k}={v:g}" for w in workers for k, v in w.items()}) or ["none"]
    return (f"the model needs Dask worker resources {wanted}, but no worker of the cluster has them "
            f"(resources seen: {', '.join(have)}); start workers with --resources {wanted}, or on one "
            f"machine run with --cluster gpu-local")
