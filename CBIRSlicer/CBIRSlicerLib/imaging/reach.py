"""The part of a result image a local registration stage can reach: a cut that gives the same answer faster.

Mattes mutual information (SimpleITK) computes the moving image's gradient over all of it on every call, and bins its
intensities between the moving image's extremes; the local stage of placement registers a 128 mm neighbourhood into a
whole series, so most of that work was on voxels it never reaches (docs/benchmarks.md, "Where placement's time goes").
"""

from __future__ import annotations

import numpy as np

# The local stage's result image is cut to what the stage can reach: where the start carries the query's neighbourhood,
# widened by this on every side (the stage refines a start, it does not travel; the level window allows 24-48 mm).
LOCAL_REACH_MM = 96.0


def reachable(fixed, moving, initial):
    """The part of ``moving`` the local stage registers ``fixed`` into (a SimpleITK image; ``moving`` itself when the cut
    would not be smaller): the box the ``initial`` transform carries the neighbourhood's corners to, widened by
    :data:`LOCAL_REACH_MM`, and grown to hold a voxel of the whole image's lowest and one of its highest value.

    Why: Mattes mutual information computes the moving image's gradient over all of it, every call (two thirds of the
    local stage's time on a whole head-and-neck series), and it bins intensities between the moving image's extremes,
    so a cut must keep them to give the same answer (a cut without them moved a placed point 2.5 mm; with them, 0.1 um).
    """
    import SimpleITK as sitk

    size = np.array(fixed.GetSize())
    corners = [fixed.TransformIndexToPhysicalPoint([int(v) for v in corner * (size - 1)])
               for corner in np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T]
    carried = np.array([initial.TransformPoint(tuple(float(v) for v in point)) for point in corners])
    indices = np.array([moving.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point)) for point in carried])
    reach = LOCAL_REACH_MM / np.array(moving.GetSpacing())
    shape = np.array(moving.GetSize())
    low = np.maximum(np.floor(indices.min(axis=0) - reach), 0).astype(int)
    high = np.minimum(np.ceil(indices.max(axis=0) + reach), shape - 1).astype(int)
    if np.any(high < low):
        return moving
    array = sitk.GetArrayViewFromImage(moving)  # [z, y, x]
    for extreme in (array.min(), array.max()):
        where = np.argwhere(array == extreme)[:, ::-1]  # (x, y, z)
        nearest = where[np.argmin(np.abs(where - np.clip(where, low, high)).sum(axis=1))]
        low, high = np.minimum(low, nearest), np.maximum(high, nearest)
    if np.prod(high - low + 1) >= 0.8 * np.prod(shape):
        return moving
    return sitk.RegionOfInterest(moving, [int(v) for v in high - low + 1], [int(v) for v in low])
