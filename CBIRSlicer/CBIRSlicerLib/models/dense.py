"""Dense features: a grid of local vectors over a whole slice from one pass, and region vectors pooled from it.

Cutting every slice into tiles and blob crops and embedding each on its own costs a ViT 135-280 forward
passes per slice. A ViT already computes one token per 16-px patch; taken through the model's own head
(final layer, ``ln_post`` and ``proj`` for open_clip, the layer norm of a transformers backbone) those tokens
lie in the space the image vector does, so any region's vector can be pooled from the tokens it covers.

Geometry: a grid of square cells of ``cell_px`` image pixels each; cell (i, j) covers image rows
[i * cell_px, (i + 1) * cell_px) and columns [j * cell_px, (j + 1) * cell_px). A ViT reaches a cell of
``cell_mm`` (default 10 mm, enough for a 10-mm lesion) by resizing the slice so one patch covers one cell,
then running windows of its own input size over it (overlapping, on the patch grid; a cell two windows
cover gets their mean), so the model always sees the input size it was trained at.

Pooling (the region vector, L2-normalised afterwards), with w_ij the share of cell (i, j) inside the region box::

    mean:  v = sum_ij w_ij c_ij / sum_ij w_ij
    gem:   v = (sum_ij w_ij max(c_ij, 0)^p / sum_ij w_ij)^(1/p),  p = 3   (for non-negative features)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from .base import l2_normalize

DENSE_CELL_MM = 10.0
POOLINGS = ("mean", "gem")
GEM_P = 3.0
Box = tuple[float, float, float, float]  # row0, col0, row1, col1 (ends exclusive) in an image's pixels


@dataclass
class DenseGrid:
    """Local feature vectors of one image: ``cells`` (rows, cols, dim) raw, ``valid`` (rows, cols) the cells computed.

    ``cell_px`` is a cell's side in the image's pixels; ``passes`` the forward passes (model windows) it took.
    """

    cells: np.ndarray
    valid: np.ndarray
    cell_px: float
    image_shape: tuple[int, int]
    passes: int = 1

    def cell_box(self, row: int, col: int) -> Box:
        """The image pixels a cell covers (ends exclusive, fractional)."""
        s = self.cell_px
        return (row * s, col * s, (row + 1) * s, (col + 1) * s)


def grid_size(image_shape: tuple[int, int], cell_px: float) -> tuple[int, int]:
    """Cells along rows and columns needed to cover an image."""
    return tuple(max(1, math.ceil(n / cell_px - 1e-9)) for n in image_shape)


def overlap_weights(shape: tuple[int, int], cell_px: float, box: Box) -> np.ndarray:
    """(rows, cols) share of each cell's area inside a pixel box."""
    r0, c0, r1, c1 = (np.array([float(v)]) for v in box)
    return np.outer(_axis_overlaps(r0, r1, shape[0], cell_px)[0], _axis_overlaps(c0, c1, shape[1], cell_px)[0])


def pool_region(grid: DenseGrid, box: Box, method: str = "mean", p: float = GEM_P) -> np.ndarray:
    """The unit vector of a region (pixel box) pooled from a grid's cells, by the formulas of the module docstring."""
    return pool_regions(grid, [box], method, p)[0]


def _axis_overlaps(low: np.ndarray, high: np.ndarray, count: int, cell_px: float) -> np.ndarray:
    """(regions, count) share of each of ``count`` cells along one axis inside [low, high) (pixels)."""
    edges = np.arange(count + 1) * cell_px
    return np.clip(np.minimum(edges[1:], high[:, None]) - np.maximum(edges[:-1], low[:, None]), 0, None) / cell_px


def pool_regions(grid: DenseGrid, boxes: Sequence[Box], method: str = "mean", p: float = GEM_P) -> np.ndarray:
    """(regions, dim) unit vectors of pixel boxes pooled from one grid (:func:`pool_region` for many at once).

    The weights of all regions form one (regions, cells) matrix and the pooling one product with the cells: a slice's
    ~280 items in ~5 ms on one core instead of ~22 ms one region at a time (docs/benchmarks.md).
    """
    from ..threads import one_blas_thread

    if method not in POOLINGS:
        raise ParameterError(f"dense pooling must be one of {', '.join(POOLINGS)}, not '{method}'")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rows, cols = grid.cells.shape[:2]
    weights = (_axis_overlaps(boxes[:, 0], boxes[:, 2], rows, grid.cell_px)[:, :, None]
               * _axis_overlaps(boxes[:, 1], boxes[:, 3], cols, grid.cell_px)[:, None, :] * grid.valid).reshape(len(boxes), -1)
    totals = weights.sum(axis=1)
    empty = np.flatnonzero(~(totals > 0))
    if len(empty):
        box = boxes[empty[0]]
        raise ParameterError(f"region {tuple(round(float(v), 1) for v in box)} covers no computed cell of a "
                             f"{grid.image_shape[0]} x {grid.image_shape[1]} image")
    source = grid.cells if method == "mean" else np.maximum(grid.cells, 0) ** p
    with one_blas_thread():  # a small product: a second BLAS thread gains nothing and spins against the model's threads
        vectors = weights @ source.reshape(rows * cols, -1).astype(np.float64) / totals[:, None]
    if method == "gem":
        vectors = vectors ** (1.0 / p)
    return l2_normalize(vectors.astype(np.float32))


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Fewest starts (multiples of ``step``) of windows of ``window`` covering ``length``, spread evenly, last flush."""
    if length <= window:
        return [0]
    count = math.ceil(length / window)
    if count * window - length < 2 * step:  # windows that barely overlap give edge tokens no context: one more
        count += 1
    last = length - window
    return sorted({int(round(last * n / (count - 1) / step)) * step if n < count - 1 else last for n in range(count)})


@dataclass
class WindowPlan:
    """How one image is cut into model windows: its scale (model px per image px), canvas size and window starts."""

    scale: float
    canvas: tuple[int, int]  # rows, cols of the resized, padded image (model px, multiples of the patch)
    rows: list[int]
    cols: list[int]
    cell_px: float

    def windows(self, window: int, box: Box | None = None) -> list[tuple[int, int]]:
        """(row start, col start) of the windows to run: all, or those covering any cell a pixel box touches."""
        out = []
        for r in self.rows:
            for c in self.cols:
                if box is not None:
                    r0, c0, r1, c1 = (v * self.scale for v in box)
                    if r + window <= r0 or r >= r1 or c + window <= c0 or c >= c1:
                        continue
                out.append((r, c))
        return out


def plan_windows(image_shape: tuple[int, int], pixel_mm: float, cell_mm: float, window: int, patch: int) -> WindowPlan:
    """Scale an image so a patch covers ``cell_mm``, pad it to whole patches (at least one window), place the windows."""
    if not pixel_mm > 0 or not cell_mm > 0:
        raise ParameterError(f"pixel size and cell size must be positive, got {pixel_mm} and {cell_mm} mm")
    cell_px = cell_mm / pixel_mm
    cells = grid_size(image_shape, cell_px)
    canvas = tuple(max(window, n * patch) for n in cells)
    scale = patch / cell_px
    return WindowPlan(scale, canvas, window_starts(canvas[0], window, patch), window_starts(canvas[1], window, patch), cell_px)


def stitch(plan: WindowPlan, image_shape: tuple[int, int], tokens: Sequence[np.ndarray],
           starts: Sequence[tuple[int, int]], patch: int) -> DenseGrid:
    """One grid from windows' token grids (each (window/patch, window/patch, dim)): cells covered twice get the mean."""
    rows, cols = grid_size(image_shape, plan.cell_px)
    dim = tokens[0].shape[-1] if len(tokens) else 0
    sums = np.zeros((plan.canvas[0] // patch, plan.canvas[1] // patch, dim), np.float64)
    counts = np.zeros(sums.shape[:2], np.int32)
    for grid, (r, c) in zip(tokens, starts):
        h, w = grid.shape[:2]
        sums[r // patch:r // patch + h, c // patch:c // patch + w] += grid
        counts[r // patch:r // patch + h, c // patch:c // patch + w] += 1
    sums, counts = sums[:rows, :cols], counts[:rows, :cols]
    cells = (sums / np.maximum(counts, 1)[..., None]).astype(np.float32)
    return DenseGrid(cells, counts > 0, plan.cell_px, tuple(image_shape), len(starts))


def choose_images(embedder, shapes: Sequence[tuple[int, int]], pixel_mm: Sequence[float], boxes: Sequence[Box],
                  cell_mm: float, passes: int) -> list[int]:
    """Which of a region's slices (in order) to embed within ``passes`` forward passes: evenly spread, the central one kept."""
    count = len(shapes)
    centre = count // 2
    each = embedder.dense_passes(tuple(shapes[centre]), pixel_mm[centre], cell_mm, boxes[centre]) if count else 0
    if count <= 1 or each <= 0:  # no network (handcrafted): every slice is cheap
        return list(range(count))
    keep = max(1, min(count, passes // each))
    if keep % 2 == 0:
        keep -= 1  # an odd count keeps the central slice, the one a region's weights centre on
    if keep == 1:
        return [centre]
    half = keep // 2
    step = min(centre, count - 1 - centre) / half
    return sorted({int(round(centre + k * step)) for k in range(-half, half + 1)})


def region_vectors(embedder, images: Sequence[np.ndarray], pixel_mm: Sequence[float], boxes: Sequence[Box], cell_mm: float,
                   pooling: str, passes: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Unit vectors of regions of slices pooled from their dense grids (the windows over each box only), and which slices.

    With ``passes`` only as many slices as fit that many forward passes are embedded (:func:`choose_images`).
    """
    chosen = list(range(len(images))) if passes is None else choose_images(
        embedder, [np.shape(image)[:2] for image in images], pixel_mm, boxes, cell_mm, passes)
    grids = embedder.embed_dense([images[n] for n in chosen], [pixel_mm[n] for n in chosen], cell_mm,
                                 boxes=[boxes[n] for n in chosen])
    vectors = np.array([pool_region(grid, boxes[n], pooling) for grid, n in zip(grids, chosen)], np.float32)
    return vectors.reshape(len(chosen), -1), chosen
