"""Removing duplicates: NMS and Soft-NMS per class, in full-image pixels.

Candidate pairs come from shapely's STRtree (boxes that intersect), IoU is computed for all
pairs at once with numpy, and only the greedy pass walks the boxes in score order.
"""

from __future__ import annotations

import heapq

import numpy as np
import shapely

from pipeline.detections import Detections


def overlapping_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of boxes whose interiors intersect, with their IoU."""
    if len(boxes) < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0)
    geometries = shapely.box(*boxes.T)
    # for axis-aligned boxes the tree's envelope test is the intersection test (IoU > 0 below
    # drops the pairs that only touch), so no GEOS predicate is needed
    i, j = shapely.STRtree(geometries).query(geometries)
    upper = i < j
    i, j = i[upper], j[upper]
    a, b = boxes[i], boxes[j]
    width = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    height = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[i] + area[j] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    positive = iou > 0
    return i[positive], j[positive], iou[positive]


def _neighbours(n: int, i: np.ndarray, j: np.ndarray, iou: np.ndarray) -> list[list[tuple[int, float]]]:
    table: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for a, b, v in zip(i.tolist(), j.tolist(), iou.tolist(), strict=True):
        table[a].append((b, v))
        table[b].append((a, v))
    return table


#: rounds of the vectorised NMS pass before the rest is done box by box (long chains)
_NMS_ROUNDS = 64


def score_order(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; equal scores by the box ``(xmin, ymin, xmax, ymax)``,
    smallest first, so the order does not depend on the order the boxes arrived in (chunks
    finish in any order). Only identical boxes with equal scores keep their input order."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.lexsort((np.arange(len(boxes)), boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0],
                       -np.asarray(scores, dtype=np.float64)))


def nms_indices(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS: a box is dropped if a higher-ranked kept box has
    IoU > ``iou_threshold`` with it. Ranks are :func:`score_order`'s (ties by box, not index).

    Greedy NMS keeps a box exactly when all of its higher-ranked neighbours are dropped, so it
    is decided in rounds over all boxes at once (as many as the longest suppression chain,
    a few for real detections); a very long chain finishes with the sequential pass.
    """
    n = len(boxes)
    i, j, iou = overlapping_pairs(boxes)
    above = iou > iou_threshold
    i, j = i[above], j[above]
    order = score_order(boxes, scores)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    first = rank[i] < rank[j]
    high, low = np.where(first, i, j), np.where(first, j, i)
    undecided, kept, dropped = 0, 1, 2
    state = np.zeros(n, dtype=np.int8)
    for _ in range(_NMS_ROUNDS):
        live = state[low] == undecided
        high, low = high[live], low[live]
        blocked = np.zeros(n, dtype=bool)
        blocked[low[state[high] != dropped]] = True
        state[(state == undecided) & ~blocked] = kept
        state[low[state[high] == kept]] = dropped
        if not (state == undecided).any():
            return np.flatnonzero(state == kept)
    # the sequential greedy pass over what is left, in rank order
    live = state[low] == undecided
    high, low = high[live], low[live]
    by_high = np.argsort(high, kind="stable")
    starts = np.searchsorted(high[by_high], np.arange(n + 1))
    targets = low[by_high]
    for index in order[state[order] == undecided].tolist():
        if state[index] == undecided:
            state[index] = kept
            state[targets[starts[index]:starts[index + 1]]] = dropped
    return np.flatnonzero(state == kept)


def soft_nms_scores(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, sigma: float,
    skip_box_threshold: float,
) -> np.ndarray:
    """Gaussian Soft-NMS, as OSML runs it (ensemble-boxes' method 2): each box, in order of its
    current score, decays the score of every box it overlaps by ``exp(-iou² / sigma)``; the
    gaussian decay does not use ``iou_threshold`` (accepted for wire compatibility). Returns
    the new scores; boxes whose score fell below ``skip_box_threshold`` get ``nan``."""
    del iou_threshold
    table = _neighbours(len(boxes), *overlapping_pairs(boxes))
    current = scores.astype(np.float64).copy()
    done = np.zeros(len(boxes), dtype=bool)
    tie = np.empty(len(boxes), dtype=np.int64)  # equal scores: by box, as score_order
    tie[score_order(boxes, np.zeros(len(boxes)))] = np.arange(len(boxes))
    heap = [(-s, t, k) for k, (s, t) in enumerate(zip(current.tolist(), tie.tolist(), strict=True))]
    heapq.heapify(heap)
    while heap:
        negative, _, index = heapq.heappop(heap)
        if done[index] or -negative != current[index]:
            continue
        done[index] = True
        if current[index] < skip_box_threshold:
            continue
        for other, overlap in table[index]:
            if not done[other]:
                current[other] *= np.exp(-(overlap**2) / sigma)
                heapq.heappush(heap, (-current[other], int(tie[other]), other))
    current[current < skip_box_threshold] = np.nan
    return current


def _per_class(detections: Detections) -> list[np.ndarray]:
    _, inverse = np.unique(detections.classes.astype(str), return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)] if len(detections) else []


def nms(detections: Detections, iou_threshold: float = 0.75) -> Detections:
    """Greedy NMS within each class."""
    keep = [
        members[nms_indices(detections.boxes[members], detections.scores[members], iou_threshold)]
        for members in _per_class(detections)
    ]
    return detections.select(np.sort(np.concatenate(keep))) if keep else detections


def soft_nms(
    detections: Detections, iou_threshold: float = 0.75, sigma: float = 0.1,
    skip_box_threshold: float = 0.0001,
) -> Detections:
    """Soft-NMS within each class; boxes decayed below ``skip_box_threshold`` are dropped."""
    scores = detections.scores.copy()
    for members in _per_class(detections):
        scores[members] = soft_nms_scores(
            detections.boxes[members], detections.scores[members], iou_threshold, sigma,
            skip_box_threshold,
        )
    keep = ~np.isnan(scores)
    return detections.select(keep).rescored(scores[keep])  # featureClasses keep rawScore


def distill(detections: Detections, algorithm: object | None) -> Detections:
    """Apply the request's feature-distillation step (a ``DistillationAlgorithm`` or None)."""
    if algorithm is None or not len(detections):
        return detections
    kind = getattr(algorithm, "algorithm_type", "NMS")
    iou = float(getattr(algorithm, "iou_threshold", 0.75))
    if kind == "SOFT_NMS":
        return soft_nms(
            detections, iou, float(getattr(algorithm, "sigma", 0.1)),
            float(getattr(algorithm, "skip_box_threshold", 0.0001)),
        )
    return nms(detections, iou)


def border_mask(boxes: np.ndarray, reach: tuple[float, float, float, float]) -> np.ndarray:
    """Boxes of one chunk that may overlap boxes of a neighbouring chunk.

    ``reach`` ``(x0, y0, x1, y1)`` is :meth:`pipeline.tiling.TileGrid.chunk_reach`: the left
    and top neighbours' tiles (so their boxes) end at ``x0`` and ``y0``, the right and bottom
    ones' start at ``x1`` and ``y1`` (infinite where there is no neighbour), so only boxes that
    cross one of those lines can touch them.
    """
    x0, y0, x1, y1 = reach
    return (boxes[:, 0] < x0) | (boxes[:, 1] < y0) | (boxes[:, 2] > x1) | (boxes[:, 3] > y1)


def settled(detections: Detections, border: np.ndarray, algorithm: object | None) -> np.ndarray:
    """Detections whose merge result cannot depend on any other chunk.

    NMS and Soft-NMS act independently on each connected component of the graph of
    same-class boxes that interact (IoU above the threshold for NMS, any overlap for
    Soft-NMS). A component without a ``border`` box is therefore final within its chunk; the
    rest must wait for the cross-chunk pass. Without distillation everything is settled.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(detections)
    if algorithm is None or n == 0 or not border.any():
        return np.ones(n, dtype=bool)
    i, j, iou = overlapping_pairs(detections.boxes)
    kind = getattr(algorithm, "algorithm_type", "NMS")
    threshold = 0.0 if kind == "SOFT_NMS" else float(getattr(algorithm, "iou_threshold", 0.75))
    classes = detections.classes.astype(str)
    edge = (iou > threshold) & (classes[i] == classes[j])
    graph = coo_matrix((np.ones(int(edge.sum())), (i[edge], j[edge])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    tainted = np.zeros(labels.max() + 1, dtype=bool)
    tainted[labels[border]] = True
    return ~tainted[labels]
