"""A GPU example of the ``PYTHON`` target: ``bright-objects`` in PyTorch, batched on the GPU.

``pipeline.models.torch_bright:BrightObjects`` finds the same boxes as the CPU built-in
``bright-objects`` (8-connected components of pixels whose value is at least ``threshold``,
the value being band 1 of a 1- or 2-band tile and the mean of bands 1-3 otherwise; components
of at least ``min_area`` pixels), but labels a whole batch of tiles at once on the GPU:
each bright pixel starts with its own index as label, and labels shrink to the smallest in
their 3 × 3 neighbourhood (a max-pool of the negated labels) and jump along the labels they
point to, until nothing changes; a component's box, area and value sum are then scatter
reductions over its label. Only the boxes travel back to the host.

The factory declares ``resources = {"GPU": 1}``, so a job's model tasks run only on Dask
workers that advertise a GPU (``dask worker --resources GPU=1``, or a cluster profile's
``gpu`` section). It needs PyTorch on those workers (not a dependency of this package);
``device="cpu"`` runs it without a GPU (and without the resource, with
``imageProcessorParameters.resources: {}``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.detections import Detections
from pipeline.models.base import ModelError

CLASS_NAME = "bright-object"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ModelError("pipeline.models.torch_bright needs PyTorch on the workers "
                         "(pip install torch)") from None
    return torch


class BrightObjects:
    """``model(tiles, offsets) -> list[Detections]`` over ``N × H × W × C`` uint8 tiles."""

    resources = {"GPU": 1}

    def __init__(self, threshold: float = 200, min_area: int = 4, device: str | None = None,
                 batch_size: int = 16) -> None:
        torch = _torch()
        self.threshold, self.min_area = float(threshold), int(min_area)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(batch_size)

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections]:
        torch = _torch()
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
            if pixels.ndim == 3:
                pixels = pixels[..., None]
            value = self._value(pixels)
            labels = component_labels(value >= self.threshold)
            return self._boxes(labels, value, len(tiles))

    def _value(self, pixels: Any) -> Any:
        """Each pixel's value as float64: band 1, or the mean of bands 1-3 (as numpy takes it)."""
        torch = _torch()
        if pixels.shape[-1] < 3:
            return pixels[..., 0].to(torch.float64)
        return pixels[..., :3].to(torch.float64).sum(dim=-1) / 3.0

    def _boxes(self, labels: Any, value: Any, count: int) -> list[Detections]:
        torch = _torch()
        n, height, width = labels.shape
        bright = labels > 0
        tile, row, col = torch.nonzero(bright, as_tuple=True)
        if not len(tile):
            return [Detections() for _ in range(count)]
        key = tile * (height * width + 1) + labels[bright]  # a component per (tile, label)
        keys, inverse = torch.unique(key, sorted=True, return_inverse=True)
        k = len(keys)

        def reduce(values: Any, how: str) -> Any:
            start = values.new_full((k,), 0)
            return start.scatter_reduce(0, inverse, values, reduce=how, include_self=False)

        x0, x1 = reduce(col, "amin"), reduce(col, "amax") + 1
        y0, y1 = reduce(row, "amin"), reduce(row, "amax") + 1
        area = torch.bincount(inverse, minlength=k)
        total = value.new_zeros(k).index_add_(0, inverse, value[bright])
        keep = area >= self.min_area
        boxes = torch.stack([x0, y0, x1, y1], dim=1)[keep].to(torch.float64)
        scores = (total[keep] / area[keep]) / 255.0
        owner = (keys[keep] // (height * width + 1)).cpu().numpy()
        boxes_host, scores_host = boxes.cpu().numpy(), scores.cpu().numpy()
        cuts = np.searchsorted(owner, np.arange(1, count))  # keys are sorted, so tile by tile
        return [
            Detections(b, s, np.full(len(b), CLASS_NAME, dtype=object))
            for b, s in zip(np.split(boxes_host, cuts), np.split(scores_host, cuts), strict=True)
        ]


def component_labels(mask: Any) -> Any:
    """8-connected component labels of an ``N × H × W`` boolean tensor: 0 off the mask, else
    one plus the flat index (in its tile) of the component's first pixel in row-major order."""
    torch = _torch()
    n, height, width = mask.shape
    if height * width >= 2**24:  # labels travel as float32 through max_pool2d: exact below 2**24
        raise ModelError(f"tiles of {height} x {width} are too large for torch_bright")
    none = float(height * width + 1)
    index = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32)
    labels = torch.where(mask, index.view(1, height, width), torch.tensor(none, device=mask.device))
    labels = labels.unsqueeze(1)  # N × 1 × H × W for max_pool2d
    on = mask.unsqueeze(1)
    flat_on = mask.view(n, -1)
    while True:
        smallest = -torch.nn.functional.max_pool2d(-labels, 3, stride=1, padding=1)
        smallest = torch.where(on, smallest, labels)
        # jump: take the label of the pixel that the label names (a pixel of the same component)
        flat = smallest.view(n, -1)
        target = torch.where(flat_on, flat.long() - 1, torch.zeros_like(flat, dtype=torch.long))
        jumped = torch.where(flat_on, torch.minimum(flat, flat.gather(1, target)), flat).view_as(labels)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    out = labels.squeeze(1).to(torch.int64)
    return torch.where(mask, out, torch.zeros_like(out))
