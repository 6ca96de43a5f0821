"""Synthetic CT-like volumes with objects at known RAS positions, on any voxel grid.

The phantom is a continuous function of RAS position, so the same anatomy can be sampled
on a canonical grid, a flipped or permuted one, or an oblique one; tests compare what the
slicer makes of each, and the demo builds its cohort from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume

AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
EDGE_MM = 0.7  # width of the smooth edge of every object, so resampling is well behaved


@dataclass(frozen=True)
class Blob:
    """A spherical object: solid ('ball') or hollow ('shell', wall of ``wall_mm``), value in HU."""

    center: tuple[float, float, float]
    radius: float
    value: float
    kind: str = "ball"
    wall_mm: float = 2.0


def _smooth_inside(distance: np.ndarray, radius: float) -> np.ndarray:
    """1 inside a radius, 0 outside, with a logistic edge of EDGE_MM."""
    return 1.0 / (1.0 + np.exp(np.clip((distance - radius) / EDGE_MM * 4.0, -60, 60)))


def phantom_values(ras: np.ndarray, blobs: list[Blob], body_radii: tuple[float, float, float] | None,
                   body_center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Phantom intensity (HU) at RAS points (..., 3): air, an ellipsoidal soft-tissue body, then the blobs."""
    ras = np.asarray(ras, dtype=np.float64)
    values = np.full(ras.shape[:-1], AIR_HU)
    if body_radii is not None:
        scaled = (ras - np.asarray(body_center)) / np.asarray(body_radii)
        # Distance-like measure in mm along the smallest radius keeps the edge width sensible.
        distance = (np.linalg.norm(scaled, axis=-1) - 1.0) * min(body_radii)
        values += (SOFT_TISSUE_HU - AIR_HU) * _smooth_inside(distance, 0.0)
    for blob in blobs:
        distance = np.linalg.norm(ras - np.asarray(blob.center), axis=-1)
        inside = _smooth_inside(distance, blob.radius)
        if blob.kind == "shell":
            inside = inside - _smooth_inside(distance, blob.radius - blob.wall_mm)
        values = values + (blob.value - values) * inside
    return values


def grid_matrix(spacing=(1.0, 1.0, 1.0), directions=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 IJK-to-RAS matrix from spacing, RAS unit axis directions (columns) and RAS origin."""
    directions = np.eye(3) if directions is None else np.asarray(directions, float)
    matrix = np.eye(4)
    matrix[:3, :3] = directions @ np.diag(np.asarray(spacing, float))
    matrix[:3, 3] = origin
    return matrix


def centered_matrix(shape_ijk, spacing=(1.0, 1.0, 1.0), directions=None, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """IJK-to-RAS matrix whose grid is centred on a RAS point."""
    matrix = grid_matrix(spacing, directions)
    middle = (np.asarray(shape_ijk, float) - 1) / 2
    matrix[:3, 3] = np.asarray(center, float) - matrix[:3, :3] @ middle
    return matrix


def rotation(degrees_about_r: float = 0.0, degrees_about_a: float = 0.0, degrees_about_s: float = 0.0) -> np.ndarray:
    """Rotation matrix (RAS), applied about R, then A, then S."""
    def about(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        a, b = [n for n in range(3) if n != axis]
        m = np.eye(3)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        return m
    return about(2, degrees_about_s) @ about(1, degrees_about_a) @ about(0, degrees_about_r)


def default_blobs() -> list[Blob]:
    """Three distinct objects placed asymmetrically, so any flip or swap of axes shows."""
    return [
        Blob((12.0, -8.0, 6.0), 6.0, 300.0, "ball"),
        Blob((-14.0, 10.0, -5.0), 5.0, -400.0, "ball"),
        Blob((4.0, 14.0, 12.0), 7.0, 150.0, "shell"),
    ]


def render(ijk_to_ras: np.ndarray, shape_ijk, blobs: list[Blob] | None = None,
           body_radii: tuple[float, float, float] | None = (40.0, 30.0, 60.0), name: str = "phantom",
           modality: str | None = None, dtype=np.int16) -> Volume:
    """Sample the phantom at the voxel centres of a grid, as a Volume (int16 HU by default, like CT)."""
    blobs = default_blobs() if blobs is None else blobs
    i, j, k = shape_ijk
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1).astype(np.float64)
    ras = ijk @ np.asarray(ijk_to_ras)[:3, :3].T + np.asarray(ijk_to_ras)[:3, 3]
    values = phantom_values(ras, blobs, body_radii)
    array = np.round(values).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else values.astype(dtype)
    return Volume.from_array(array, ijk_to_ras, name=name, modality=modality)


def write_volume(volume: Volume, path: str, compress: bool = True) -> str:
    """Write a volume in the format its suffix names (.nii.gz, .nrrd, .mha, ...), geometry included."""
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), compress)
    return str(path)


# --- A cohort of CT-like cases with lesions of known kinds at known RAS places -------------------------------------
#
# Each case is an abdomen-like cross-section (air, subcutaneous fat, soft tissue, a liver-like organ on the patient's
# right, a vertebra posteriorly) holding one or more lesions; all of it is an analytic function of RAS position, so a
# case renders on any grid, and only the pixel noise belongs to the grid. Cohorts feed retrieval tests and the demo:
# a region-of-interest query around one lesion should find cases holding a lesion of the same kind.

FAT_HU = -100.0
COHORT_CSV = "cohort.csv"
COHORT_COLUMNS = ("path", "case", "kind", "center_r", "center_a", "center_s", "radius_mm")
DEFAULT_CASE_SHAPE = (96, 96, 48)
DEFAULT_CASE_SPACING = (2.0, 2.0, 4.0)


@dataclass(frozen=True)
class LesionKind:
    """How one kind of lesion looks: ranges (low, high) that each lesion's appearance is drawn from."""

    radius_mm: tuple[float, float]
    value_hu: tuple[float, float]  # solid kinds: the lesion; rim: the wall; calcified: the halo; textured: the mean
    core_hu: tuple[float, float] = (0.0, 0.0)  # rim: the necrotic centre; calcified: the core
    core_mm: tuple[float, float] = (0.0, 0.0)  # rim: the wall thickness; calcified: the core radius
    texture_hu: tuple[float, float] = (0.0, 0.0)  # textured: amplitude of the speckle
    description: str = ""


# Values are absolute HU, so a lesion looks the same in soft tissue (~40 HU) and in the organ (~60 HU). Kinds differ
# in value (dark, bright, very bright) or in shape (disc, ring, dot in a halo, speckle) by more than the per-lesion
# jitter, and every one of them stands out of tissue in the soft-tissue window (W400/L40).
LESION_SPECS: dict[str, LesionKind] = {
    "enhancing": LesionKind((7.0, 11.0), (220.0, 260.0), description="solid, brightly enhancing (+180..220 HU over tissue)"),
    "cyst": LesionKind((7.0, 12.0), (-5.0, 10.0), description="solid, fluid-dark (about 0 HU)"),
    "rim": LesionKind((8.0, 12.0), (200.0, 240.0), core_hu=(5.0, 20.0), core_mm=(3.0, 4.0),
                      description="ring-enhancing wall around a dark necrotic centre"),
    "calcified": LesionKind((6.0, 9.0), (85.0, 105.0), core_hu=(800.0, 1000.0), core_mm=(3.0, 4.5),
                            description="small very bright core in a faint halo"),
    "textured": LesionKind((8.0, 12.0), (120.0, 150.0), texture_hu=(90.0, 120.0),
                           description="heterogeneous, speckled"),
}
# The default kinds are the ones the weight-free descriptor tells apart reliably (a sanity baseline); "textured" is
# there for harder benchmarks: its random speckle changes the layout of every crop, so the handcrafted descriptor
# finds another textured lesion as nearest neighbour for about half of them (a quarter with a wide box).
LESION_KINDS: tuple[str, ...] = ("enhancing", "cyst", "rim", "calcified")
ALL_LESION_KINDS: tuple[str, ...] = tuple(LESION_SPECS)
TEXTURE_WAVES = 8
TEXTURE_WAVELENGTH_MM = (6.0, 9.0)  # above twice the default in-plane spacing, so the speckle is resolved


@dataclass(frozen=True)
class Lesion:
    """A lesion of a kind at a RAS centre (mm); appearance left as None takes the middle of its kind's ranges."""

    kind: str
    center: tuple[float, float, float]
    radius_mm: float
    value_hu: float | None = None
    core_hu: float | None = None
    core_mm: float | None = None
    texture_hu: float | None = None
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LESION_SPECS:
            raise ValueError(f"unknown lesion kind '{self.kind}'; expected one of {', '.join(ALL_LESION_KINDS)}")
        object.__setattr__(self, "center", tuple(float(v) for v in self.center))
        object.__setattr__(self, "radius_mm", float(self.radius_mm))

    def look(self, name: str) -> float:
        """One appearance parameter (value_hu, core_hu, core_mm, texture_hu): the lesion's own, else its kind's mid-range."""
        own = getattr(self, name)
        return float(own) if own is not None else float(np.mean(getattr(LESION_SPECS[self.kind], name)))


@dataclass(frozen=True)
class Anatomy:
    """The lesion-free background of a case: an elliptic body along S, fat, an organ and a vertebra (RAS mm, HU)."""

    body_center: tuple[float, float] = (0.0, 0.0)  # (R, A); the body is a cylinder along S
    body_radii: tuple[float, float] = (78.0, 56.0)
    fat_mm: float = 10.0
    tissue_hu: float = SOFT_TISSUE_HU
    organ_center: tuple[float, float, float] = (30.0, 4.0, 0.0)
    organ_radii: tuple[float, float, float] = (32.0, 34.0, 80.0)
    organ_hu: float = 60.0
    vertebra_center: tuple[float, float] = (0.0, -28.0)
    vertebra_radii: tuple[float, float] = (15.0, 12.0)
    vertebra_hu: float = 550.0
    noise_hu: float = 10.0

    def body_depth(self, ras: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
        """A lower bound on how far (mm) RAS points lie inside the body's outline shrunk by ``inset_mm`` (negative: outside)."""
        radii = np.asarray(self.body_radii) - inset_mm
        scaled = (np.asarray(ras, float)[..., :2] - np.asarray(self.body_center)) / radii
        return (1.0 - np.linalg.norm(scaled, axis=-1)) * min(radii)


@dataclass(eq=False)
class Case:
    """One synthetic case: its volume and the lesions it holds (with the anatomy they sit in)."""

    name: str
    volume: Volume
    lesions: list[Lesion]
    anatomy: Anatomy | None = None
    seed: int | None = None


def _ellipse_depth(points: np.ndarray, center, radii) -> np.ndarray:
    """Distance-like depth (mm along the smallest radius) inside an axis-aligned ellipse or ellipsoid."""
    scaled = (points - np.asarray(center, points.dtype)) / np.asarray(radii, points.dtype)
    return (1.0 - np.sqrt(np.einsum("...i,...i->...", scaled, scaled))) * min(radii)


def _blend(values: np.ndarray, inside: np.ndarray, target) -> np.ndarray:
    """Values replaced by a target where ``inside`` is 1, blended across the smooth edge."""
    return values + (target - values) * inside


def anatomy_values(ras: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Background intensity (HU, float32) of a case at RAS points (..., 3), noise-free."""
    ras = np.asarray(ras, np.float32)
    values = np.full(ras.shape[:-1], AIR_HU, np.float32)
    body = _ellipse_depth(ras[..., :2], anatomy.body_center, anatomy.body_radii)
    values = _blend(values, _smooth_inside(-body, 0.0), FAT_HU)
    inner = _ellipse_depth(ras[..., :2], anatomy.body_center, np.subtract(anatomy.body_radii, anatomy.fat_mm))
    tissue = _smooth_inside(-inner, 0.0)
    values = _blend(values, tissue, anatomy.tissue_hu)
    # The organ is clipped to the inner body, so it never shows through the fat.
    organ = _smooth_inside(-_ellipse_depth(ras, anatomy.organ_center, anatomy.organ_radii), 0.0) * tissue
    values = _blend(values, organ, anatomy.organ_hu)
    vertebra = _smooth_inside(-_ellipse_depth(ras[..., :2], anatomy.vertebra_center, anatomy.vertebra_radii), 0.0)
    return _blend(values, vertebra, anatomy.vertebra_hu).astype(np.float32)


def _texture(offsets: np.ndarray, lesion: Lesion) -> np.ndarray:
    """Speckle in [-1, 1] at RAS offsets from a lesion centre: a sum of plane waves fixed by the lesion's texture seed."""
    rng = np.random.default_rng(lesion.texture_seed)
    directions = rng.normal(size=(TEXTURE_WAVES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavenumbers = 2 * np.pi / rng.uniform(*TEXTURE_WAVELENGTH_MM, TEXTURE_WAVES)
    phases = rng.uniform(0, 2 * np.pi, TEXTURE_WAVES)
    waves = np.cos(offsets @ (directions * wavenumbers[:, None]).T.astype(offsets.dtype) + phases.astype(offsets.dtype))
    # The sum of N unit cosines has a standard deviation of sqrt(N / 2); scale to about unit amplitude.
    return np.clip(waves.sum(axis=-1) / np.sqrt(TEXTURE_WAVES / 2), -1.5, 1.5) / 1.5


def _paint_lesion(values: np.ndarray, offsets: np.ndarray, lesion: Lesion) -> np.ndarray:
    """Values (1-D) with one lesion painted at points given as RAS offsets (n, 3) from its centre."""
    distance = np.sqrt(np.einsum("ni,ni->n", offsets, offsets))
    radius = lesion.radius_mm
    inside = _smooth_inside(distance, radius)
    kind = lesion.kind
    if kind == "textured":
        target = lesion.look("value_hu") + lesion.look("texture_hu") * _texture(offsets, lesion)
        return _blend(values, inside, target)
    values = _blend(values, inside, lesion.look("value_hu"))
    if kind == "rim":
        return _blend(values, _smooth_inside(distance, radius - lesion.look("core_mm")), lesion.look("core_hu"))
    if kind == "calcified":
        return _blend(values, _smooth_inside(distance, lesion.look("core_mm")), lesion.look("core_hu"))
    return values


def lesion_values(ras: np.ndarray, background: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    """A background (HU at RAS points (..., 3)) with lesions painted in; only points near each lesion are evaluated."""
    ras = np.asarray(ras, np.float32)
    values = np.array(background, np.float32).reshape(-1)
    flat = ras.reshape(-1, 3)
    for lesion in lesions:
        offsets = flat - np.asarray(lesion.center, np.float32)
        # Ten edge widths beyond the radius the logistic edge weighs below 1e-17: those points keep the background.
        near = np.flatnonzero(np.einsum("ni,ni->n", offsets, offsets) <= (lesion.radius_mm + 10 * EDGE_MM) ** 2)
        values[near] = _paint_lesion(values[near], offsets[near], lesion)
    return values.reshape(ras.shape[:-1])


def case_values(ras: np.ndarray, anatomy: Anatomy, lesions: list[Lesion]) -> np.ndarray:
    """Noise-free intensity (HU, float32) of a case at RAS points (..., 3): its anatomy with its lesions."""
    return lesion_values(ras, anatomy_values(ras, anatomy), lesions)


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """A plausible, randomly varied background: body size and offset, fat, organ and vertebra."""
    u = rng.uniform
    # Sizes are an abdomen scaled to fit the default 19 cm field of view, with room left for several lesions.
    body_radii = (u(72.0, 86.0), u(54.0, 66.0))
    body_center = (u(-4.0, 4.0), u(-4.0, 4.0))
    fat_mm = u(5.0, 12.0)
    inner_r, inner_a = body_radii[0] - fat_mm, body_radii[1] - fat_mm
    organ_center = (body_center[0] + u(0.34, 0.42) * inner_r, body_center[1] + u(0.0, 0.15) * inner_a, u(-25.0, 25.0))
    organ_radii = (u(0.42, 0.52) * inner_r, u(0.62, 0.75) * inner_a, u(70.0, 95.0))
    vertebra_radii = (u(10.0, 13.0), u(8.0, 11.0))
    vertebra_center = (body_center[0] + u(-3.0, 3.0), body_center[1] - inner_a + vertebra_radii[1] + u(4.0, 8.0))
    return Anatomy(body_center, body_radii, fat_mm, SOFT_TISSUE_HU + u(-5.0, 5.0), organ_center, organ_radii,
                   u(55.0, 65.0), vertebra_center, vertebra_radii, u(450.0, 700.0), u(8.0, 12.0))


def _random_look(kind: str, center, rng: np.random.Generator) -> Lesion:
    """A lesion of a kind at a centre, its radius and appearance drawn from the kind's ranges."""
    spec = LESION_SPECS[kind]
    names = ("radius_mm", "value_hu", "core_hu", "core_mm", "texture_hu")
    # Every range is drawn from, used or not, so the random stream (and so the layout) does not depend on the kind.
    pick = {name: float(rng.uniform(*getattr(spec, name))) for name in names}
    pick = {name: value if getattr(spec, name) != (0.0, 0.0) else None for name, value in pick.items()}
    return Lesion(kind, tuple(center), pick["radius_mm"], pick["value_hu"], pick["core_hu"], pick["core_mm"],
                  pick["texture_hu"], int(rng.integers(2**31)))


def place_lesions(kinds, anatomy: Anatomy, ijk_to_ras: np.ndarray, shape_ijk, rng: np.random.Generator,
                  gap_mm: float = 10.0, margin_mm: float = 6.0, vertebra_gap_mm: float = 8.0,
                  tries: int = 40) -> list[Lesion]:
    """Lesions of the given kinds inside the body's soft tissue, clear of the vertebra and of each other, centred on voxels.

    Centres snap to voxel centres, so the voxel at a lesion's centre and the middle slice through it are exact;
    constraints are checked after snapping. Surfaces stay ``gap_mm`` apart, ``margin_mm`` inside the fat line and
    ``vertebra_gap_mm`` from the vertebra, and the whole lesion (plus the margin) stays inside the grid. Raises
    ValueError when the kinds do not fit.
    """
    matrix = np.asarray(ijk_to_ras, float)
    inverse = np.linalg.inv(matrix)
    upper = np.asarray(shape_ijk, float) - 1
    corners = np.array([[a, b, c, 1.0] for a in (0, upper[0]) for b in (0, upper[1]) for c in (0, upper[2])]) @ matrix.T
    low, high = corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)
    # Candidates are drawn in the body's inner box (R, A) and the grid's extent (S), where most of them can fit.
    inner = np.asarray(anatomy.body_radii) - anatomy.fat_mm
    low[:2] = np.maximum(low[:2], np.asarray(anatomy.body_center) - inner)
    high[:2] = np.minimum(high[:2], np.asarray(anatomy.body_center) + inner)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    lesions: list[Lesion] = []
    for kind in kinds:
        lesion = None
        for _ in range(tries):
            candidate = _random_look(kind, (0.0, 0.0, 0.0), rng)
            radius = candidate.radius_mm
            count = 256
            points = rng.uniform(low, high, size=(count, 3))
            ijk = np.round(np.c_[points, np.ones(count)] @ inverse[:3].T)
            ijk_ok = np.all((ijk >= 0) & (ijk <= upper), axis=1)
            points = np.c_[ijk, np.ones(count)] @ matrix[:3].T
            # The lesion plus a margin must lie inside the grid along every voxel axis, not just the RAS box.
            reach = (radius + margin_mm) / spacing
            inside_grid = ijk_ok & np.all((ijk >= reach) & (ijk <= upper - reach), axis=1)
            in_body = anatomy.body_depth(points, anatomy.fat_mm) >= radius + margin_mm
            vertebra = np.linalg.norm((points[:, :2] - np.asarray(anatomy.vertebra_center)), axis=1)
            clear_of_bone = vertebra >= max(anatomy.vertebra_radii) + radius + vertebra_gap_mm
            clear = np.ones(count, bool)
            for other in lesions:
                distance = np.linalg.norm(points - np.asarray(other.center), axis=1)
                clear &= distance >= other.radius_mm + radius + gap_mm
            good = np.flatnonzero(inside_grid & in_body & clear_of_bone & clear)
            if good.size:
                lesion = Lesion(kind, tuple(points[good[0]]), radius, candidate.value_hu, candidate.core_hu,
                                candidate.core_mm, candidate.texture_hu, candidate.texture_seed)
                break
        if lesion is None:
            raise ValueError(f"no room for a '{kind}' lesion after {len(lesions)} others; use fewer lesions or a larger grid")
        lesions.append(lesion)
    return lesions


def make_case(name: str, seed: int, kinds=("enhancing", "cyst"), shape=DEFAULT_CASE_SHAPE, spacing=DEFAULT_CASE_SPACING,
              directions=None, gap_mm: float = 10.0, dtype=np.int16) -> Case:
    """One CT-like case with one lesion per entry of ``kinds``, deterministic given its seed, on a grid centred at RAS 0.

    ``directions`` (3x3, RAS unit axis columns) stores the same anatomy rotated or flipped; lesion centres then snap
    to that grid's voxel centres.
    """
    rng = np.random.default_rng(seed)
    anatomy = random_anatomy(rng)
    matrix = centered_matrix(shape, spacing, directions)
    lesions = place_lesions(list(kinds), anatomy, matrix, shape, rng, gap_mm=gap_mm)
    i, j, k = shape
    kk, jj, ii = np.meshgrid(np.arange(k, dtype=np.float32), np.arange(j, dtype=np.float32),
                             np.arange(i, dtype=np.float32), indexing="ij")
    ras = np.stack([ii, jj, kk], axis=-1) @ matrix[:3, :3].T.astype(np.float32) + matrix[:3, 3].astype(np.float32)
    values = case_values(ras, anatomy, lesions)
    # Noise belongs to the grid, not the anatomy: drawn last, so a case's layout does not depend on its size.
    values += rng.standard_normal(values.shape, dtype=np.float32) * np.float32(anatomy.noise_hu)
    array = np.round(values).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else values.astype(dtype)
    volume = Volume.from_array(array, matrix, name=name, modality="CT")
    return Case(name, volume, lesions, anatomy, int(seed))


def balanced_kinds(count: int, kinds, rng: np.random.Generator) -> list[str]:
    """``count`` kinds taken round-robin (so no kind has more than one more than another), then shuffled."""
    kinds = list(kinds)
    if not kinds:
        raise ValueError("no lesion kinds given")
    pool = [kinds[n % len(kinds)] for n in range(count)]
    return [pool[n] for n in rng.permutation(count)]


def make_cohort(n_cases: int, seed: int = 0, lesions_per_case: int | tuple[int, int] = 1, kinds=LESION_KINDS,
                shape=DEFAULT_CASE_SHAPE, spacing=DEFAULT_CASE_SPACING, directions=None,
                prefix: str = "case") -> list[Case]:
    """Cases ``<prefix>000``... with lesion kinds balanced across the cohort and each case's own anatomy.

    ``lesions_per_case`` is a count, or an inclusive (low, high) range drawn per case.
    """
    rng = np.random.default_rng(seed)
    if isinstance(lesions_per_case, int):
        counts = [lesions_per_case] * n_cases
    else:
        low, high = lesions_per_case
        counts = [int(v) for v in rng.integers(low, high + 1, n_cases)]
    pool = balanced_kinds(sum(counts), kinds, rng)
    # Independent per-case seeds: a case does not change when the cohort grows or another case changes.
    case_seeds = np.random.SeedSequence(seed).generate_state(n_cases)
    cases, start = [], 0
    for index, (count, case_seed) in enumerate(zip(counts, case_seeds)):
        cases.append(make_case(f"{prefix}{index:03d}", int(case_seed), pool[start:start + count], shape, spacing, directions))
        start += count
    return cases


def write_cohort(cases: list[Case], folder: str) -> list[str]:
    """Write each case as ``<name>.nii.gz`` and the lesions as ``cohort.csv`` (paths relative to it); return the volume paths."""
    import csv
    import os

    os.makedirs(folder, exist_ok=True)
    paths = []
    with open(os.path.join(folder, COHORT_CSV), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COHORT_COLUMNS)
        for case in cases:
            file_name = f"{case.name}.nii.gz"
            paths.append(write_volume(case.volume, os.path.join(folder, file_name)))
            for lesion in case.lesions:
                center = (f"{v:.4f}" for v in lesion.center)
                writer.writerow([file_name, case.name, lesion.kind, *center, f"{lesion.radius_mm:.4f}"])
    return paths


def read_cohort(csv_path: str) -> dict[str, list[Lesion]]:
    """Ground truth from a ``cohort.csv``: lesions (kind, centre, radius; nominal look) by case name, in file order."""
    import csv

    truth: dict[str, list[Lesion]] = {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            center = (float(row["center_r"]), float(row["center_a"]), float(row["center_s"]))
            truth.setdefault(row["case"], []).append(Lesion(row["kind"], center, float(row["radius_mm"])))
    return truth
