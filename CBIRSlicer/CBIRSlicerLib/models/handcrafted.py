"""A deterministic image descriptor that needs no weights: the offline model and the baseline to beat.

Made for region queries against tiles: every block is a histogram or a radial profile, so it does
not change when the same content sits a few millimetres off a tile grid (version 1 had quadrant,
cell and layout blocks, which did, and lost region queries to tissue tiles; docs/benchmarks.md).
Blocks, each L2-normalised before the whole vector is: a 32-bin intensity histogram; a 16-bin
histogram of intensities after a wider blur (how large the bright and dark areas are); a 16-bin
intensity histogram weighted by a Gaussian around the centre (what sits in the middle); the mean
intensity in 8 rings around the centre, zero-mean and unit-variance (rotation-free shape: disc,
ring, dot); a 16-bin gradient-magnitude histogram; an 8-bin gradient-orientation histogram; and
rotation-invariant uniform local binary patterns at radius 1 and 2 (texture). Gradients and texture
are taken after a 3x3 binomial blur, so pixel noise does not read as texture. Histograms are
square-rooted (Hellinger) so the background bin does not dominate. Images are first resized to
64x64 grey in [0, 1]; a batch of images is described in one vectorised pass.
"""

from __future__ import annotations

import numpy as np

from ..imaging.resize import resize_bilinear
from .base import Embedder, Fingerprint, available_cores, check_images

SIZE = 64
INTENSITY_BINS = 32
BLURRED_BINS = 16
BLUR_PASSES = 4  # four 3x3 binomial passes: a Gaussian of about 1.4 px (3 % of the image side)
CENTRE_BINS = 16
CENTRE_SIGMA = SIZE / 4
RINGS = 8
MAGNITUDE_BINS = 16
ORIENTATION_BINS = 8
LBP_RADII = (1, 2)
BLOCKS = ("intensity", "blurred", "centre", "rings", "magnitude", "orientation", "lbp")
DIM = INTENSITY_BINS + BLURRED_BINS + CENTRE_BINS + RINGS + MAGNITUDE_BINS + ORIENTATION_BINS + 10 * len(LBP_RADII)
VERSION = "2"  # bump when the descriptor changes: it is part of the fingerprint


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


def _grey_stack(images: list[np.ndarray]) -> np.ndarray:
    """Images resized to SIZE x SIZE grey, (n, SIZE, SIZE); images of one shape (a slice's tiles) resized together."""
    out = np.empty((len(images), SIZE, SIZE), np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for n, image in enumerate(images):
        by_shape.setdefault(np.shape(image), []).append(n)
    for members in by_shape.values():
        stack = np.stack([as_grey(images[n]) for n in members])
        out[members] = resize_bilinear(stack, SIZE, SIZE)
    return out


def _normalised_rows(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=-1, keepdims=True)
    return np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)


def _histograms(values: np.ndarray, bins: int, weights: np.ndarray | None = None, upper: float = 1.0) -> np.ndarray:
    """Square-rooted (Hellinger) histograms over [0, upper] of each image of a stack (n, rows, cols) -> (n, bins)."""
    count = len(values)
    index = np.clip((values * (bins / upper)).astype(np.int64), 0, bins - 1).reshape(count, -1)
    index += (np.arange(count) * bins)[:, None]
    flat_weights = None if weights is None else np.broadcast_to(weights, values.shape).reshape(count, -1).ravel()
    hist = np.bincount(index.ravel(), weights=flat_weights, minlength=count * bins).reshape(count, bins)
    return np.sqrt(hist).astype(np.float32)


def _blur(stack: np.ndarray) -> np.ndarray:
    """3x3 binomial blur of each image of a stack, edges padded."""
    padded = np.pad(stack, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = padded[:, :-2] * 0.25 + padded[:, 1:-1] * 0.5 + padded[:, 2:] * 0.25
    return rows[:, :, :-2] * 0.25 + rows[:, :, 1:-1] * 0.5 + rows[:, :, 2:] * 0.25


def _riu2_table() -> np.ndarray:
    """Rotation-invariant uniform code (0-8 set bits if at most 2 transitions around the circle, else 9) of each byte."""
    table = np.empty(256, np.int64)
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        table[code] = sum(bits) if transitions <= 2 else 9
    return table


_RIU2 = _riu2_table()


def _lbp_riu2(stack: np.ndarray, radius: int) -> np.ndarray:
    """10-bin histograms of rotation-invariant uniform LBP codes (8 neighbours at a radius) of each image."""
    offsets = [(0, radius), (radius, radius), (radius, 0), (radius, -radius),
               (0, -radius), (-radius, -radius), (-radius, 0), (-radius, radius)]
    padded = np.pad(stack, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    _, rows, cols = stack.shape
    threshold = stack - 1e-3  # a small tolerance keeps flat regions from turning into noise-like codes
    code = np.zeros(stack.shape, np.uint8)
    for bit, (dr, dc) in enumerate(offsets):
        code |= (padded[:, radius + dr:radius + dr + rows, radius + dc:radius + dc + cols] >= threshold).astype(np.uint8) << bit
    return _histograms(_RIU2[code].astype(np.float32), 10, upper=10.0)


_yy, _xx = np.mgrid[0:SIZE, 0:SIZE]
_RADIUS = np.hypot(_yy - (SIZE - 1) / 2, _xx - (SIZE - 1) / 2)
_RING_INDEX = np.minimum((_RADIUS / (SIZE / 2) * RINGS).astype(np.int64), RINGS - 1)
_RING_COUNTS = np.bincount(_RING_INDEX.ravel(), minlength=RINGS).astype(np.float32)
_CENTRE_WEIGHTS = np.exp(-_RADIUS ** 2 / (2 * CENTRE_SIGMA ** 2)).astype(np.float32)


def _ring_profiles(stack: np.ndarray) -> np.ndarray:
    """Mean intensity in each ring around the centre, standardised per image."""
    count = len(stack)
    index = (_RING_INDEX.ravel()[None, :] + (np.arange(count) * RINGS)[:, None]).ravel()
    sums = np.bincount(index, weights=stack.reshape(count, -1).ravel(), minlength=count * RINGS).reshape(count, RINGS)
    means = sums / _RING_COUNTS
    return ((means - means.mean(axis=1, keepdims=True)) / (means.std(axis=1, keepdims=True) + 1e-3)).astype(np.float32)


def describe_batch(images: list[np.ndarray]) -> np.ndarray:
    """The handcrafted descriptors of some images, float32 (n, DIM), each row L2-normalised."""
    if not len(images):
        return np.zeros((0, DIM), np.float32)
    grey = _grey_stack(images)
    smooth = _blur(grey)
    wide = smooth
    for _ in range(BLUR_PASSES - 1):
        wide = _blur(wide)
    gy, gx = np.gradient(smooth, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    orientation = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned orientation in [0, pi)
    blocks = [
        _histograms(grey, INTENSITY_BINS),
        _histograms(wide, BLURRED_BINS),
        _histograms(grey, CENTRE_BINS, _CENTRE_WEIGHTS),
        _ring_profiles(grey),
        _histograms(np.clip(magnitude / 0.5, 0, 1), MAGNITUDE_BINS),  # gradients above 0.5 per pixel share the top bin
        _histograms(orientation, ORIENTATION_BINS, magnitude, np.pi),
        np.concatenate([_lbp_riu2(smooth, r) for r in LBP_RADII], axis=1),
    ]
    vectors = np.concatenate([_normalised_rows(b) for b in blocks], axis=1)
    return _normalised_rows(vectors).astype(np.float32)


def describe(image: np.ndarray) -> np.ndarray:
    """The handcrafted descriptor of one image, float32 of length DIM, L2-normalised."""
    return describe_batch([image])[0]


class HandcraftedEmbedder(Embedder):
    """The weight-free descriptor of this module as an embedder; a batch is described in chunks on all cores."""

    default_batch_size = 256
    # Images described as one stack: larger stacks fall out of the CPU caches (5,184 crops of a case: 4.3 s in stacks
    # of 64, 6.6 s in stacks of 256). numpy releases the GIL in the descriptor's array work, so stacks described on
    # one thread per core run side by side: 2.3 s on 2 cores.
    chunk = 64

    def __init__(self):
        self._describe_batch = describe_batch
        self._threads = None
        self.name = "handcrafted"
        self.dim = DIM
        self.fingerprint = Fingerprint(
            name="handcrafted", family="handcrafted", dim=self.dim, source="built in",
            config={"version": VERSION, "size": SIZE, "blocks": list(BLOCKS),
                    "lbp_radii": list(LBP_RADII)},
            preprocessing={"input": "grey in [0, 1]", "resize": f"bilinear {SIZE}x{SIZE}"},
        )

    def _embed_batch(self, images: list[np.ndarray]) -> np.ndarray:
        chunks = [images[start:start + self.chunk] for start in range(0, len(images), self.chunk)]
        if len(chunks) < 2 or available_cores() < 2:
            return self._describe_batch(images)
        if self._threads is None:
            from concurrent.futures import ThreadPoolExecutor

            self._threads = ThreadPoolExecutor(min(available_cores(), 8), thread_name_prefix="handcrafted")
        return np.concatenate(list(self._threads.map(self._describe_batch, chunks)))

    supports_dense = True

    def embed_dense(self, images, pixel_mm, cell_mm: float | None = None, boxes=None, batch_size: int | None = None) -> list:
        """The descriptor of every cell of a grid of ``cell_mm`` squares (``boxes`` ignored: every cell is cheap)."""
        from .dense import DENSE_CELL_MM, DenseGrid, grid_size

        images = check_images(images)
        sizes = list(pixel_mm) if np.ndim(pixel_mm) else [float(pixel_mm)] * len(images)
        out = []
        for image, mm in zip(images, sizes):
            cell_px = (cell_mm or DENSE_CELL_MM) / mm
            rows, cols = grid_size(image.shape[:2], cell_px)
            edges = [np.minimum(np.round(np.arange(n + 1) * cell_px).astype(int), side) for n, side in zip((rows, cols), image.shape[:2])]
            starts = [np.minimum(e[:-1], side - 1) for e, side in zip(edges, image.shape[:2])]
            crops = [image[starts[0][i]:max(edges[0][i + 1], starts[0][i] + 1), starts[1][j]:max(edges[1][j + 1], starts[1][j] + 1)]
                     for i in range(rows) for j in range(cols)]
            cells = self._embed_batch(crops).reshape(rows, cols, self.dim)
            out.append(DenseGrid(cells, np.ones((rows, cols), bool), cell_px, tuple(image.shape[:2]), 0))
        return out
