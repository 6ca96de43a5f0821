"""Real volumes for the real-anatomy benchmark, got the same way on any machine.

* Abdominal CT with 41 organ labels (TotalSegmentator test reference): used in place from the
  shared data folder, ``../shared/data`` beside the repository root (or above it), or
  ``$CBIR_SHARED_DATA``.
* Head CT (InVesalius ``Cranium.inv3``, Debian ``invesalius-examples``) and brain MR (Colin27
  ``ch2.nii.gz`` with the AAL atlas, Debian ``mricron-data``): fetched with ``apt-get download``
  into a cache folder (``~/.cache/cbirslicer/debian``, ``$CBIR_DEBIAN_CACHE`` or ``--cache``),
  unpacked with ``dpkg-deb -x``; the ``.inv3`` project is converted to NIfTI once.

A missing package or file is an error, never a skip: CI must have the data it claims to test.

    python benchmarks/real_data.py [--cache DIR]     # fetch, convert, print what is where
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import plistlib
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("invesalius-examples", "mricron-data")
CRANIUM = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
TEMPLATES = "usr/share/mricron/templates"
ABDOMEN = "real/abdomen-ct"
ABDOMEN_LABELLED_K = (82, 111)  # only these slices of the abdominal CT are labelled (README of the shared data)


class RealDataError(RuntimeError):
    """Real data that cannot be found, fetched or read; the message names the file or package."""


@dataclass
class RealVolume:
    """One real volume of the benchmark: what it is, where its image and labels are, the labels' names."""

    name: str
    modality: str  # CT or MR
    body_region: str  # head or abdomen
    image: str
    labels: str | None = None
    names: dict[int, str] = field(default_factory=dict)
    labelled_k: tuple[int, int] | None = None  # slab of the labels' k index that is labelled (inclusive)
    source: str = ""


def shared_data_dir() -> Path:
    """The shared data folder: $CBIR_SHARED_DATA, else ``shared/data`` beside the repository root or a folder above."""
    override = os.environ.get("CBIR_SHARED_DATA")
    if override:
        if not Path(override, ABDOMEN).is_dir():
            raise RealDataError(f"CBIR_SHARED_DATA={override}: no {ABDOMEN} folder in it")
        return Path(override)
    for parent in [REPO.parent, *REPO.parent.parents][:3]:
        candidate = parent / "shared" / "data"
        if (candidate / ABDOMEN).is_dir():
            return candidate
    raise RealDataError(f"no shared/data/{ABDOMEN} beside {REPO} or above it; set CBIR_SHARED_DATA to the folder")


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the Debian packages and converted volumes are kept."""
    folder = Path(cache or os.environ.get("CBIR_DEBIAN_CACHE") or Path.home() / ".cache" / "cbirslicer" / "debian")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fetch_debian(cache: str | os.PathLike | None = None) -> Path:
    """Download (once) and unpack the Debian data packages; returns the folder they are unpacked into."""
    folder = cache_dir(cache)
    root = folder / "root"
    for package in PACKAGES:
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if not debs:
            done = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
            debs = sorted(folder.glob(f"{package}_*.deb"))
            if done.returncode != 0 or not debs:
                raise RealDataError(f"apt-get download {package} failed in {folder} (run apt-get update first?): "
                                    f"{(done.stderr or done.stdout).strip()[-400:]}")
        marker = root / f".{debs[-1].name}.unpacked"
        if not marker.exists():
            root.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RealDataError(f"dpkg-deb -x {debs[-1]} failed: {done.stderr.strip()[-400:]}")
            marker.touch()
    for needed in (CRANIUM, f"{TEMPLATES}/ch2.nii.gz", f"{TEMPLATES}/aal.nii.gz", f"{TEMPLATES}/aal.nii.txt"):
        if not (root / needed).is_file():
            raise RealDataError(f"{root / needed}: missing after unpacking {', '.join(PACKAGES)}")
    return root


def read_inv3(path: str | os.PathLike):
    """An InVesalius project (.inv3: gzipped tar of main.plist + matrix.dat) as a SimpleITK image with LPS geometry.

    matrix.dat is a numpy memmap [slice, row, column] of ``dtype`` and ``shape`` from main.plist. InVesalius stores
    axial slices with the rows flipped for VTK (row 0 posterior: the head rest shows at the top), columns from the
    patient's right to left and slices from inferior to superior; checked on PNGs of the axial, coronal and
    sagittal mid-planes (the vault is superior, the face anterior).
    """
    import SimpleITK as sitk

    try:
        with tarfile.open(fileobj=gzip.open(path)) as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
            matrix = main["matrix"]
            raw = archive.extractfile(members[matrix["filename"]]).read()
    except (OSError, KeyError, tarfile.TarError, plistlib.InvalidFileException) as error:
        raise RealDataError(f"{path}: not an InVesalius project ({type(error).__name__}: {error})") from None
    shape = tuple(int(n) for n in matrix["shape"])
    dtype = np.dtype(matrix["dtype"])
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise RealDataError(f"{path}: matrix.dat holds {len(raw)} bytes, main.plist says {shape} of {dtype}")
    if int(main.get("orientation", 1)) != 1:
        raise RealDataError(f"{path}: only axial InVesalius projects are supported (orientation {main.get('orientation')})")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing = [float(v) for v in main["spacing"]]
    image.SetSpacing(spacing)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # i to the left, j anterior, k superior (LPS)
    size = np.array(image.GetSize(), float)
    # The centre of the volume at the origin of RAS: the project keeps no patient position.
    centre = (size - 1) / 2 * np.array(spacing) * np.array([1.0, -1.0, 1.0])
    image.SetOrigin(tuple(-centre))
    return image


def convert_cranium(root: Path, out: Path) -> Path:
    """Cranium.inv3 as NIfTI (once)."""
    import SimpleITK as sitk

    target = out / "head_ct.nii.gz"
    if not target.exists():
        out.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(read_inv3(root / CRANIUM), str(target.with_suffix(".tmp.nii.gz")))
        os.replace(target.with_suffix(".tmp.nii.gz"), target)
    return target


def aal_names(path: Path) -> dict[int, str]:
    """AAL region names from aal.nii.txt ('1 Precentral_L 2001' per line)."""
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise RealDataError(f"{path}: no region names")
    return names


VOLUMES = ("abdomen_ct", "head_ct", "brain_mr")


def abdomen_ct() -> RealVolume:
    """The abdominal CT of the shared data folder, with its organ labels."""
    shared = shared_data_dir() / ABDOMEN
    for needed in ("abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz", "labels.json"):
        if not (shared / needed).is_file():
            raise RealDataError(f"{shared / needed}: missing from the shared data")
    names = {int(k): v for k, v in json.loads((shared / "labels.json").read_text()).items()}
    return RealVolume("abdomen_ct", "CT", "abdomen", str(shared / "abdomen_ct.nii.gz"), str(shared / "abdomen_ct_labels.nii.gz"),
                      names, ABDOMEN_LABELLED_K, "TotalSegmentator test reference (Apache-2.0), labels are model output")


def prepare(cache: str | os.PathLike | None = None, names=VOLUMES) -> dict[str, RealVolume]:
    """The real volumes asked for (default all: abdomen_ct, head_ct, brain_mr), fetched and converted as needed."""
    unknown = set(names) - set(VOLUMES)
    if unknown:
        raise RealDataError(f"unknown real volumes {sorted(unknown)}; known: {', '.join(VOLUMES)}")
    out = {"abdomen_ct": abdomen_ct()} if "abdomen_ct" in names else {}
    if {"head_ct", "brain_mr"} & set(names):
        root = fetch_debian(cache)
        templates = root / TEMPLATES
        if "head_ct" in names:
            out["head_ct"] = RealVolume("head_ct", "CT", "head", str(convert_cranium(root, cache_dir(cache) / "converted")),
                                        source="Debian invesalius-examples Cranium.inv3 (GPL-2)")
        if "brain_mr" in names:
            out["brain_mr"] = RealVolume("brain_mr", "MR", "head", str(templates / "ch2.nii.gz"), str(templates / "aal.nii.gz"),
                                         aal_names(templates / "aal.nii.txt"),
                                         source="Debian mricron-data ch2 + AAL (BSD-3 / atlas terms)")
    return {name: out[name] for name in VOLUMES if name in out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="folder for the .deb files and converted volumes")
    args = parser.parse_args()
    for volume in prepare(args.cache).values():
        print(f"{volume.name}: {volume.modality} {volume.body_region}, {volume.image}"
              + (f", labels {volume.labels} ({len(volume.names)} names)" if volume.labels else ""))


if __name__ == "__main__":
    main()
