"""The one place where LPS (ITK, DICOM, files) and RAS (Slicer, users) meet.

Both frames share the superior axis; RAS = diag(-1, -1, 1) * LPS. Every conversion in the
project goes through the functions here so the sign flip is written exactly once.
"""

from __future__ import annotations

import numpy as np

# Flipping x and y is its own inverse, so one matrix serves both directions.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Convert points (..., 3) from LPS to RAS millimetres."""
    return np.asarray(points, dtype=float) @ LPS_TO_RAS.T


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Convert points (..., 3) from RAS to LPS millimetres."""
    return np.asarray(points, dtype=float) @ RAS_TO_LPS.T


def ijk_to_ras_from_lps_geometry(origin_lps, spacing, direction_lps) -> np.ndarray:
    """4x4 IJK-to-RAS matrix from ITK geometry (origin, spacing, row-major 3x3 direction in LPS)."""
    direction = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing, dtype=float))
    matrix[:3, 3] = lps_to_ras(origin_lps)
    return matrix


def lps_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """ITK geometry (origin, spacing, row-major direction, all LPS) from a 4x4 IJK-to-RAS matrix."""
    m = np.asarray(ijk_to_ras, dtype=float)
    columns = m[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("IJK-to-RAS matrix has a zero-length axis")
    direction_lps = RAS_TO_LPS @ (columns / spacing)
    origin_lps = ras_to_lps(m[:3, 3])
    return tuple(origin_lps), tuple(spacing), tuple(direction_lps.ravel())
