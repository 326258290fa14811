"""``PYTHON`` target: an in-process model loaded from ``"package.module:factory"``.

The factory is called once per worker process with ``imageProcessorParameters`` (minus the
runner's own keys) as keyword arguments, and returns a callable
``model(tiles, offsets) -> list[Detections | dict]`` over an ``N × H × W × C`` uint8 batch.
Each dict has ``boxes`` (``k × 4``, tile pixels), ``scores`` and ``classes``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.detections import Detections
from pipeline.models.base import ModelAdapter, ModelError, ModelSpec


def load_factory(reference: str) -> Callable[..., Any]:
    """Import ``"package.module:attribute"``; a one-line :class:`ModelError` if it fails."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"PYTHON model name must be 'package.module:factory', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import PYTHON model module {module_name!r}: {exc}") from None
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise ModelError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(factory):
        raise ModelError(f"{reference!r} is not callable")
    return factory


class PythonModel(ModelAdapter):
    """Wraps the user's callable; a batch that raises fails all of its tiles."""

    def __init__(self, spec: ModelSpec):
        factory = load_factory(spec.name)
        self._model = factory(**spec.model_parameters)
        if not callable(self._model):
            raise ModelError(f"{spec.name!r} returned {type(self._model).__name__}, not a callable")
        self.batch_size = int(getattr(self._model, "batch_size", self.batch_size))
        self.resources = dict(getattr(self._model, "resources", {}) or {})

    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        results = self._model(tiles, offsets)
        if len(results) != len(tiles):
            raise ModelError(f"model returned {len(results)} results for {len(tiles)} tiles")
        return [Detections.coerce(r) for r in results]


def validate(spec: ModelSpec) -> None:
    load_factory(spec.name)


def create(spec: ModelSpec) -> ModelAdapter:
    return PythonModel(spec)
