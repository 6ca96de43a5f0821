"""The real head-and-neck CT patients (OpenKBP, ``../shared/data/real/head-neck-ct``): who they are, the tuning/reporting
split, their organ masks, organ queries and slabs cut from them, for the cross-patient benchmark (:mod:`cross_patient`).

* 170 patients, 128^3 CT at 2.3-4.9 mm, up to 7 organ masks each (``ORGANS``). Every patient's origin is 0, so RAS
  coordinates say nothing across patients; fields of view differ (some start below the vertex, some reach the chest).
* **The split** (fixed, never tuned; :mod:`patient_split`, shared with every benchmark on these patients): a patient
  reports when the first 8 hex digits of the SHA-256 of its id make an odd number (66 patients), else it tunes (104).
  Methods are tuned on the tuning part only; ``docs/benchmarks.md`` reports the reporting part. Within a part, patients
  are taken in number order.
* **Organ queries**: per organ a patient has, the box a reader would draw around it: its voxels' extent, each side
  clipped to 20-60 mm, centred on the extent's centre. When that centre lies off the organ (the mandible's arch, a
  curved cord), the organ is asked as a *segment* query instead (its mask; the product asks about the mask's deepest
  point), and reported apart.
* **Slabs**: a patient's series cut to 40-60 mm along the body axis at a known level (around one of its organs, shifted
  by up to 10 mm), with its labels cut alike: a thin series of a real different patient.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import patient_split
import real_data

FOLDER = "real/head-neck-ct"
ORGANS = {1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid", 5: "Esophagus", 6: "Larynx", 7: "Mandible"}
ROI_MIN_MM, ROI_MAX_MM = 20.0, 60.0
SLAB_MM = (40.0, 60.0)
SLAB_SHIFT_MM = 10.0
INSIDE_MM = 5.0  # a shown point within this distance of the organ counts as inside it (issue 29)


@dataclass
class Patient:
    """One head-and-neck patient: name, number, CT and label files, voxel spacing (i, j, k) and organs present."""

    name: str
    number: int
    image: str
    labels: str
    spacing: tuple[float, float, float]
    organs: list[str]

    @property
    def part(self) -> str:
        """'tuning' or 'reporting' (:func:`patient_split.part`)."""
        return patient_split.part(self.name)


def folder() -> Path:
    """The head-and-neck folder of the shared data (``real_data.shared_data_dir``)."""
    path = real_data.shared_data_dir() / FOLDER
    if not (path / "cases.csv").is_file():
        raise real_data.RealDataError(f"{path / 'cases.csv'}: missing from the shared data")
    return path


def patients(part: str | None = None) -> list[Patient]:
    """The patients of ``cases.csv`` in number order, all or one part of the split ('tuning' or 'reporting')."""
    if part not in (None, "tuning", "reporting"):
        raise ValueError(f"part must be 'tuning' or 'reporting', not {part!r}")
    base = folder()
    out = []
    with open(base / "cases.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            number = int(row["case"].rsplit("_", 1)[1])
            out.append(Patient(row["case"], number, str(base / f"{row['case']}_ct.nii.gz"), str(base / f"{row['case']}_labels.nii.gz"),
                               tuple(float(v) for v in row["spacing_mm"].split(",")), row["organs"].split(",")))
    out.sort(key=lambda p: p.number)
    return [p for p in out if part is None or p.part == part]


@dataclass
class Organs:
    """A patient's (or a slab's) label map, for judging shown points: each organ's voxel centres in RAS."""

    path: str
    points: dict[int, np.ndarray] = field(default_factory=dict)
    array: np.ndarray | None = None
    ras_to_ijk: np.ndarray | None = None

    @classmethod
    def read(cls, path: str) -> Organs:
        from CBIRSlicerLib.imaging.readers import read_volume

        labels = read_volume(path)
        array = np.asarray(labels.array)
        points = {}
        for label in ORGANS:
            where = np.argwhere(array == label)
            if len(where):
                points[label] = labels.ijk_to_ras_points(where[:, ::-1].astype(float))
        return cls(path, points, array, labels.ras_to_ijk)

    def has(self, label: int) -> bool:
        return label in self.points

    def distance_mm(self, label: int, ras) -> float:
        """Millimetres from a RAS point to the organ: 0 inside its voxels, else to its nearest voxel centre."""
        ras = np.asarray(ras, float)
        ijk = np.rint(ras @ self.ras_to_ijk[:3, :3].T + self.ras_to_ijk[:3, 3]).astype(int)
        if np.all(ijk >= 0) and np.all(ijk < np.array(self.array.shape[::-1])) and self.array[ijk[2], ijk[1], ijk[0]] == label:
            return 0.0
        return float(np.min(np.linalg.norm(self.points[label] - ras, axis=1)))


@dataclass
class OrganQuery:
    """One organ asked in one patient: the box (RAS centre and size), the point asked about, and how it is asked."""

    patient: str
    label: int
    organ: str
    kind: str  # 'box' (centre on the organ) or 'segment' (the box centre lies off it: asked by the organ's mask)
    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    centre_off_organ_mm: float  # how far the box's own centre lies from the organ (0: on it)


def organ_queries(patient: Patient, organs: Organs | None = None) -> list[OrganQuery]:
    """The organ boxes a reader would draw in one patient (module docstring)."""
    organs = organs or Organs.read(patient.labels)
    half_voxel = np.abs(np.linalg.inv(organs.ras_to_ijk)[:3, :3]).sum(axis=1) / 2  # RAS extent of half a voxel
    out = []
    for label, points in sorted(organs.points.items()):
        low, high = points.min(axis=0) - half_voxel, points.max(axis=0) + half_voxel
        # A long organ (the cord, the oesophagus) is boxed over 60 mm of its height: the box across it is then drawn around
        # the part in those planes, as a reader boxes the part they look at.
        middle = (low[2] + high[2]) / 2
        within = points[np.abs(points[:, 2] - middle) <= ROI_MAX_MM / 2]
        if len(within):
            low[:2], high[:2] = within[:, :2].min(axis=0) - half_voxel[:2], within[:, :2].max(axis=0) + half_voxel[:2]
        centre = (low + high) / 2
        size = np.clip(high - low, ROI_MIN_MM, ROI_MAX_MM)
        off = organs.distance_mm(label, centre)
        kind = "box" if off == 0.0 else "segment"
        out.append(OrganQuery(patient.name, label, ORGANS[label], kind, tuple(float(v) for v in centre),
                              tuple(float(v) for v in size), round(off, 1)))
    return out


def segment_of(organs: Organs, label: int, name: str = ""):
    """The organ's mask as a product :class:`Segment` (what a segment query sends)."""
    from CBIRSlicerLib.imaging.roi import segment_of_array

    return segment_of_array(organs.array == label, np.linalg.inv(organs.ras_to_ijk), name or ORGANS[label])


@dataclass
class Slab:
    """A cut of one patient's series: the files written, the RAS level of its middle and its thickness."""

    patient: str
    image: str
    labels: str
    level_ras_s: float
    thickness_mm: float
    around: str  # the organ whose level it was cut at


def body_axis(volume) -> int:
    """The voxel axis (0 i, 1 j, 2 k) most along the body's S axis."""
    return int(np.argmax(np.abs(volume.directions[2])))


def cut(volume, level_s: float, thickness_mm: float):
    """The volume cut to about ``thickness_mm`` along its body axis, centred on the RAS height ``level_s`` (geometry kept)."""
    import dataclasses

    axis = body_axis(volume)
    point = volume.center_ras.copy()
    point[2] = level_s
    index = volume.ras_to_ijk_points(point[None])[0][axis]
    half = thickness_mm / 2 / volume.spacing[axis]
    low = max(0, int(round(index - half)))
    high = min(volume.shape_ijk[axis] - 1, int(round(index + half)))
    selection = [slice(None)] * 3
    selection[2 - axis] = slice(low, high + 1)  # the array is [k, j, i]
    shift = np.eye(4)
    shift[axis, 3] = low
    return dataclasses.replace(volume, array=np.ascontiguousarray(volume.array[tuple(selection)]),
                               ijk_to_ras=volume.ijk_to_ras @ shift, extra=dict(volume.extra))


def slab_draw(seed: int) -> tuple[float, float]:
    """A slab's thickness (40-60 mm) and its shift from the chosen level (+-10 mm), from a seed."""
    rng = np.random.default_rng(seed)
    return float(rng.uniform(*SLAB_MM)), float(rng.uniform(-SLAB_SHIFT_MM, SLAB_SHIFT_MM))


def write_slab(patient: Patient, out: Path, position: int) -> Slab:
    """One patient's slab around one of its organs (the ``position``-th present, cycling), written as NIfTI with its labels."""
    import SimpleITK as sitk

    from CBIRSlicerLib.imaging.readers import read_volume

    organs = Organs.read(patient.labels)
    present = sorted(organs.points)
    label = present[position % len(present)]
    thickness, shift = slab_draw(patient.number)
    level = float(np.median(organs.points[label][:, 2])) + shift
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for source, suffix in ((patient.image, "ct"), (patient.labels, "labels")):
        target = out / f"{patient.name}_slab_{suffix}.nii.gz"
        if not target.exists():
            piece = cut(read_volume(source), level, thickness)
            image = piece.to_sitk()
            sitk.WriteImage(image, str(target) + ".tmp.nii.gz")
            os.replace(str(target) + ".tmp.nii.gz", target)
        paths.append(str(target))
    return Slab(patient.name, paths[0], paths[1], round(level, 2), round(thickness, 1), ORGANS[label])
