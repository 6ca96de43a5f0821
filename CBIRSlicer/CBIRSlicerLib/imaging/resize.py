"""Bilinear resizing of image stacks, shared by the descriptor and the index's crops."""

from __future__ import annotations

import numpy as np


def resize_bilinear(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Separable bilinear resize of the last two axes with pixel centres aligned (the same on every platform)."""
    def axis_weights(n_in: int, n_out: int):
        centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        centres = np.clip(centres, 0, n_in - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (centres - low).astype(np.float32)

    r0, r1, rw = axis_weights(image.shape[-2], rows)
    c0, c1, cw = axis_weights(image.shape[-1], cols)
    top = image[..., r0, :] * (1 - rw)[:, None] + image[..., r1, :] * rw[:, None]
    return top[..., c0] * (1 - cw) + top[..., c1] * cw
