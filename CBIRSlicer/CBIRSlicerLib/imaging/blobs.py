"""Blob detection in a slice: where compact bright or dark objects sit, so region items can be centred on them.

Tiles on a fixed grid hold a lesion wherever it happens to fall, often near a tile's edge, and a
crop drawn around the lesion (a region query) is then compared with off-centre versions of it.
The index therefore also holds crops centred on the slice's most blob-like places: extrema of a
difference of Gaussians (the usual approximation of the scale-normalised Laplacian, after Lowe's
SIFT) at a few radii. Lines and edges (the body outline, the fat layer) also answer a difference
of Gaussians; they are rejected by the ratio of the principal curvatures, as SIFT does, which
is what lets a low-contrast cyst rank among the slice's blobs at all (docs/benchmarks.md).
All numpy; pure functions of a windowed image in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RADII_MM = (4.0, 5.7, 8.0, 11.3, 16.0)  # blob radii searched, a factor sqrt(2) apart
MIN_RESPONSE = 0.01  # difference-of-Gaussians magnitude, in window units: below it is noise
EDGE_RATIO = 4.0  # the largest allowed ratio of principal curvatures; above it a response is an edge or a line
# A weaker blob is dropped when its centre lies closer to a stronger one than this, or than the stronger one's radius
# plus half its own: a ring also answers at its wall's scale, and a bright disc at small scales along its edge.
SEPARATION_MM = 4.0


@dataclass(frozen=True)
class Blob2D:
    """A detected blob: pixel position (row, col), radius (mm) and response (difference-of-Gaussians magnitude)."""

    row: int
    col: int
    radius_mm: float
    response: float


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of a 2D image, edges padded by their own values."""
    radius = max(1, int(np.ceil(3 * sigma_px)))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma_px ** 2))
    taps /= taps.sum()
    padded = np.pad(np.asarray(image, np.float64), radius, mode="edge")
    rows, cols = image.shape
    vertical = _along_rows(padded, taps, radius, rows)
    return _along_rows(np.ascontiguousarray(vertical.T), taps, radius, cols).T  # columns as rows: contiguous reads


def _along_rows(padded: np.ndarray, taps: np.ndarray, radius: int, rows: int) -> np.ndarray:
    """sum_n taps[n] * padded[n:n + rows]; the taps are symmetric, so paired (half the products), into one buffer."""
    out = taps[radius] * padded[radius:radius + rows]
    pair = np.empty_like(out)
    for n in range(radius):
        np.add(padded[n:n + rows], padded[2 * radius - n:2 * radius - n + rows], out=pair)
        pair *= taps[n]
        out += pair
    return out


def _local_maxima(values: np.ndarray) -> np.ndarray:
    """Pixels not below any of their 8 neighbours."""
    padded = np.pad(values, 1, mode="constant", constant_values=-np.inf)
    rows, cols = values.shape
    keep = np.ones(values.shape, bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                keep &= values >= padded[1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols]
    return keep


def _blob_like(dog: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether the response curves alike in every direction at these pixels (Hessian determinant positive, curvature
    ratio bounded); second differences of the border pixels count as 0. Only the candidates are looked at (the arithmetic
    of the whole-image differences, per pixel)."""
    height, width = dog.shape
    up, down = np.maximum(rows - 1, 0), np.minimum(rows + 1, height - 1)
    left, right = np.maximum(cols - 1, 0), np.minimum(cols + 1, width - 1)
    inner_rows = (rows >= 1) & (rows <= height - 2)
    inner_cols = (cols >= 1) & (cols <= width - 2)
    dyy = np.where(inner_rows, dog[down, cols] - 2 * dog[rows, cols] + dog[up, cols], 0.0)
    dxx = np.where(inner_cols, dog[rows, right] - 2 * dog[rows, cols] + dog[rows, left], 0.0)
    dxy = np.where(inner_rows & inner_cols, (dog[down, right] - dog[down, left] - dog[up, right] + dog[up, left]) / 4, 0.0)
    determinant = dxx * dyy - dxy ** 2
    return (determinant > 0) & ((dxx + dyy) ** 2 < determinant * (EDGE_RATIO + 1) ** 2 / EDGE_RATIO)


def detect_blobs(grey: np.ndarray, pixel_mm: float, count: int, radii_mm=RADII_MM) -> list[Blob2D]:
    """The ``count`` strongest blobs (bright or dark) of a windowed 2D image in [0, 1], strongest first."""
    grey = np.asarray(grey, np.float64)
    if count <= 0 or grey.ndim != 2 or min(grey.shape) < 3:
        return []
    # A blob of radius r answers a Laplacian of Gaussian best at sigma = r / sqrt(2); the difference of two
    # Gaussians a fixed ratio apart around that sigma approximates it up to a constant, the same at every scale.
    ratio = radii_mm[1] / radii_mm[0] if len(radii_mm) > 1 else np.sqrt(2)
    sigmas = [r / np.sqrt(2) / pixel_mm for r in radii_mm]
    blurred = [gaussian_blur(grey, s / np.sqrt(ratio)) for s in sigmas] + [gaussian_blur(grey, sigmas[-1] * np.sqrt(ratio))]
    candidates = []
    for n, radius in enumerate(radii_mm):
        dog = blurred[n + 1] - blurred[n]
        magnitude = np.abs(dog)
        rows, cols = np.nonzero(_local_maxima(magnitude) & (magnitude > MIN_RESPONSE))
        shaped = _blob_like(dog, rows, cols)
        rows, cols = rows[shaped], cols[shaped]
        candidates += [(float(magnitude[r, c]), int(r), int(c), float(radius)) for r, c in zip(rows, cols)]
    candidates.sort(key=lambda c: -c[0])
    kept: list[Blob2D] = []
    for response, row, col, radius in candidates:
        if all(np.hypot(row - b.row, col - b.col) * pixel_mm > max(SEPARATION_MM, b.radius_mm + radius / 2) for b in kept):
            kept.append(Blob2D(row, col, radius, response))
            if len(kept) == count:
                break
    return kept
