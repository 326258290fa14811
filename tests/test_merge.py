"""NMS and Soft-NMS on hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detections import Detections
from pipeline.merge import nms, overlapping_pairs, soft_nms


def test_overlapping_pairs_iou() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [10, 0, 20, 10]], float)
    i, j, iou = overlapping_pairs(boxes)
    pairs = {(int(a), int(b)): v for a, b, v in zip(i, j, iou)}
    assert pairs.keys() == {(0, 1), (1, 3)}  # (0, 3) only touch: IoU 0, dropped
    assert pairs[(0, 1)] == pytest.approx(50 / 150)


def test_nms_keeps_highest_per_class() -> None:
    dets = Detections(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [3, 0, 13, 10]],
        [0.9, 0.95, 0.8, 0.5, 0.3],
        ["car", "car", "truck", "car", "car"],
    )
    kept = nms(dets, iou_threshold=0.5)
    # box 1 (0.95) suppresses 0 (IoU 0.818) and 4 (IoU 0.667); truck is another class
    assert kept.boxes.tolist() == [[1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    assert kept.classes.tolist() == ["car", "truck", "car"]
    # a high threshold keeps 4 (IoU with 1 is 0.667 < 0.75) but not 0 (0.818)
    assert len(nms(dets, iou_threshold=0.75)) == 4


def test_soft_nms_decays_instead_of_dropping() -> None:
    dets = Detections([[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50]], [0.9, 0.8, 0.7],
                      ["a", "a", "a"])
    out = soft_nms(dets, iou_threshold=0.5, sigma=0.5, skip_box_threshold=0.01)
    iou = 90 / 110
    assert out.scores.tolist() == pytest.approx([0.9, 0.8 * np.exp(-iou**2 / 0.5), 0.7])
    # a small sigma decays the duplicate below the skip threshold: it is dropped
    assert len(soft_nms(dets, 0.5, sigma=0.01, skip_box_threshold=0.01)) == 2


def test_nms_scales_to_many_boxes() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 20000, size=(20000, 2))
    boxes = np.hstack([xy, xy + 10])
    dup = boxes + 0.5
    dets = Detections(np.vstack([boxes, dup]), np.r_[np.ones(20000), np.full(20000, 0.5)],
                      np.full(40000, "x", dtype=object))
    kept = nms(dets, 0.75)
    # each duplicate (IoU ≈ 0.905) is removed; random originals rarely overlap that much
    assert 19900 <= len(kept) <= 20000
    assert (kept.scores == 1).mean() > 0.995


def _kept_set(detections: Detections) -> set[tuple[float, ...]]:
    return {(*box, score) for box, score in zip(detections.boxes.tolist(),
                                                detections.scores.tolist(), strict=True)}


def test_score_ties_do_not_depend_on_arrival_order() -> None:
    """Boxes with equal scores arrive in any order (chunks finish in any order): NMS and
    Soft-NMS keep the same boxes with the same scores whatever the order."""
    rng = np.random.default_rng(7)
    xy = rng.integers(0, 400, size=(600, 2)).astype(float)
    boxes = np.hstack([xy, xy + rng.integers(8, 20, size=(600, 2))])
    scores = rng.integers(1, 4, size=600) / 4.0  # three score levels: many ties
    dets = Detections(boxes, scores, np.array(["a", "b"] * 300, dtype=object))
    first_nms, first_soft = _kept_set(nms(dets, 0.3)), _kept_set(soft_nms(dets, 0.3, 0.5, 0.2))
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(600)
        shuffled = dets.select(order)
        assert _kept_set(nms(shuffled, 0.3)) == first_nms
        assert _kept_set(soft_nms(shuffled, 0.3, 0.5, 0.2)) == first_soft


def test_an_exact_tie_keeps_the_box_that_comes_first_by_position() -> None:
    left, right = [10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0]  # IoU 0.9, equal scores
    for boxes in ([left, right], [right, left]):
        kept = nms(Detections(np.array(boxes), np.array([0.5, 0.5]), np.array(["a", "a"])), 0.75)
        assert kept.boxes.tolist() == [left]
