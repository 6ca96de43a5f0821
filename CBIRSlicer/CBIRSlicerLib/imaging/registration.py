"""Registering one volume into another on coarse isotropic copies, to carry a point across (SimpleITK, mutual information).

The stages: a whole-volume similarity then affine registration at 16 mm (the level evidence: the whole body, not a slab
that looks alike at many levels; a thin slab query has its level searched first, :func:`level_starts`), refined as an
affine transform on the query's 128 mm neighbourhood at 4 mm, then a demons deformation of its 64 mm neighbourhood;
:func:`place` carries the query's centre through them and says how well the box agrees with the result there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import body_region
from .coordinates import lps_to_ras, ras_to_lps
from .intensity import looks_like_ct
from .reach import reachable
from .volume import Volume

SPACING_MM = 4.0  # registration grid: organs of 2 cm still span 5 voxels
CONTEXT_MM = 128.0  # side of the query neighbourhood registered: the ROI and the anatomy around it
MIN_CONTEXT_VOXELS = 6
ITERATIONS = 60
CT_CLAMP_HU = (-1000.0, 1000.0)  # metal and air outliers would otherwise dominate the intensity histogram
MI_BINS = 32  # histogram bins of every mutual information here: the stages' Mattes metric and the level search's


@dataclass(frozen=True)
class Placement:
    """Where the query's centre lies in a result: RAS point, the last affine stage that ran ("global" or "local"), the
    local stage's last metric value (its optimiser's, sampled; lower is better; NaN if it did not run), seconds, and
    how well the query's box agrees with the result there (correlation after registration; NaN when no box was given)."""

    ras: tuple[float, float, float]
    start: str
    metric: float
    seconds: float
    agreement: float = float("nan")
    # The correlation of the query's DEFORM_MM neighbourhood with the registered result; the point kept to the level window?
    context_agreement: float = float("nan")
    within_window: bool | None = None


SMOOTH_MIN_VOXELS = 0.25  # a Gaussian narrower than this share of a voxel changes nothing sampled: that axis is left


def coarse_image(volume: Volume, spacing_mm: float = SPACING_MM):
    """The volume smoothed and resampled to an isotropic grid (SimpleITK image, LPS), intensities clamped for CT.

    Smoothed to the new voxel's width (FWHM) before resampling, in two steps: block means over whole voxels no wider
    than the new voxel (``BinShrink``: cheap, and itself a low-pass filter), then a recursive Gaussian for the width
    left, only along axes where it is a quarter voxel or more (narrower, it changed no voxel by 0.02 HU). A 512 x 512 x
    300 CT took 6.5 s with a Gaussian along every axis of every voxel (placing 10 such results: a minute of grids
    alone); docs/benchmarks.md, "Where placement's time goes"."""
    import SimpleITK as sitk

    image = volume.to_sitk(volume.finite_float32())  # float32 already: no cast (a copy of every voxel)
    if looks_like_ct(volume):
        image = sitk.Clamp(image, sitk.sitkFloat32, *CT_CLAMP_HU)
    old_spacing = np.array(image.GetSpacing())
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), old_spacing)]
    origin = image.TransformContinuousIndexToPhysicalPoint([(spacing_mm / s - 1) / 2 for s in old_spacing])
    factors = [max(1, int(spacing_mm / s)) for s in old_spacing]
    if max(factors) > 1:
        image = sitk.BinShrink(image, factors)
    # the Gaussian's variance: the new voxel's (FWHM spacing_mm) less the old voxel's and the block mean's
    variance = [max(0.0, ((spacing_mm ** 2 - s ** 2) / 2.355 ** 2) - (f ** 2 - 1) * s ** 2 / 12)
                for s, f in zip(old_spacing, factors)]
    for axis, (v, s) in enumerate(zip(variance, image.GetSpacing())):
        if v >= (SMOOTH_MIN_VOXELS * s) ** 2:
            image = sitk.RecursiveGaussian(image, float(v) ** 0.5, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, [spacing_mm] * 3, image.GetDirection(),
                         float(np.min(sitk.GetArrayViewFromImage(image))), sitk.sitkFloat32)


def neighbourhood(image, centre_ras, side_mm: float = CONTEXT_MM):
    """The part of a coarse image within a cube around a RAS point (clipped to the image), or None if too small."""
    import SimpleITK as sitk

    centre = ras_to_lps(np.asarray(centre_ras, float))
    half = side_mm / 2 / np.array(image.GetSpacing())
    index = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in centre)))
    low = np.maximum(np.floor(index - half), 0).astype(int)
    high = np.minimum(np.ceil(index + half), np.array(image.GetSize()) - 1).astype(int)
    if np.any(high - low + 1 < MIN_CONTEXT_VOXELS):
        return None
    return sitk.RegionOfInterest(image, [int(v) for v in high - low + 1], [int(v) for v in low])


# The whole-volume registration's grid: it gives the gross pose, which the local stages refine at 4 mm. At 16 mm it took
# a seventh of the CPU of 8 mm (0.09 s against 0.68 s a result) and placed tuning head-and-neck organs as well (better of
# the two starts 94.0 % inside against 93.3 %, 150 pairs; docs/benchmarks.md, "Where placement's time goes").
GLOBAL_SPACING_MM = 16.0
# Slab queries (SLAB_SHARE) and volumes under GLOBAL_MIN_VOXELS coarse voxels across are registered at 8 mm, as before:
# at 16 mm a 40 mm slab is 3 planes (abdominal slabs lost their level) and a 12 cm phantom 7 voxels (it lost its pose).
FINE_GLOBAL_SPACING_MM = 8.0
GLOBAL_MIN_VOXELS = 12


def _mi_registration(sampling: float, seed: int, learning_rate: float, min_step: float, iterations: int):
    """Every stage's registration method: Mattes MI (MI_BINS bins) on a random share of the voxels, linear interpolation,
    regular-step gradient descent with physical-shift scales; the stages differ in these arguments only.

    The fixed image's gradient is never used (only the moving image moves): not computed (7 % of the local stage, the
    same answers). The moving image's stays filtered: central differences at the samples instead saved 29 % of the local
    stage and placed tuning head-and-neck organs as well, but abdominal slabs worse (docs/benchmarks.md, "Where
    placement's time goes")."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(MI_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=min_step, numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    return method


# A query shorter along the body axis than this share of the result is a slab: its level in the result is searched
# (level_starts) instead of taken from the centres of mass, which put 6 cm slabs of an abdomen 2-17 cm off their level
# (docs/benchmarks.md, "thin-slab queries find their level").
SLAB_SHARE = 0.6


def body_axis_extent(image) -> float:
    """Millimetres an image spans along the body axis (LPS z, whatever the voxel axes)."""
    return float(np.ptp(body_region.corners_lps(image)[:, 2]))


def axis_aligned_array(image, spacing_mm: float):
    """An image resampled on an identity-direction LPS grid that covers it: (array [z, y, x], origin (x, y, z))."""
    import SimpleITK as sitk

    grid = body_region.axis_aligned(image, spacing_mm, float(np.min(sitk.GetArrayViewFromImage(image))))
    return sitk.GetArrayFromImage(grid), np.array(grid.GetOrigin())


def _bins(array: np.ndarray) -> np.ndarray:
    """Intensities to MI_BINS equal bins between the lowest value and the 99.9th percentile."""
    low, high = float(array.min()), float(np.percentile(array, 99.9))
    return np.clip(((array - low) / max(high - low, 1e-6) * MI_BINS).astype(np.int64), 0, MI_BINS - 1)


def _mutual_informations(fixed_bins: np.ndarray, moving_bins: np.ndarray) -> np.ndarray:
    """Mutual information of one array of bin numbers with each row of another (candidates x samples)."""
    count = len(moving_bins)
    keys = (np.arange(count)[:, None] * MI_BINS * MI_BINS + fixed_bins[None, :] * MI_BINS + moving_bins).ravel()
    joint = np.bincount(keys, minlength=count * MI_BINS * MI_BINS).astype(float).reshape(count, MI_BINS, MI_BINS)
    joint /= joint.sum(axis=(1, 2), keepdims=True)
    outer = joint.sum(axis=2, keepdims=True) * joint.sum(axis=1, keepdims=True)
    ratio = np.where(joint > 0, joint, 1.0) / np.where(joint > 0, outer, 1.0)
    return np.sum(joint * np.log(ratio), axis=(1, 2))  # 0 log 0 = 0


def body_centroids(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per plane of an axis-aligned array: how many body voxels, and their mean (x, y) voxel position."""
    body = array > body_region.body_threshold(array, ct=bool(array.min() < -500))  # coarse CT is clamped at -1000 HU
    counts = body.sum(axis=(1, 2)).astype(float)
    ys, xs = np.mgrid[0:array.shape[1], 0:array.shape[2]]
    sums = np.stack([(body * xs).sum(axis=(1, 2)), (body * ys).sum(axis=(1, 2))], axis=1).astype(float)
    return counts, sums


LEVEL_STARTS = 3  # the slab's best levels each start a similarity registration; the one that ends best is kept
LEVELS_APART_MM = 24.0
LEVEL_ANGLES_DEG = (-10.0, 0.0, 10.0)  # turns about the body axis tried at each level (patients lie turned by some degrees)
LEVEL_SCALES = (0.8, 1.25)  # the bounds of the size ratio read from the body's cross-section
LEVEL_CHUNK = 400_000  # candidate samples scored at once (memory: ~30 bytes each)
LEVEL_SAMPLES = 16_000  # the slab's voxels scored at each candidate level, at most (every other one across the plane, or fewer)
LEVEL_OVERHANG = 0.5  # share of the slab that may lie beyond the result's first or last plane (a shorter result)


@dataclass(frozen=True)
class LevelStart:
    """A start for registering a slab: the slab's body centre (LPS) goes to ``target_lps``, scaled and turned about the
    body axis; ``score`` is the mutual information there."""

    score: float
    scale: float
    angle_deg: float
    query_lps: np.ndarray
    target_lps: np.ndarray


def level_starts(query_image, target_image, spacing_mm: float = FINE_GLOBAL_SPACING_MM) -> list[LevelStart]:
    """Where a slab query may lie along a result's body axis, best first: at most :data:`LEVEL_STARTS`, their levels
    :data:`LEVELS_APART_MM` apart.

    Every level of the result (8 mm steps, the slab overhanging its ends by up to :data:`LEVEL_OVERHANG`) is tried: the
    slab's body centre goes to the centre of the result's body at that level, at two sizes (the same, and the ratio of
    the two bodies' cross-sections there: patients differ in size by 10-20 %, and a slab drawn at the wrong size matches
    the wrong level), turned by each of :data:`LEVEL_ANGLES_DEG`; each is scored by the mutual information of the slab
    with the result sampled there (nearest voxel, the result's lowest value outside it, so hanging off costs).
    A few hundredths of a second: the arrays are on an 8 mm grid, and the candidates are gathered and histogrammed a
    chunk at a time (one at a time, the Python around each took 0.15-0.35 s a result).
    """
    fixed, fixed_origin = axis_aligned_array(query_image, spacing_mm)
    moving, moving_origin = axis_aligned_array(target_image, spacing_mm)
    fixed_counts, fixed_sums = body_centroids(fixed)
    moving_counts, moving_sums = body_centroids(moving)
    fixed_bins, moving_bins = _bins(fixed), _bins(moving)
    depth, rows, columns = fixed.shape
    planes = moving.shape[0]
    lowest = int(moving_bins.min())
    # The slab's voxels relative to its body centre (x, y: the body's centroid; z: the slab's middle), in voxels.
    centre = np.array([*(fixed_sums.sum(axis=0) / max(fixed_counts.sum(), 1.0)), (depth - 1) / 2])
    area = fixed_counts[fixed_counts > 0].mean() if (fixed_counts > 0).any() else 1.0
    # Every other voxel across the plane: a quarter of the work, and thousands of samples still fill the histogram. A long
    # query (a 19 cm neck series taken as a slab of 32 cm ones) takes every n-th, at most LEVEL_SAMPLES: its level search
    # took 0.7 s a result with 33,000 samples (slabs up to 80 mm of the widest head-and-neck series hold under 16,000).
    step = max(2, int(np.ceil(np.sqrt(depth * rows * columns / LEVEL_SAMPLES))))
    z, y, x = np.mgrid[0:depth, 0:rows:step, 0:columns:step]
    offsets = np.stack([x - centre[0], y - centre[1], z - centre[2]], axis=-1).reshape(-1, 3).astype(float)
    slab_bins = fixed_bins[:, ::step, ::step].ravel()
    overhang = int(np.floor(LEVEL_OVERHANG * depth))
    half = (depth - 1) / 2
    bounds = np.array([moving.shape[2], moving.shape[1], planes])  # x, y, z
    # Every candidate (level, size, turn), in this order; scored together below, a chunk of them a numpy call.
    candidates = []
    for middle in np.arange(half - overhang, planes - 1 - half + overhang + 1e-6):
        low, high = int(max(0, np.floor(middle - half))), int(min(planes, np.ceil(middle + half) + 1))
        counts = moving_counts[low:high]
        if high - low < 2 or counts.sum() == 0:
            continue
        there = np.array([*(moving_sums[low:high].sum(axis=0) / counts.sum()), middle])
        ratio = float(np.clip(np.sqrt(counts[counts > 0].mean() / area), *LEVEL_SCALES))
        candidates += [(there, scale, angle) for scale in dict.fromkeys((ratio, 1.0)) for angle in LEVEL_ANGLES_DEG]
    scores = np.empty(len(candidates))
    chunk = max(1, LEVEL_CHUNK // max(len(offsets), 1))
    flat_bins = moving_bins.ravel()
    for first in range(0, len(candidates), chunk):
        batch = candidates[first:first + chunk]
        there = np.array([c[0] for c in batch])
        scale = np.array([c[1] for c in batch])[:, None]
        turn = np.deg2rad([c[2] for c in batch])
        cos, sin = np.cos(turn)[:, None], np.sin(turn)[:, None]
        # (scale * offsets) turned about the body axis, then moved to the level: a rotation about z leaves z alone
        sx, sy = scale * offsets[:, 0], scale * offsets[:, 1]
        x = np.rint(there[:, :1] + (cos * sx - sin * sy)).astype(np.int64)
        y = np.rint(there[:, 1:2] + (sin * sx + cos * sy)).astype(np.int64)
        z = np.rint(there[:, 2:] + scale * offsets[:, 2]).astype(np.int64)
        inside = (x >= 0) & (x < bounds[0]) & (y >= 0) & (y < bounds[1]) & (z >= 0) & (z < bounds[2])
        sampled = np.full(inside.shape, lowest, dtype=np.int64)
        sampled[inside] = flat_bins[((z * bounds[1] + y) * bounds[0] + x)[inside]]
        scores[first:first + len(batch)] = _mutual_informations(slab_bins, sampled)
    scored = [LevelStart(float(score), scale, angle, fixed_origin + centre * spacing_mm, moving_origin + there * spacing_mm)
              for score, (there, scale, angle) in zip(scores, candidates)]
    chosen: list[LevelStart] = []
    for start in sorted(scored, key=lambda candidate: -candidate.score):
        if all(abs(start.target_lps[2] - other.target_lps[2]) >= LEVELS_APART_MM for other in chosen):
            chosen.append(start)
        if len(chosen) == LEVEL_STARTS:
            break
    return chosen


def _similarity_start(level: LevelStart):
    """The similarity transform a level start describes (centred on the slab's body centre)."""
    import SimpleITK as sitk

    start = sitk.Similarity3DTransform()
    start.SetCenter(tuple(float(v) for v in level.query_lps))
    start.SetRotation((0.0, 0.0, 1.0), float(np.deg2rad(level.angle_deg)))
    start.SetScale(float(level.scale))
    start.SetTranslation(tuple(float(v) for v in level.target_lps - level.query_lps))
    return start


def global_transform(query_image: Any, target_image: Any) -> Any:
    """A whole-volume registration of the query into the target at a coarser grid (:data:`GLOBAL_SPACING_MM`, finer for
    slabs and small volumes): similarity, then affine from there (bodies differ in proportions, not only in size: a
    scale per axis and shear).

    The similarity starts from the images' centres of mass, or for a slab query (:data:`SLAB_SHARE`) from each of its
    likely levels in the result (:func:`level_starts`), keeping the registration that ends best.
    """
    import SimpleITK as sitk

    slab = body_axis_extent(query_image) < SLAB_SHARE * body_axis_extent(target_image)
    narrowest = min(n * s for image in (query_image, target_image) for n, s in zip(image.GetSize(), image.GetSpacing()))
    spacing = FINE_GLOBAL_SPACING_MM if slab or narrowest < GLOBAL_MIN_VOXELS * GLOBAL_SPACING_MM else GLOBAL_SPACING_MM
    fixed = sitk.Shrink(query_image, [max(1, int(spacing / s)) for s in query_image.GetSpacing()])
    moving = sitk.Shrink(target_image, [max(1, int(spacing / s)) for s in target_image.GetSpacing()])
    moments = sitk.Similarity3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    starts = [moments]
    if slab:
        starts = [_similarity_start(level) for level in level_starts(query_image, target_image)] or [moments]
    best = None
    for start in starts:
        method = _mi_registration(0.3, 1, spacing, 0.5, ITERATIONS)
        method.SetInitialTransform(start, inPlace=False)
        try:
            similarity = sitk.Similarity3DTransform(_single(method.Execute(fixed, moving)))
            # The starts' ends compared by the optimiser's last metric value: the same sampled voxels for every start
            # (one seed). The metric on every voxel again was 12 % of a slab query's placement; tuning slab queries
            # placed as well without it (164 against 165 of 189 pairs, 7 moved by over 2 mm, both ways).
            metric = float(method.GetMetricValue())
        except RuntimeError:  # ITK: this start left too little overlap; another may not
            continue
        if best is None or metric < best[0]:
            best = (metric, similarity)
    if best is None:
        raise RuntimeError("no start of the whole-volume registration kept the images overlapping")
    similarity = best[1]
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    method = _mi_registration(0.3, 1, spacing, 0.5, ITERATIONS)
    method.SetInitialTransform(affine, inPlace=False)
    return _single(method.Execute(fixed, moving))


def _single(transform):
    """The one transform a registration returns (SimpleITK wraps it in a composite)."""
    import SimpleITK as sitk

    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        return transform.GetNthTransform(0)
    return transform


def carry(transform, centre_ras) -> np.ndarray:
    """A RAS point through an ITK transform (which works in LPS)."""
    centre_lps = ras_to_lps(np.asarray(centre_ras, float))
    return lps_to_ras(np.array(transform.TransformPoint(tuple(float(v) for v in centre_lps))))


def local_affine(fixed, moving, initial, iterations: int = ITERATIONS, seed: int = 1):
    """The whole-volume affine transform refined on the query's neighbourhood (fixed) into the part of the result it can
    reach (moving, :func:`reach.reachable`); (transform, the optimiser's last metric value: nothing decides by it, and
    the metric on every voxel took a third of placement's time, docs/benchmarks.md "Where placement's time goes")."""
    import SimpleITK as sitk

    method = _mi_registration(0.3, seed, SPACING_MM, 0.1, iterations)
    method.SetInitialTransform(sitk.AffineTransform(_single(initial)), inPlace=False)
    transform = _single(method.Execute(fixed, reachable(fixed, moving, _single(initial))))
    return transform, float(method.GetMetricValue())


@dataclass(frozen=True)
class LevelWindow:
    """Where the point asked lies in a result (RAS S, mm), how far a registration may place from it, the size ratio of
    the bodies along the body axis (result mm per query mm), and the point asked (RAS): the query's centre, or, when the
    centre's level lies beyond the result's body but the query box reaches into it, the point of the box's axis nearest
    the result's body (the part of the box the result holds)."""

    s_mm: float
    half_mm: float
    scale: float
    asked_ras: tuple[float, float, float]

    def holds(self, ras) -> bool:
        """Whether a RAS point lies within the window."""
        return bool(abs(float(np.asarray(ras, float)[2]) - self.s_mm) <= self.half_mm)


DEFORM_MM = 64.0  # the last, deformable stage: demons on this neighbourhood, measured against 48 and 96 mm (docs/benchmarks.md)
DEFORM_ITERATIONS = 50
DEFORM_SIGMA_VOXELS = 1.5  # Gaussian regularisation of the displacement field, in 4 mm voxels


def deformation(fixed, moving, transform):
    """A demons displacement field (query neighbourhood -> affinely resampled result) for what the affine transform
    cannot follow: organs that moved against their neighbours, a different body shape.

    The result is resampled onto the neighbourhood through the affine transform and its histogram matched to the query's
    (demons compares intensities: an MR's gain or a CT's reconstruction shift would otherwise pull).
    """
    import SimpleITK as sitk

    lowest = float(np.min(sitk.GetArrayViewFromImage(moving)))
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, lowest, sitk.sitkFloat32)
    resampled = sitk.HistogramMatching(resampled, fixed, 64, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(DEFORM_ITERATIONS)
    demons.SetStandardDeviations(DEFORM_SIGMA_VOXELS)
    return sitk.DisplacementFieldTransform(sitk.Cast(demons.Execute(fixed, resampled), sitk.sitkVectorFloat64))


def agreement(query_image, target_image, transform, centre_ras, box_mm: float) -> float:
    """Correlation of the query's box (a cube of its largest side, at least MIN_CONTEXT_VOXELS) with the result
    resampled there through the full transform; NaN if the box is off the query's grid or flat."""
    import SimpleITK as sitk

    box = neighbourhood(query_image, centre_ras, max(box_mm, MIN_CONTEXT_VOXELS * SPACING_MM))
    if box is None:
        return float("nan")
    lowest = float(np.min(sitk.GetArrayViewFromImage(target_image)))
    # Copies, not views: a view of the temporary resampled image would outlive its buffer.
    there = sitk.GetArrayFromImage(sitk.Resample(target_image, box, transform, sitk.sitkLinear, lowest,
                                                 sitk.sitkFloat32)).ravel().astype(np.float64)
    here = sitk.GetArrayFromImage(box).ravel().astype(np.float64)
    if here.std() < 1e-6 or there.std() < 1e-6:
        return float("nan")
    return float(np.corrcoef(here, there)[0, 1])


def place(query: Volume, centre_ras, target: Volume | None, initial=None, query_image=None, target_image=None,
          box_mm: float | None = None, window: LevelWindow | None = None) -> Placement:
    """The query centre carried into the target: the whole-volume affine transform (``initial``, else computed here),
    refined as an affine transform on the query's 128 mm neighbourhood, then a demons deformation of its 64 mm one;
    with ``box_mm`` (the query box's largest side), how well the box agrees with the result there.

    With a level ``window``, a stage whose answer leaves the window is not kept (the stage before it stands): the
    registration refines only within the level the body coordinate allows."""
    import SimpleITK as sitk

    began = time.monotonic()
    query_image = query_image if query_image is not None else coarse_image(query)
    target_image = target_image if target_image is not None else coarse_image(target)
    transform = initial if initial is not None else global_transform(query_image, target_image)

    def kept(candidate) -> bool:
        return window is None or window.holds(carry(candidate, centre_ras))

    start, metric = "global", float("nan")
    fixed = neighbourhood(query_image, centre_ras)
    if fixed is not None:
        try:
            refined, refined_metric = local_affine(fixed, target_image, transform)
            if kept(refined):
                transform, metric, start = refined, refined_metric, "local"
        except RuntimeError:  # ITK: the neighbourhood and the result do not overlap enough: keep the whole-volume answer
            pass
    full = transform
    local = neighbourhood(query_image, centre_ras, DEFORM_MM) if DEFORM_MM else None
    if local is not None:
        try:
            deformed = sitk.CompositeTransform(3)
            deformed.AddTransform(transform)
            deformed.AddTransform(deformation(local, target_image, transform))  # the field acts first, then the affine
            if kept(deformed):
                full = deformed
        except RuntimeError:  # ITK: nothing of the result inside the neighbourhood: keep the affine answer
            pass
    placed = carry(full, centre_ras)
    agreed = agreement(query_image, target_image, full, centre_ras, box_mm) if box_mm else float("nan")
    context = agreement(query_image, target_image, full, centre_ras, DEFORM_MM)
    return Placement(tuple(float(v) for v in placed), start, metric, time.monotonic() - began, agreed, context,
                     None if window is None else window.holds(placed))
