"""Writing 2D images (PNG) for users to look at: what the model will see."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(rgb: np.ndarray, path: str | Path) -> str:
    """Write a (rows, cols, 3) uint8 image as PNG (row 0 at the top)."""
    import SimpleITK as sitk

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a (rows, cols, 3) image, got shape {rgb.shape}")
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    return str(path)
