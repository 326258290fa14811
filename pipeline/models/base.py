"""The model adapter interface: one adapter per target (built-in, Python, endpoints)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.detections import Detections

#: ``imageProcessorParameters`` keys that configure the runner, not the model.
RUNNER_PARAMETERS = (
    "batchSize",
    # endpoint targets (pipeline.models.endpoint): concurrency, retries, timeouts, async S3
    "maxConcurrency", "perInstanceConcurrency", "maxRetries", "retryBaseDelay", "retryMaxDelay",
    "timeout", "scoreThresholds", "classNames", "signatureName", "s3InputLocation",
    "pollTimeout", "pollInterval", "cleanupPolicy", "resources",
)


class ModelError(RuntimeError):
    """A model target failed for a tile; ``str()`` is one line."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to build the model adapter; small and picklable."""

    type: str
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tile_format: str = "NITF"  # imageProcessorTileFormat (OSML default)
    tile_compression: str = "NONE"
    assumed_role: str | None = None
    #: settings resolved in the client (endpoint URLs, region, concurrency cap; never
    #: credentials: each worker signs with its own) so that workers need not see the client's
    #: environment; never logged
    options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """A stable cache key (adapters are built once per worker process and spec)."""
        return json.dumps(
            [self.type, self.name, self.parameters, self.tile_format, self.tile_compression,
             self.assumed_role, self.options],
            sort_keys=True,
            default=str,
        )

    @property
    def model_parameters(self) -> dict[str, Any]:
        """Parameters without the runner's own keys."""
        return {k: v for k, v in self.parameters.items() if k not in RUNNER_PARAMETERS}

    @property
    def batch_size(self) -> int | None:
        value = self.parameters.get("batchSize")
        return int(value) if value is not None else None


class ModelAdapter(ABC):
    """Turns a batch of tiles into detections in tile-local pixel coordinates."""

    #: tiles per :meth:`predict` call unless ``imageProcessorParameters.batchSize`` says otherwise
    batch_size: int = 16
    #: Dask resources the inference tasks need (for example ``{"GPU": 1}``)
    resources: dict[str, float] = {}
    #: True: the model reads each tile on its own, so its batches may be read-only views of
    #: the chunk, split at tile rows (no copy); False: contiguous, writable batches of
    #: ``batch_size`` tiles (vectorised models, and endpoints, whose batch is their concurrency)
    tile_views: bool = False

    @abstractmethod
    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        """Detect objects in ``tiles`` (``N × H × W × C`` uint8).

        ``offsets`` (``N × 2``) is each tile's ``(x, y)`` upper-left pixel in the full image.
        The result has one entry per tile: its detections in tile pixels, or the exception that
        made that tile fail (other tiles of the batch still count).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or devices."""
