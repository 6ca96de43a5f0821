"""A deterministic image descriptor that needs no weights: the offline model and the baseline to beat.

Blocks, each L2-normalised before the whole vector is: a 32-bin intensity histogram; 8-bin
histograms of the four quadrants (coarse spatial layout of intensities); a 16-bin gradient
magnitude histogram; 8-bin gradient-orientation histograms on a 4x4 grid of cells (HOG-like);
rotation-invariant uniform local binary patterns at radius 1 and 2 (texture); an 8x8 thumbnail,
zero-mean and unit-variance (layout); the mean intensity in 8 rings around the centre,
zero-mean and unit-variance (what sits at the middle of a region, rotation-free). Gradients and
texture are taken after a 3x3 binomial blur, so pixel noise does not read as texture.
Histograms are square-rooted (Hellinger) so the background
bin does not dominate. Images are first resized to 128x128 grey in [0, 1].
"""

from __future__ import annotations

import numpy as np

SIZE = 128
INTENSITY_BINS = 32
QUADRANT_BINS = 8
MAGNITUDE_BINS = 16
ORIENTATION_BINS = 8
CELLS = 4
LAYOUT = 8
LBP_RADII = (1, 2)
RINGS = 8
DIM = (INTENSITY_BINS + 4 * QUADRANT_BINS + MAGNITUDE_BINS + CELLS * CELLS * ORIENTATION_BINS + 10 * len(LBP_RADII)
       + LAYOUT * LAYOUT + RINGS)
VERSION = "1"  # bump when the descriptor changes: it is part of the fingerprint


def as_grey(image: np.ndarray) -> np.ndarray:
    """uint8 (rows, cols[, channels]) or float image in [0, 1] to float32 grey in [0, 1]."""
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.mean(axis=2)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"expected a 2D image or (rows, cols, channels), got shape {np.shape(image)}")
    grey = array.astype(np.float32)
    if np.asarray(image).dtype == np.uint8:
        grey /= 255.0
    return np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0)


def resize_bilinear(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Separable bilinear resize with pixel centres aligned (the same on every platform)."""
    def axis_weights(n_in: int, n_out: int):
        centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        centres = np.clip(centres, 0, n_in - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (centres - low).astype(np.float32)

    r0, r1, rw = axis_weights(image.shape[0], rows)
    c0, c1, cw = axis_weights(image.shape[1], cols)
    top = image[r0] * (1 - rw)[:, None] + image[r1] * rw[:, None]
    return top[:, c0] * (1 - cw)[None, :] + top[:, c1] * cw[None, :]


def _normalised(block: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(block)
    return block / norm if norm > 0 else block


def _histogram(values: np.ndarray, bins: int, weights=None, upper: float = 1.0) -> np.ndarray:
    """Square-rooted histogram (Hellinger), so the largest bin (usually background) does not swamp the rest."""
    hist, _ = np.histogram(values, bins=bins, range=(0.0, upper), weights=weights)
    return np.sqrt(hist.astype(np.float32))


def _lbp_riu2(image: np.ndarray, radius: int) -> np.ndarray:
    """10-bin histogram of rotation-invariant uniform LBP codes (8 neighbours at a radius)."""
    offsets = [(0, radius), (radius, radius), (radius, 0), (radius, -radius),
               (0, -radius), (-radius, -radius), (-radius, 0), (-radius, radius)]
    padded = np.pad(image, radius, mode="edge")
    rows, cols = image.shape
    # A small tolerance keeps flat regions from turning into noise-like codes.
    bits = np.stack([padded[radius + dr:radius + dr + rows, radius + dc:radius + dc + cols] >= image - 1e-3
                     for dr, dc in offsets]).astype(np.int8)
    transitions = np.abs(np.diff(np.concatenate([bits, bits[:1]]), axis=0)).sum(axis=0)
    codes = np.where(transitions <= 2, bits.sum(axis=0), 9)
    return np.sqrt(np.bincount(codes.ravel(), minlength=10).astype(np.float32))


def _blur(image: np.ndarray) -> np.ndarray:
    """3x3 binomial blur with edge padding."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] * 0.25 + padded[1:-1] * 0.5 + padded[2:] * 0.25
    return rows[:, :-2] * 0.25 + rows[:, 1:-1] * 0.5 + rows[:, 2:] * 0.25


def _standardised(values: np.ndarray) -> np.ndarray:
    return ((values - values.mean()) / (values.std() + 1e-3)).astype(np.float32)


_yy, _xx = np.mgrid[0:SIZE, 0:SIZE]
_RING_INDEX = np.minimum((np.hypot(_yy - (SIZE - 1) / 2, _xx - (SIZE - 1) / 2) / (SIZE / 2) * RINGS).astype(int), RINGS - 1)
_RING_COUNTS = np.bincount(_RING_INDEX.ravel(), minlength=RINGS)


def describe(image: np.ndarray) -> np.ndarray:
    """The handcrafted descriptor of one image, float32 of length DIM, L2-normalised."""
    grey = resize_bilinear(as_grey(image), SIZE, SIZE)
    half = SIZE // 2
    quadrants = [grey[:half, :half], grey[:half, half:], grey[half:, :half], grey[half:, half:]]
    smooth = _blur(grey)
    gy, gx = np.gradient(smooth)
    magnitude = np.hypot(gx, gy)
    orientation = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned orientation in [0, pi)
    cell = SIZE // CELLS
    hog = []
    for r in range(CELLS):
        for c in range(CELLS):
            window = (slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
            hog.append(_histogram(orientation[window], ORIENTATION_BINS, magnitude[window], np.pi))
    hog = np.concatenate(hog)
    layout = _standardised(grey.reshape(LAYOUT, SIZE // LAYOUT, LAYOUT, SIZE // LAYOUT).mean(axis=(1, 3)).ravel())
    rings = _standardised(np.bincount(_RING_INDEX.ravel(), weights=grey.ravel(), minlength=RINGS) / _RING_COUNTS)
    blocks = [
        _histogram(grey, INTENSITY_BINS),
        np.concatenate([_histogram(q, QUADRANT_BINS) for q in quadrants]),
        _histogram(np.clip(magnitude / 0.5, 0, 1), MAGNITUDE_BINS),  # gradients above 0.5 per pixel share the top bin
        hog,
        np.concatenate([_lbp_riu2(smooth, r) for r in LBP_RADII]),
        layout,
        rings,
    ]
    vector = np.concatenate([_normalised(b) for b in blocks]).astype(np.float32)
    return _normalised(vector)
