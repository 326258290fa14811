"""PP-OCRv4's DBNet text detector (:class:`pipeline.models.onnx.TextDetector`) as a
segmentation model: its per-pixel text probability, not its boxes.

    imageProcessor: {type: PYTHON, name: "pipeline.segmentation.text:TextSegmenter"}
    segmentation: {stitch: BLEND}

Classes ``background`` and ``text``; each tile's answer is ``[1 - p, p]`` (``2 × H × W``
float32), ``p`` the network's probability resized back to the tile where ``scale`` is not 1.
Needs the ``onnx`` extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.models.onnx import TextDetector


class TextSegmenter:
    """DBNet's text probability per pixel (``scale``, ``device``, ``threads`` as for
    :class:`~pipeline.models.onnx.TextDetector`)."""

    class_names = ("background", "text")
    batch_size = 8

    def __init__(self, scale: float = 1.0, device: str = "auto", threads: int = 0, **_: Any) -> None:
        self.detector = TextDetector(scale=scale, device=device, threads=threads)

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[..., None]
        n, h, w = tiles.shape[:3]
        detector = self.detector
        (prob,) = detector.session.run(None, {detector.input_name: detector.preprocess(tiles)})
        answers = []
        for p in prob[:, 0]:
            if detector.scale != 1.0:
                import cv2  # installed with rapidocr-onnxruntime

                sh, sw = round(h * detector.scale), round(w * detector.scale)
                p = cv2.resize(np.ascontiguousarray(p[:sh, :sw]), (w, h), interpolation=cv2.INTER_LINEAR)
            p = np.clip(p[:h, :w], 0.0, 1.0).astype(np.float32)
            answers.append(np.stack([1 - p, p]))
        return answers
