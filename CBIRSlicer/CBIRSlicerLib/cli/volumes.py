"""``cbir slices`` and ``cbir synth``: what the model sees of a volume, and a phantom to try things on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import MAX_MARGIN_MM, number, whole_number


def _slices(args: argparse.Namespace) -> int:
    """cbir slices: write what the model will see for a volume, as PNGs plus slices.json."""
    from ..imaging.intensity import choose_window, to_uint8_rgb
    from ..imaging.png import write_png
    from ..imaging.readers import read_volume
    from ..imaging.roi import RoiBox
    from ..imaging.slicing import extract_slices, make_montage, parse_layout

    roi = RoiBox.parse(args.roi_ras) if args.roi_ras else None
    layout = parse_layout(args.montage) if args.montage else None
    volume = read_volume(args.volume, series_uid=args.series)
    window = choose_window(volume, args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crop = not args.no_crop
    entries = []
    if layout:
        montage = make_montage(volume, args.axis, layout, roi, crop, args.margin_mm)
        name = f"montage_{args.axis}_{layout[0]}x{layout[1]}.png"
        write_png(to_uint8_rgb(montage.pixels, window), out / name)
        entries.append({"file": name, **montage.describe()})
    else:
        images = extract_slices(volume, args.axis, roi, crop, args.margin_mm, args.stride_mm, args.stride)
        used = set()
        for image in images:
            name = f"{args.axis}_{image.slice_index:04d}.png"
            n = 1
            while name in used:  # oblique reslicing can put two planes on one rounded index
                name = f"{args.axis}_{image.slice_index:04d}_{n}.png"
                n += 1
            used.add(name)
            write_png(to_uint8_rgb(image.pixels, window), out / name)
            entries.append({"file": name, **image.describe()})
    for entry in entries:
        entry["window"] = window.as_dict()
    with open(out / "slices.json", "w") as handle:
        json.dump(entries, handle, indent=1)
    what = "montage" if layout else f"{args.axis} image{'s' if len(entries) != 1 else ''}"
    print(f"{volume.describe()}\nwrote {len(entries)} {what} (window {window.describe()}) and slices.json to {out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    """cbir synth: write a synthetic CT-like phantom with objects at known RAS positions."""
    from ..imaging.synthetic import centered_matrix, default_blobs, render, write_volume

    shape = (args.size, args.size, max(8, args.size * 3 // 4))
    volume = render(centered_matrix(shape, (args.spacing,) * 3), shape, modality=None)
    write_volume(volume, args.path)
    print(f"wrote {volume.describe()} to {args.path}")
    for blob in default_blobs():
        print(f"  {blob.kind} of {blob.value:g} HU, radius {blob.radius:g} mm, centre RAS {list(blob.center)}")
    return 0


def register(commands) -> None:
    """The slices and synth commands."""
    slices = commands.add_parser("slices", help="write the 2D images the model sees for a volume (PNG + slices.json)")
    slices.add_argument("volume", help="volume file (NIfTI, NRRD, MHA/MHD, DICOM) or a DICOM folder")
    slices.add_argument("--out", required=True, help="output folder")
    slices.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    slices.add_argument("--roi-ras", metavar="CX,CY,CZ,SX,SY,SZ",
                        help="ROI centre and size in RAS mm, as Slicer shows them")
    stride = slices.add_mutually_exclusive_group()
    stride.add_argument("--stride-mm", type=number(0, 1000, " mm", low_open=True), help="distance between slices in mm")
    stride.add_argument("--stride", type=whole_number(1, 100_000), help="distance between slices in slices")
    slices.add_argument("--window", default="auto",
                        help="auto, percentile, soft-tissue, lung, bone, brain, or W,L (default auto)")
    slices.add_argument("--montage", metavar="RxC", help="tile R x C evenly spaced slices into one image")
    slices.add_argument("--no-crop", action="store_true", help="with an ROI, keep whole slices instead of cropping to it")
    slices.add_argument("--margin-mm", type=number(0, MAX_MARGIN_MM, " mm"), default=0.0, help="margin around the ROI crop (mm)")
    slices.add_argument("--series", help="DICOM series UID, when a folder holds several")
    slices.set_defaults(run=_slices)
    synth = commands.add_parser("synth", help="write a synthetic CT-like phantom volume to try things on")
    synth.add_argument("path", help="output file (.nii.gz, .nrrd, .mha)")
    synth.add_argument("--size", type=whole_number(8, 512), default=96, help="voxels along R and A (default 96)")
    synth.add_argument("--spacing", type=number(0.01, 100, " mm"), default=1.0, help="voxel size in mm (default 1)")
    synth.set_defaults(run=_synth)
