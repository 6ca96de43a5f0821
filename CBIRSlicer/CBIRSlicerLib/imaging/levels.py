"""The query's level in a result, from the two bodies' coordinates (:mod:`body_axis`): whether the result's field of
view holds it at all, the window a registration may place within (:class:`LevelWindow`) and the start it gives
(:func:`level_transform`: the same level, the bodies' centres in that plane on each other, :class:`BodyPlanes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registration import SPACING_MM, LevelWindow, axis_aligned_array, body_centroids

# Whole-volume registration between different patients missed the level often (tuning head-and-neck patients: organs
# carried with |error along S| p90 36-60 mm, worst 113 mm; the body coordinate: p90 17-25 mm, worst 44 mm). So the level
# evidence gives the start (the query centre's plane goes to the plane of the same level, scaled by the two bodies'
# slopes, the bodies' centres aligned in that plane) and a window no stage may leave.
LEVEL_WINDOW_MIN_MM = 24.0  # half-width of the window at least: the body coordinate's p90 error between patients
LEVEL_WINDOW_MAX_MM = 48.0
LEVEL_PLANES_MM = 8.0  # the body's centre in the plane is read over this thickness


def _point(ras) -> tuple[float, float, float]:
    """A RAS point as a typed triple."""
    return float(ras[0]), float(ras[1]), float(ras[2])


def _reliable(axis) -> bool:
    """Whether a body axis is good enough to place by (BodyAxis.reliable where the body coordinate has it; before, its
    misfit to the template under 1.2, the bound it uses)."""
    return bool(getattr(axis, "reliable", axis.cost <= 1.2))


LEVEL_INSET_MM = 4.0  # a point moved into a result's body goes this far inside its first or last plane of body


def level_window(query_axis, target_axis, centre_ras, reach_mm: float = 0.0) -> tuple[bool | None, LevelWindow | None]:
    """(in view, window) for a query centre carried by two body axes (:class:`imaging.body_axis.BodyAxis`).

    In view is None (and no window) when either axis is missing or unreliable: the registration alone decides; False
    when neither the centre's level nor any level within ``reach_mm`` of it along the body axis (the query box's half
    height) lies in the result's body: its field of view does not hold that anatomy.
    """
    if query_axis is None or target_axis is None or not _reliable(query_axis) or not _reliable(target_axis):
        return None, None
    centre = np.asarray(centre_ras, float)
    level = query_axis.level_at(float(centre[2]), margin_mm=LEVEL_WINDOW_MIN_MM)
    if level is None:  # the query point lies outside its own body (in the air above the head): no level to carry
        return None, None
    asked = centre.copy()
    s = target_axis.s_at(level)
    if s is None:
        top, bottom = target_axis.level_range  # levels of the result's highest and lowest planes of body
        inset = LEVEL_INSET_MM * target_axis.slope
        nearest = float(np.clip(level, top + inset, bottom - inset)) if bottom - top > 2 * inset else (top + bottom) / 2
        if abs(nearest - level) > reach_mm * query_axis.slope:
            return False, None
        asked[2] -= (nearest - level) / query_axis.slope  # the level grows toward the feet, S toward the head
        level, s = nearest, target_axis.s_at(nearest, margin_mm=LEVEL_INSET_MM)
        if s is None:
            return False, None
    half = float(np.clip(LEVEL_WINDOW_MIN_MM + query_axis.uncertainty_mm + target_axis.uncertainty_mm,
                         LEVEL_WINDOW_MIN_MM, LEVEL_WINDOW_MAX_MM))
    return True, LevelWindow(float(s), half / target_axis.slope, float(query_axis.slope / target_axis.slope), _point(asked))


def start_window(query_axis, target_axis, centre_ras) -> LevelWindow | None:
    """A level to start from where the axes are too uncertain to bound the registration (no window: half-width
    infinite); None when either axis is missing or the centre's level lies outside the result's body."""
    if query_axis is None or target_axis is None:
        return None
    centre = np.asarray(centre_ras, float)
    level = query_axis.level_at(float(centre[2]), margin_mm=LEVEL_WINDOW_MAX_MM)
    s = None if level is None else target_axis.s_at(level)
    if s is None:
        return None
    return LevelWindow(float(s), float("inf"), float(query_axis.slope / target_axis.slope), _point(centre))


@dataclass(frozen=True)
class BodyPlanes:
    """A coarse image's body per axial plane, read once per image (a level start asks it for every result and box):
    the planes' RAS S (mm), how many body voxels each holds and the sum of their LPS (x, y) positions (mm)."""

    s_mm: np.ndarray
    counts: np.ndarray
    sums_mm: np.ndarray

    def centre(self, s_mm: float) -> np.ndarray | None:
        """LPS (x, y) of the body's centre in the planes within LEVEL_PLANES_MM / 2 of RAS S ``s_mm``, or None."""
        near = np.abs(self.s_mm - s_mm) <= max(LEVEL_PLANES_MM / 2, SPACING_MM / 2)
        total = self.counts[near].sum()
        return None if total == 0 else self.sums_mm[near].sum(axis=0) / total


def body_planes(image) -> BodyPlanes:
    """A coarse image's :class:`BodyPlanes` (on the identity-direction grid that covers it)."""
    array, origin = axis_aligned_array(image, SPACING_MM)
    counts, sums = body_centroids(array)
    return BodyPlanes(origin[2] + SPACING_MM * np.arange(array.shape[0]),  # LPS z is RAS S
                      counts, origin[:2] * counts[:, None] + sums * SPACING_MM)


def level_transform(query: BodyPlanes, target: BodyPlanes, window: LevelWindow):
    """The start a level window gives: the asked point's plane onto the window's plane, scaled by the bodies' ratio,
    the bodies' centres in those planes onto each other (an affine transform, LPS, query to result)."""
    import SimpleITK as sitk

    s_query = float(window.asked_ras[2])
    here, there = query.centre(s_query), target.centre(window.s_mm)
    if here is None or there is None:
        return None
    start = sitk.AffineTransform(3)
    start.SetCenter((float(here[0]), float(here[1]), s_query))
    start.SetMatrix(tuple((np.eye(3) * window.scale).ravel()))
    start.SetTranslation((float(there[0] - here[0]), float(there[1] - here[1]), window.s_mm - s_query))
    return start
