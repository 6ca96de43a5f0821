"""Reading volumes from disk: NIfTI, NRRD, MetaImage, DICOM series and multi-frame DICOM.

Everything goes through SimpleITK (GDCM for DICOM); geometry is taken from the file and
converted to RAS once, in :mod:`coordinates`. Folders are searched recursively; every DICOM
series found is its own case.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import (
    DicomSeriesError,
    DimensionError,
    EmptySourceError,
    GeometryFileError,
    InputError,
    UnreadableFileError,
    UnsupportedFormatError,
    printable,
)
from .volume import Volume

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Files that sit beside volumes and are never volumes themselves: skipped silently.
# (.raw, .raw.gz and .zraw hold the voxels of .nhdr and .mhd headers.) Any other file that is neither a volume
# nor DICOM, a .txt included, is reported in Discovery.skipped as "unsupported format".
_IGNORED_SUFFIXES = (".raw", ".raw.gz", ".zraw", ".json", ".md", ".csv", ".png", ".jpg", ".db", ".sqlite",
                     ".sqlite-wal", ".sqlite-shm", ".faiss", ".html", ".sql")  # .sql: Slicer's ctkDICOM.sql beside its files
_IGNORED_NAMES = ("DICOMDIR",)

# DICOM tags read for the catalog and for series checks.
TAG_MODALITY = "0008|0060"
TAG_SERIES_UID = "0020|000e"
TAG_BODY_PART = "0018|0015"
TAG_STUDY_DESCRIPTION = "0008|1030"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_PATIENT_ID = "0010|0020"
TAG_POSITION = "0020|0032"
TAG_ORIENTATION = "0020|0037"
TAG_FRAMES = "0028|0008"
TAG_STUDY_UID = "0020|000d"
TAG_STUDY_DATE = "0008|0020"
TAG_MANUFACTURER = "0008|0070"
TAG_SLICE_THICKNESS = "0018|0050"


@dataclass(frozen=True)
class CaseSource:
    """Where one case lives: a volume file, or one DICOM series (its folder, UID and sorted files)."""

    path: str
    series_uid: str | None = None
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Readable name: the file, or the folder plus the series UID."""
        return f"{self.path} [series {self.series_uid}]" if self.series_uid else self.path


@dataclass
class Discovery:
    """What a search over files and folders found: cases to read and what was skipped, with why."""

    cases: list[CaseSource] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def volume_suffix(path: str | Path) -> str | None:
    """The volume-format suffix of a path (case-insensitive), or None."""
    name = str(path).lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def is_dicom_file(path: str | Path) -> bool:
    """Whether a file has a DICOM suffix or the 'DICM' magic at byte 128."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _itk_reason(error: Exception) -> str:
    """The useful part of an ITK exception message (it carries source paths and line numbers)."""
    text = str(error)
    # ITK writes "ITK ERROR: Class(0x...): reason" or "itk::ERROR: Class(0x...): reason"; SimpleITK writes
    # "sitk::ERROR: reason" (\b keeps "itk::ERROR" from matching inside "sitk::ERROR").
    match = re.search(r"(?:ITK ERROR|\bitk::ERROR): [^:\n]*:\s*(.*)", text, flags=re.S)
    match = match or re.search(r"sitk::ERROR:\s*(.*)", text, flags=re.S)
    lines = [line.strip() for line in (match.group(1) if match else text).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    if not lines:
        return "unknown error"
    reason = lines[0]
    # Teem (NRRD) stacks its messages outermost first: the real cause is the last line.
    if len(lines) > 1 and lines[-1].startswith("[nrrd]"):
        reason += f" ({lines[-1].split(': ', 1)[-1]})"
    return reason


def _read_information(path: str):
    """An ImageFileReader with the header read (no pixels yet)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise UnreadableFileError(path, f"cannot be read: {_itk_reason(error)}") from None
    return reader


def _nifti_data_problem(path: str) -> str | None:
    """Why a NIfTI file holds fewer voxel bytes than its header promises, or None when it holds them all.

    ITK's NIfTI reader pads a truncated file (or a cut-short .nii.gz) with zeros without a word, so the
    length is checked here: for .nii.gz by decompressing the whole stream (gzip also checks its CRC).
    """
    compressed = False
    try:
        with open(path, "rb") as handle:
            # ITK (znzlib) also reads a plain NIfTI misnamed .nii.gz: go by the gzip magic, not the name.
            compressed = handle.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            header = handle.read(540)
            total = len(header)
            if compressed:
                while True:
                    chunk = handle.read(1 << 22)
                    if not chunk:
                        break
                    total += len(chunk)
            else:
                total = os.path.getsize(path)
    except (OSError, EOFError, zlib.error) as error:
        what = "compressed data" if compressed else "file"
        return f"{what} is truncated or corrupt ({error})"
    if len(header) < 348:
        return f"is too short for a NIfTI header ({len(header)} bytes)"
    for order in "<>":
        size_of_header = struct.unpack(order + "i", header[:4])[0]
        if size_of_header == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            bits = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size_of_header == 540 and len(header) >= 540:  # NIfTI-2
            bits = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None  # not a header this check understands; ITK decides
    if not 1 <= dims[0] <= 7 or bits <= 0 or offset <= 0:
        return None
    expected = offset + int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bits // 8
    if total < expected:
        return f"is truncated: it holds {total} bytes where its header promises {expected} (voxel data cut short)"
    return None


def _dicom_metadata(reader) -> dict[str, str]:
    """Modality, series and study UIDs, body part, descriptions, study date, manufacturer and slice thickness, where present."""
    keys = {
        "modality": TAG_MODALITY,
        "series_uid": TAG_SERIES_UID,
        "body_part": TAG_BODY_PART,
        "study_description": TAG_STUDY_DESCRIPTION,
        "series_description": TAG_SERIES_DESCRIPTION,
        "patient_id": TAG_PATIENT_ID,
        "study_uid": TAG_STUDY_UID,
        "study_date": TAG_STUDY_DATE,
        "manufacturer": TAG_MANUFACTURER,
        "slice_thickness": TAG_SLICE_THICKNESS,
    }
    found = {}
    for name, tag in keys.items():
        if reader.HasMetaDataKey(tag):
            # Escaped: a description becomes the case's name, shown on terminals (an escape sequence there is an attack).
            value = printable(reader.GetMetaData(tag).strip().rstrip("\x00").strip())
            if value:
                found[name] = value
    if "slice_thickness" in found:
        try:  # one spelling per value, so '--filter slice_thickness=2.5' matches '2.50000' as stored
            found["slice_thickness"] = f"{float(found['slice_thickness']):g}"
        except ValueError:
            del found["slice_thickness"]
    return found


def _check_scalar_3d(image_or_reader, path: str):
    """Raise DimensionError unless the image is one scalar 3D volume (a trailing 4th axis of size 1 is allowed)."""
    dimension = image_or_reader.GetDimension()
    size = list(image_or_reader.GetSize())
    # An ImageFileReader says GetNumberOfComponents, an Image says GetNumberOfComponentsPerPixel.
    if hasattr(image_or_reader, "GetNumberOfComponentsPerPixel"):
        components = image_or_reader.GetNumberOfComponentsPerPixel()
    else:
        components = image_or_reader.GetNumberOfComponents()
    if components != 1:
        raise DimensionError(
            path, f"has {components} components per voxel (colour or vector image); only scalar volumes can be searched"
        )
    if dimension == 4 and size[3] != 1:
        raise DimensionError(path, f"is a 4D image ({'x'.join(map(str, size))}); split it into 3D volumes first")
    if dimension not in (2, 3, 4):
        raise DimensionError(path, f"has {dimension} dimensions; expected a 3D volume")
    if dimension == 2 or size[2] == 1:
        raise DimensionError(path, f"is a 2D image ({size[0]}x{size[1]}), not a volume")


ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I| above this is a skewed or scaled direction matrix, not rounding


def _geometry_problem(reader) -> str | None:
    """Why a header's geometry is unusable (zero, negative or non-finite spacing; a singular or skewed direction), or None."""
    spacing = np.array(reader.GetSpacing()[:3], dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        return f"has voxel spacing {' x '.join(f'{v:g}' for v in spacing)} mm in its header; every spacing must be a positive number"
    dimension = reader.GetDimension()
    direction = np.array(reader.GetDirection(), dtype=float).reshape(dimension, dimension)[:3, :3]
    if not np.all(np.isfinite(direction)):
        return "has a direction matrix with non-finite numbers in its header"
    if abs(np.linalg.det(direction)) < 1e-6:
        return (f"has a singular direction matrix in its header (its axes are not independent: "
                f"{np.round(direction, 4).tolist()}); the voxels have no place in space")
    error = float(np.max(np.abs(direction.T @ direction - np.eye(3))))
    if error > ORTHONORMAL_TOLERANCE:
        return (f"has a direction matrix that is not orthonormal (axes skewed or scaled, off by up to {error:.3g}): "
                f"{np.round(direction, 4).tolist()}; resample it onto an orthogonal grid first")
    return None


def _to_volume(image, path: str, metadata: dict[str, str], name: str) -> Volume:
    """Turn a checked SimpleITK image into a Volume with metadata."""
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    known = {k: metadata.get(k) for k in ("modality", "series_uid", "body_part")}
    extra = {k: v for k, v in metadata.items() if k not in known}
    return Volume.from_sitk(image, name=name, source=path, extra=extra, **known)


def _case_name(path: str) -> str:
    """A case name from a file name, without the volume suffix."""
    base = os.path.basename(os.path.normpath(path))
    suffix = volume_suffix(base)
    return base[: -len(suffix)] if suffix else os.path.splitext(base)[0]


def read_volume_file(path: str | Path) -> Volume:
    """Read one volume file (NIfTI, NRRD, MetaImage or a single multi-frame DICOM file)."""

    path = str(path)
    if not os.path.exists(path):
        raise UnreadableFileError(path, "does not exist")
    if os.path.isdir(path):
        raise InputError(path, "is a folder; use read_volume() for a folder")
    if volume_suffix(path) is None and not is_dicom_file(path):
        raise UnsupportedFormatError(
            path,
            "unsupported format; expected NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
            "MetaImage (.mha, .mhd) or DICOM",
        )
    if os.path.getsize(path) == 0:
        raise UnreadableFileError(path, "is empty (0 bytes)")
    reader = _read_information(path)
    _check_scalar_3d(reader, path)
    geometry = _geometry_problem(reader)
    if geometry:
        raise GeometryFileError(path, geometry)
    if volume_suffix(path) in (".nii", ".nii.gz"):
        problem = _nifti_data_problem(path)
        if problem:
            raise UnreadableFileError(path, problem)
    metadata = _dicom_metadata(reader)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise UnreadableFileError(path, f"pixel data cannot be read (truncated or corrupt?): {_itk_reason(error)}") from None
    _check_scalar_3d(image, path)
    return _to_volume(image, path, metadata, _case_name(path))


def _header_info(path: str) -> dict:
    """Position, orientation, size and frame count of one DICOM file, from its header only."""
    reader = _read_information(path)

    def numbers(tag: str) -> np.ndarray | None:
        if not reader.HasMetaDataKey(tag):
            return None
        try:
            return np.array([float(v) for v in reader.GetMetaData(tag).split("\\")])
        except ValueError:
            return None

    frames = reader.GetMetaData(TAG_FRAMES).strip() if reader.HasMetaDataKey(TAG_FRAMES) else "1"
    return {
        "position": numbers(TAG_POSITION),
        "orientation": numbers(TAG_ORIENTATION),
        "size": tuple(reader.GetSize()[:2]),
        "frames": int(frames) if frames.isdigit() else 1,
        "metadata": _dicom_metadata(reader),
    }


def check_dicom_series(folder: str, series_uid: str, files: list[str]) -> dict[str, str]:
    """Check a series for mixed sizes, mixed orientations, duplicate and missing slices; return its metadata."""
    where = f"series {series_uid}"
    headers = [_header_info(f) for f in files]
    sizes = {h["size"] for h in headers}
    if len(sizes) > 1:
        listed = ", ".join(f"{a}x{b}" for a, b in sorted(sizes))
        raise DicomSeriesError(folder, f"{where} mixes slice sizes ({listed}); it is not one volume")
    orientations = [h["orientation"] for h in headers]
    positions_given = [h["position"] for h in headers]
    if any(o is None or len(o) != 6 for o in orientations) or any(p is None or len(p) != 3 for p in positions_given):
        raise DicomSeriesError(folder, f"{where} lacks Image Position/Orientation (Patient) on some slices")
    reference = orientations[0]
    if any(np.max(np.abs(o - reference)) > 1e-3 for o in orientations[1:]):
        raise DicomSeriesError(folder, f"{where} mixes slice orientations; it is not one volume")
    normal = np.cross(reference[:3], reference[3:])
    positions = np.sort([float(np.dot(h["position"], normal)) for h in headers])
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        raise DicomSeriesError(folder, f"{where} has {int(np.sum(gaps < 1e-3))} duplicate slice position(s); mixed acquisitions?")
    if len(gaps) >= 2:
        # The smallest gap is the slice spacing: a gap 1.5 times that or more is missing slices. (The median
        # is no good here: with 3 slices left of 4, gaps of 1 and 2 have a median of 1.5 and nothing looks missing.)
        typical = float(np.min(gaps))
        wide = np.flatnonzero(gaps > 1.5 * typical)
        if len(wide):
            at = wide[0]
            raise DicomSeriesError(
                folder,
                f"{where} has missing slices: a gap of {gaps[at]:.2f} mm between slices at "
                f"{positions[at]:.2f} and {positions[at + 1]:.2f} mm where the spacing is {typical:.2f} mm "
                f"({len(wide)} gap(s) in all)",
            )
        if np.max(gaps) - np.min(gaps) > 0.1 * typical + 1e-3:
            raise DicomSeriesError(folder, f"{where} has uneven slice spacing ({np.min(gaps):.2f} to {np.max(gaps):.2f} mm)")
    return headers[0]["metadata"]


def sort_dicom_files(files: Iterable[str]) -> list[str]:
    """The files of one series in slice order (position along the slice normal), as GDCM orders a folder's series.

    For series whose files a database lists in any order; files without position or orientation keep their place at the end.
    """
    files = list(files)
    keyed, rest = [], []
    for path in files:
        info = _header_info(path)
        if info["position"] is None or info["orientation"] is None or len(info["orientation"]) != 6:
            rest.append(path)
            continue
        normal = np.cross(info["orientation"][:3], info["orientation"][3:])
        keyed.append((float(np.dot(info["position"][:3], normal)), path))
    return [p for _, p in sorted(keyed)] + rest


def read_dicom_series(folder: str | Path, series_uid: str, files: Iterable[str] | None = None) -> Volume:
    """Read one DICOM series from a folder after checking it is one consistent volume."""
    import SimpleITK as sitk

    folder = str(folder)
    names = list(files) if files is not None else list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))
    if not names:
        raise DicomSeriesError(folder, f"series {series_uid} not found")
    if len(names) == 1:
        # A single file in a series is either a multi-frame volume or a lone 2D slice.
        volume = read_volume_file(names[0])
        volume.series_uid = volume.series_uid or series_uid
        return volume
    metadata = check_dicom_series(folder, series_uid, names)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise UnreadableFileError(folder, f"series {series_uid} cannot be read: {_itk_reason(error)}") from None
    _check_scalar_3d(image, folder)
    metadata.setdefault("series_uid", series_uid)
    name = metadata.get("series_description") or f"{_case_name(folder)}-{series_uid[-8:]}"
    return _to_volume(image, folder, metadata, name)


def _series_in_folder(folder: str) -> list[CaseSource]:
    """DICOM series found by GDCM directly inside one folder."""
    import SimpleITK as sitk

    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        if files:
            found.append(CaseSource(path=folder, series_uid=uid, files=files))
    return found


def discover(paths: Iterable[str | Path], recursive: bool = True) -> Discovery:
    """Find cases in files and folders: volume files, multi-frame DICOM files and DICOM series."""
    result = Discovery()
    for raw in paths:
        path = os.path.abspath(str(raw))
        if os.path.isfile(path):
            if volume_suffix(path) or is_dicom_file(path):
                result.cases.append(CaseSource(path=path))
            else:
                result.skipped.append((path, "unsupported format"))
            continue
        if not os.path.isdir(path):
            result.skipped.append((path, "does not exist"))
            continue
        walker = os.walk(path) if recursive else [next(os.walk(path))]
        for folder, subfolders, names in walker:
            if "catalog.sqlite" in names and "manifest.json" in names:
                subfolders[:] = []  # a CBIRSlicer index folder: nothing in it is a case
                continue
            subfolders.sort()
            dicom_here: list[str] = []
            for name in sorted(names):
                full = os.path.join(folder, name)
                if name.startswith(".") or name in _IGNORED_NAMES:
                    continue  # hidden files, including macOS "._case.nii.gz" resource forks, are never volumes
                if volume_suffix(name):
                    result.cases.append(CaseSource(path=full))
                elif name.lower().endswith(_IGNORED_SUFFIXES):
                    continue
                elif is_dicom_file(full):
                    dicom_here.append(full)
                else:
                    result.skipped.append((full, "unsupported format"))
            if dicom_here:
                series = _series_in_folder(folder)
                result.cases.extend(series)
                # GDCM silently leaves out files it cannot parse as DICOM images: say so rather than lose them.
                in_series = {os.path.normpath(f) for case in series for f in case.files}
                lost = [f for f in dicom_here if os.path.normpath(f) not in in_series]
                result.skipped.extend((f, "not a readable DICOM image") for f in lost)
    return result


def read_case(source: CaseSource) -> Volume:
    """Read the volume a CaseSource points at."""
    if source.series_uid is not None:
        return read_dicom_series(source.path, source.series_uid, source.files or None)
    return read_volume_file(source.path)


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read one volume from a file, or from a folder holding exactly one DICOM series (or the one named)."""
    path = str(path)
    if not os.path.isdir(path):
        return read_volume_file(path)
    found = discover([path])
    cases = [c for c in found.cases if series_uid is None or c.series_uid == series_uid]
    if not cases:
        wanted = f"no DICOM series {series_uid}" if series_uid else "no volume files or DICOM series"
        raise EmptySourceError(path, f"holds {wanted}")
    if len(cases) > 1:
        listed = "; ".join(c.series_uid or os.path.relpath(c.path, path) for c in cases[:5])
        more = "..." if len(cases) > 5 else ""
        raise InputError(path, f"holds {len(cases)} volumes ({listed}{more}); name one file, or a series with --series UID")
    return read_case(cases[0])
