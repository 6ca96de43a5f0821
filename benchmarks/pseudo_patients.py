"""Pseudo-patients: copies of one real volume by known transformations, so every structure's place in each is known.

A copy is the source resampled through one transform T that maps a point of the copy (target) to the
point of the source it shows, both in physical millimetres: T(q) = A(q + D(q)), where A is an affine
(rotation, scaling per axis, translation, about the source's centre) and D a smooth elastic field
(Gaussian-smoothed random noise on a coarse node grid, scaled to a chosen RMS displacement). Both are
held as one displacement field on that node grid, T(q) = q + U(q) with U trilinear between nodes, which
is exactly what SimpleITK's DisplacementFieldTransform applies when resampling (and exact for the
affine part, which is linear). The inverse (source point to copy point) is solved per point by Newton
steps with A's matrix as the Jacobian, to 1e-4 mm.

Besides the geometry, a copy has its own slice thickness (a Gaussian slice profile of that FWHM along
the slice axis, then sampled at that spacing), a field of view cropped by 20-35 % along the body axis
and 0-10 % across it, noise (CT: 10-30 HU; MR: 3-10 % of the mean tissue value) and an intensity shift
and gain. Label maps are warped with the same T by nearest neighbour.

Points are handled in RAS here (as the catalog and search answers are); SimpleITK works in LPS.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
FIELD_NODE_MM = 8.0


@dataclass
class CopySpec:
    """The random draw of one copy: every parameter of its transformation and acquisition."""

    seed: int
    rotation_deg: tuple[float, float, float]  # about the R, A, S axes
    translation_mm: tuple[float, float, float]  # RAS
    scale: tuple[float, float, float]
    elastic_rms_mm: float
    elastic_sigma_mm: float
    slice_mm: float
    inplane_mm: float
    crop_axial: tuple[float, float]  # fractions of the body-axis extent removed below and above
    crop_inplane: tuple[float, float, float, float]  # fractions removed at the low/high ends of the two in-plane axes
    noise_sd: float  # in the image's units
    gain: float
    shift: float


def random_spec(seed: int, modality: str, tissue_mean: float, inplane_mm: float, strength: float = 1.0) -> CopySpec:
    """A copy's parameters, drawn at the strength the issue asks for (``strength`` < 1 only for unit tests)."""
    rng = np.random.default_rng(seed)

    def signed(low: float, high: float, n: int) -> tuple:
        return tuple(float(v) for v in rng.uniform(low, high, n) * rng.choice([-1.0, 1.0], n) * strength)

    crop = float(rng.uniform(0.20, 0.35))
    below = float(rng.uniform(0.0, 1.0)) * crop
    ct = modality.upper() == "CT"
    return CopySpec(
        seed=seed, rotation_deg=signed(3.0, 10.0, 3), translation_mm=signed(10.0, 30.0, 3),
        scale=tuple(float(1 + v) for v in signed(0.03, 0.10, 3)), elastic_rms_mm=float(rng.uniform(8.0, 10.0)) * strength,
        elastic_sigma_mm=30.0, slice_mm=float(rng.uniform(1.0, 5.0)), inplane_mm=inplane_mm,
        crop_axial=(below, crop - below), crop_inplane=tuple(float(v) for v in rng.uniform(0.0, 0.10, 4)),
        noise_sd=float(rng.uniform(10.0, 30.0) if ct else rng.uniform(0.03, 0.10) * tissue_mean),
        gain=float(rng.uniform(0.95, 1.05) if ct else rng.uniform(0.8, 1.2)),
        shift=float(rng.uniform(-30.0, 30.0) if ct else rng.uniform(-0.1, 0.1) * tissue_mean))


def _rotation(degrees) -> np.ndarray:
    rx, ry, rz = np.radians(degrees)
    x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


def _bounds_lps(image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS) corners' minimum and maximum of an image whose direction is axis-aligned."""
    size = np.array(image.GetSize()) - 1
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(a), float(b), float(c)])
               for a in (0, size[0]) for b in (0, size[1]) for c in (0, size[2])]
    return np.min(corners, axis=0), np.max(corners, axis=0)


class PseudoPatient:
    """A copy's transform T (copy -> source, LPS mm) as a displacement field, with point maps in RAS both ways."""

    def __init__(self, field, affine_lps: np.ndarray, spec: CopySpec | None = None):
        import SimpleITK as sitk

        self.field = field  # vector image, LPS, displacement U(q) = T(q) - q at the nodes
        self.affine_lps = np.asarray(affine_lps, float)  # 4x4, the affine part A (for Newton steps)
        self.spec = spec
        self._transform = sitk.DisplacementFieldTransform(sitk.Image(field))

    @property
    def transform(self):
        """The SimpleITK transform that resamples the source into the copy."""
        return self._transform

    def copy_to_source(self, ras) -> np.ndarray:
        """Points of the copy (RAS, (..., 3)) to the source points they show."""
        points = np.atleast_2d(np.asarray(ras, float)) * FLIP
        out = np.array([self._transform.TransformPoint(tuple(p)) for p in points]) * FLIP
        return out.reshape(np.shape(ras))

    def source_to_copy(self, ras, tolerance_mm: float = 1e-4, steps: int = 50) -> np.ndarray:
        """Source points (RAS) to where the copy shows them: T(q) = p solved by Newton steps with A's matrix."""
        targets = np.atleast_2d(np.asarray(ras, float)) * FLIP
        matrix, offset = self.affine_lps[:3, :3], self.affine_lps[:3, 3]
        inverse = np.linalg.inv(matrix)
        out = []
        for p in targets:
            q = inverse @ (p - offset)
            for _ in range(steps):
                residual = p - np.array(self._transform.TransformPoint(tuple(q)))
                if np.linalg.norm(residual) < tolerance_mm:
                    break
                q = q + inverse @ residual
            else:
                raise RuntimeError(f"the inverse of the copy's transform did not converge at {p * FLIP} (RAS)")
            out.append(q)
        return (np.array(out) * FLIP).reshape(np.shape(ras))

    def save(self, stem: str | os.PathLike) -> None:
        """The field (NIfTI vector image) and the affine + spec (JSON) beside the copy."""
        import SimpleITK as sitk

        sitk.WriteImage(self.field, f"{stem}_field.nii.gz")
        with open(f"{stem}_transform.json", "w") as handle:
            json.dump({"affine_lps": self.affine_lps.tolist(), "spec": asdict(self.spec) if self.spec else None,
                       "meaning": "T(q) = q + U(q), copy -> source, LPS mm; U trilinear on the field's nodes"}, handle, indent=1)

    @classmethod
    def load(cls, stem: str | os.PathLike) -> PseudoPatient:
        """A saved copy's transform."""
        import SimpleITK as sitk

        with open(f"{stem}_transform.json") as handle:
            data = json.load(handle)
        spec = CopySpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["spec"].items()}) if data["spec"] else None
        return cls(sitk.ReadImage(f"{stem}_field.nii.gz", sitk.sitkVectorFloat64), np.array(data["affine_lps"]), spec)


def _smooth_noise(shape_kji, sigma_nodes: float, rng: np.random.Generator) -> np.ndarray:
    """Three components of Gaussian-smoothed white noise on a node grid, (k, j, i, 3)."""
    import SimpleITK as sitk

    out = []
    for _ in range(3):
        noise = sitk.GetImageFromArray(rng.standard_normal(shape_kji))
        out.append(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma_nodes)))
    return np.stack(out, axis=-1)


def make_copy(source, spec: CopySpec, labels=None, background: float = -1024.0, slice_axis: int = 2,
              protect_k: tuple[int, int] | None = None):
    """(image, labels or None, PseudoPatient) of one copy of a SimpleITK source image (axis-aligned direction).

    ``slice_axis`` is the source's voxel axis along the body (the copy's slices are taken across it); the crop
    along it spares the slab ``protect_k`` (source slice indices, inclusive) where it can, taking more from the
    other end instead.
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(spec.seed + 1_000_003)
    direction = np.array(source.GetDirection()).reshape(3, 3)
    low, high = _bounds_lps(source)
    centre = (low + high) / 2
    # A maps copy points to source points: the copy is the source moved by the inverse of A.
    matrix = (_rotation(spec.rotation_deg) * FLIP[:, None] * FLIP[None, :]) @ np.diag(1 / np.array(spec.scale))
    translation = np.array(spec.translation_mm) * FLIP
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = centre - matrix @ (centre + translation)
    inverse = np.linalg.inv(affine)
    # The copy's box: the source's box carried into the copy (by A's inverse), then cropped.
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    moved = corners @ inverse[:3, :3].T + inverse[:3, 3]
    box_low, box_high = moved.min(axis=0), moved.max(axis=0)
    extent = box_high - box_low
    whole_low, whole_high = box_low.copy(), box_high.copy()  # the field spans the uncropped box: every source point maps
    body = int(np.argmax(np.abs(direction[:, slice_axis])))  # the LPS axis along the body
    across = [a for a in range(3) if a != body]
    below, above = spec.crop_axial[0] * extent[body], spec.crop_axial[1] * extent[body]
    if protect_k is not None:
        # Crop from the other end where the crop would cut into a slab that must stay (the labelled one).
        ends = np.array([source.TransformContinuousIndexToPhysicalPoint(
            [float(c if n == slice_axis else (source.GetSize()[n] - 1) / 2) for n in range(3)]) for c in protect_k])
        band = (ends @ inverse[:3, :3].T + inverse[:3, 3])[:, body]
        room_below, room_above = max(0.0, band.min() - box_low[body]), max(0.0, box_high[body] - band.max())
        total = below + above
        below = min(max(below, total - room_above), room_below)
        above = min(total - below, room_above)
    box_low[body] += below
    box_high[body] -= above
    for n, axis in enumerate(across):
        box_low[axis] += spec.crop_inplane[2 * n] * extent[axis]
        box_high[axis] -= spec.crop_inplane[2 * n + 1] * extent[axis]
    spacing_lps = np.full(3, spec.inplane_mm)
    spacing_lps[body] = spec.slice_mm
    # The copy's grid keeps the source's axis directions (and their order), with its own spacing and extent.
    axis_of = [int(np.argmax(np.abs(direction[:, n]))) for n in range(3)]
    spacing = [float(spacing_lps[a]) for a in axis_of]
    size = [max(2, int(np.floor((box_high[a] - box_low[a]) / spacing_lps[a])) + 1) for a in axis_of]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetDirection(tuple(direction.ravel()))
    reference.SetSpacing(spacing)
    corner_index = [0.0 if direction[a, n] > 0 else size[n] - 1.0 for n, a in enumerate(axis_of)]
    start = np.array(box_low)
    origin = start - sum(direction[:, n] * spacing[n] * corner_index[n] for n in range(3))
    reference.SetOrigin(tuple(origin))
    # The field's nodes cover the uncropped box with two nodes to spare on every side.
    nodes = [int(np.ceil((whole_high[a] - whole_low[a]) / FIELD_NODE_MM)) + 5 for a in range(3)]
    node_origin = whole_low - 2 * FIELD_NODE_MM
    grid = np.stack(np.meshgrid(*[node_origin[a] + FIELD_NODE_MM * np.arange(nodes[a]) for a in range(3)], indexing="ij"), -1)
    grid = grid.transpose(2, 1, 0, 3)  # (z, y, x, 3): SimpleITK's array order for an identity-direction grid
    elastic = _smooth_noise(grid.shape[:3], spec.elastic_sigma_mm / FIELD_NODE_MM, rng)
    inside = np.all((grid >= box_low) & (grid <= box_high), axis=-1)
    elastic *= spec.elastic_rms_mm / np.sqrt(np.mean(np.sum(elastic[inside] ** 2, axis=-1)))
    warped = grid + elastic
    displacement = warped @ matrix.T + affine[:3, 3] - grid
    field = sitk.GetImageFromArray(displacement.astype(np.float64), isVector=True)
    field.SetOrigin(tuple(node_origin))
    field.SetSpacing((FIELD_NODE_MM,) * 3)
    patient = PseudoPatient(field, affine, spec)
    # Slice profile: a Gaussian of FWHM = the copy's slice thickness, less what the source's own slices already blur.
    source_float = sitk.Cast(source, sitk.sitkFloat32)
    own = source.GetSpacing()[slice_axis]
    sigma = np.sqrt(max(spec.slice_mm ** 2 - own ** 2, 0.0)) / 2.3548
    if sigma > 0.05:
        blur = sitk.RecursiveGaussianImageFilter()
        blur.SetSigma(float(sigma))
        blur.SetDirection(slice_axis)
        source_float = blur.Execute(source_float)
    image = sitk.Resample(source_float, reference, patient.transform, sitk.sitkLinear, float(background), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array = array * spec.gain + spec.shift + rng.normal(0.0, spec.noise_sd, array.shape)
    out = sitk.GetImageFromArray(np.round(array).astype(np.int16))
    out.CopyInformation(image)
    warped_labels = None
    if labels is not None:
        warped_labels = sitk.Resample(labels, reference, patient.transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return out, warped_labels, patient


def elastic_rms_mm(patient: PseudoPatient) -> float:
    """RMS length of the elastic part of a copy's field over its nodes (the affine part taken out), for reporting."""
    import SimpleITK as sitk

    field = sitk.GetArrayFromImage(patient.field)
    origin, spacing = np.array(patient.field.GetOrigin()), np.array(patient.field.GetSpacing())
    k, j, i = field.shape[:3]
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    grid = origin + np.stack([ii, jj, kk], -1) * spacing  # node (k, j, i) of an identity-direction grid
    affine = grid @ patient.affine_lps[:3, :3].T + patient.affine_lps[:3, 3]
    elastic = np.linalg.solve(patient.affine_lps[:3, :3], (grid + field - affine).reshape(-1, 3).T).T
    core = elastic.reshape(field.shape)[2:-2, 2:-2, 2:-2]  # the uncropped box's nodes (two spare on each side)
    return float(np.sqrt(np.mean(np.sum(core ** 2, axis=-1))))


def write_copies(source_path: str, labels_path: str | None, modality: str, folder: str | os.PathLike, count: int,
                 seed: int = 0, inplane_mm: float | None = None, name: str = "copy",
                 protect_k: tuple[int, int] | None = None) -> list[dict]:
    """``count`` copies of a volume as NIfTI (with warped labels and the transform beside each); their descriptions."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = sitk.ReadImage(source_path)
    labels = sitk.ReadImage(labels_path) if labels_path else None
    array = sitk.GetArrayViewFromImage(source)
    ct = modality.upper() == "CT"
    tissue = float(np.mean(array[array > (-200 if ct else np.percentile(array, 50))]))
    background = -1024.0 if ct else 0.0
    inplane = inplane_mm or float(min(source.GetSpacing()[:2]))
    out = []
    for n in range(count):
        spec = random_spec(seed * 1000 + n, modality, tissue, inplane)
        image, warped, patient = make_copy(source, spec, labels, background, protect_k=protect_k)
        stem = folder / f"{name}_{n:02d}"
        sitk.WriteImage(image, f"{stem}.nii.gz")
        if warped is not None:
            sitk.WriteImage(warped, f"{stem}_labels.nii.gz")
        patient.save(stem)
        out.append({"image": f"{stem}.nii.gz", "labels": f"{stem}_labels.nii.gz" if warped is not None else None,
                    "transform": str(stem), "spec": asdict(spec)})
    return out
