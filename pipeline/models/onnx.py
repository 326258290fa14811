"""An ONNX example of the ``PYTHON`` target with real weights: a DBNet text detector.

The weights are PP-OCRv4's text-detection network as shipped inside the ``rapidocr-onnxruntime``
wheel (found through :mod:`importlib.resources`; nothing is downloaded at run time). ONNX Runtime
runs it on CUDA when the installed build offers the CUDA provider, else on the CPU. Use it as::

    imageProcessor: {type: PYTHON, name: "pipeline.models.onnx:TextDetector"}
    imageProcessorParameters: {batchSize: 8, threshold: 0.3, boxThreshold: 0.5}

It needs the ``onnx`` extra: ``pip install 'dask-model-runner[onnx]'``.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import numpy as np
from scipy import ndimage

try:
    import onnxruntime as ort
except ImportError:  # one line, raised when the model is named in a request (client side)
    raise ImportError(
        "onnxruntime is not installed; install the onnx extra: pip install 'dask-model-runner[onnx]'"
    ) from None

#: the package and file of the bundled DBNet text-detection weights
WEIGHTS_PACKAGE = "rapidocr_onnxruntime"
WEIGHTS_FILE = "models/ch_PP-OCRv4_det_infer.onnx"
#: the network's input sides must be multiples of this
STRIDE = 32


def load_weights(package: str = WEIGHTS_PACKAGE, resource: str = WEIGHTS_FILE) -> bytes:
    """The ``.onnx`` bytes shipped in ``package``; a one-line error naming the extra if absent."""
    try:
        return (importlib.resources.files(package) / resource).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            f"cannot find the text-detection weights {package}/{resource} ({exc}); "
            "install the onnx extra: pip install 'dask-model-runner[onnx]'"
        ) from None


def providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (``auto``, ``cpu`` or ``cuda``)."""
    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"TextDetector device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "TextDetector device 'cuda' needs onnxruntime-gpu (CUDAExecutionProvider); "
            f"this onnxruntime offers {', '.join(available)}"
        )
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TextDetector:
    """DBNet text detection over a batch of tiles: axis-aligned boxes of class ``text``.

    * ``threshold``: probability above which a pixel is text (DBNet's ``thresh``).
    * ``boxThreshold``: a region's mean probability must reach this to be kept.
    * ``unclipRatio``: DBNet predicts shrunk text kernels; a ``w × h`` region is grown on
      every side by ``w·h·ratio / (2(w + h))`` (area × ratio / perimeter), as in PP-OCR.
    * ``minSize``: regions whose shorter side (before growing) is below this are dropped.
    * ``scale``: resize tiles by this factor before the network (small text reads better
      upscaled); boxes are returned in the tile's own pixels.
    * ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; ``threads``: ONNX
      Runtime intra-op threads (0: its default, every core).
    """

    #: tiles per network call unless ``imageProcessorParameters.batchSize`` says otherwise
    batch_size = 8
    #: Dask resources of the model tasks; pass ``resources: {GPU: 1}`` for a CUDA worker pool
    resources: dict[str, float] = {}

    def __init__(
        self,
        threshold: float = 0.3,
        boxThreshold: float = 0.5,  # noqa: N803 - imageProcessorParameters are camelCase
        unclipRatio: float = 1.6,  # noqa: N803
        minSize: float = 3.0,  # noqa: N803
        scale: float = 1.0,
        device: str = "auto",
        threads: int = 0,
        className: str = "text",  # noqa: N803
    ) -> None:
        if not 0.0 < threshold < 1.0 or not 0.0 <= boxThreshold <= 1.0:
            raise ValueError("TextDetector threshold must be in (0, 1) and boxThreshold in [0, 1]")
        if scale <= 0:
            raise ValueError(f"TextDetector scale must be positive, got {scale}")
        self.threshold = float(threshold)
        self.box_threshold = float(boxThreshold)
        self.unclip_ratio = float(unclipRatio)
        self.min_size = float(minSize)
        self.scale = float(scale)
        self.class_name = className
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            load_weights(), sess_options=options, providers=providers(device)
        )
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses."""
        return list(self.session.get_providers())

    def preprocess(self, tiles: np.ndarray) -> np.ndarray:
        """``N × H × W × C`` uint8 → ``N × 3 × H' × W'`` float32 in [-1, 1], sides padded (with
        mid-grey) up to multiples of 32; grey tiles are repeated to 3 bands, extra bands dropped."""
        n, h, w, c = tiles.shape
        rgb = tiles[..., :3] if c >= 3 else np.repeat(tiles[..., :1], 3, axis=3)
        if self.scale != 1.0:
            import cv2  # installed with rapidocr-onnxruntime

            size = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
            rgb = np.stack([cv2.resize(np.ascontiguousarray(t), size, interpolation=cv2.INTER_LINEAR)
                            for t in rgb])
            h, w = rgb.shape[1:3]
        ph, pw = -h % STRIDE, -w % STRIDE
        batch = np.zeros((n, 3, h + ph, w + pw), np.float32)  # 0 is mid-grey after normalising
        batch[:, :, :h, :w] = rgb.transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
        return batch

    def postprocess(self, prob: np.ndarray, tile_h: int, tile_w: int) -> list[dict[str, Any]]:
        """DBNet probability maps ``N × H' × W'`` → per-tile boxes in tile pixels.

        Threshold, dilate 2×2, label connected regions (never across tiles), score each by its
        mean probability, grow it by the unclip distance, scale back to the tile and clip.
        """
        n = len(prob)
        mask = prob > self.threshold
        mask = ndimage.binary_dilation(mask, structure=np.ones((1, 2, 2), bool))
        within_tile = np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0)))  # 8-connected in 2-D
        labels, count = ndimage.label(mask, structure=within_tile)
        out: list[dict[str, Any]] = [{"boxes": np.empty((0, 4)), "scores": np.empty(0),
                                      "classes": self.class_name} for _ in range(n)]
        if not count:
            return out
        z, y, x = np.nonzero(labels)
        lab = labels[z, y, x]
        order = np.argsort(lab, kind="stable")
        z, y, x, lab = z[order], y[order], x[order], lab[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        tile = z[starts]
        x0, x1 = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts) + 1
        y0, y1 = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts) + 1
        score = np.add.reduceat(prob[z, y, x], starts) / np.diff(np.r_[starts, len(lab)])
        w, h = (x1 - x0).astype(float), (y1 - y0).astype(float)
        keep = (score >= self.box_threshold) & (np.minimum(w, h) >= self.min_size)
        grow = w * h * self.unclip_ratio / (2.0 * (w + h))
        boxes = np.stack([x0 - grow, y0 - grow, x1 + grow, y1 + grow], axis=1) / self.scale
        boxes = np.clip(boxes, 0.0, [tile_w, tile_h, tile_w, tile_h])[keep]
        tile, score = tile[keep], score[keep]
        for k in np.unique(tile):
            mine = tile == k
            out[k] = {"boxes": boxes[mine], "scores": score[mine], "classes": self.class_name}
        return out

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[dict[str, Any]]:
        """Detect text in ``tiles`` (``N × H × W × C`` uint8) with one network call."""
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[..., None]
        (prob,) = self.session.run(None, {self.input_name: self.preprocess(tiles)})
        return self.postprocess(prob[:, 0], tiles.shape[1], tiles.shape[2])
