"""The ``cbir`` command line: the slices.json contract, montages, and one-line errors (never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from volume_helpers import read_png

from CBIRSlicerLib import cli
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.intensity import Window, to_uint8_rgb
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.slicing import extract_slices


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "phantom.nii.gz"
    assert cli.main(["synth", str(path), "--size", "48"]) == 0
    return path


def test_slices_json_follows_the_contract_and_pngs_hold_the_windowed_pixels(sample, tmp_path):
    assert cli.main(["slices", str(sample), "--out", str(tmp_path), "--axis", "coronal", "--window", "400,40"]) == 0
    entries = json.loads((tmp_path / "slices.json").read_text())
    volume = read_volume(sample)
    assert len(entries) == volume.shape_ijk[1]
    first = entries[0]
    assert {"file", "axis", "slice_index", "ras"} <= set(first)
    assert first["file"] == f"coronal_{first['slice_index']:04d}.png" and first["axis"] == "coronal"
    images = extract_slices(volume, "coronal")
    for entry, image in zip(entries, images):
        assert entry["slice_index"] == image.slice_index
        assert np.allclose(entry["ras"], image.ras, atol=1e-3)
    middle = entries[len(entries) // 2]
    png = read_png(tmp_path / middle["file"])
    expected = to_uint8_rgb(images[len(entries) // 2].pixels, Window.from_width_level(400, 40))
    assert np.array_equal(png, expected)


def test_roi_and_stride(sample, tmp_path):
    blob = synthetic.default_blobs()[0]
    roi = ",".join(str(v) for v in [*blob.center, 16, 16, 12])
    assert cli.main(["slices", str(sample), "--out", str(tmp_path), "--roi-ras", roi, "--stride-mm", "2"]) == 0
    entries = json.loads((tmp_path / "slices.json").read_text())
    assert [e["kind"] for e in entries] == ["crop"] * 6  # 12 mm of 1 mm slices, every 2 mm
    assert all(abs(e["ras"][2] - blob.center[2]) <= 6.0 for e in entries)
    assert read_png(tmp_path / entries[0]["file"]).shape == (16, 16, 3)


def test_montage(sample, tmp_path):
    assert cli.main(["slices", str(sample), "--out", str(tmp_path), "--montage", "3x4"]) == 0
    entries = json.loads((tmp_path / "slices.json").read_text())
    assert len(entries) == 1 and entries[0]["file"] == "montage_axial_3x4.png"
    assert len(entries[0]["tiles"]) == 12
    assert read_png(tmp_path / entries[0]["file"]).shape == (3 * 48, 4 * 48, 3)


def _run_cbir(*args):
    return subprocess.run([sys.executable, "-m", "CBIRSlicerLib.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "missing.nii.gz", "does not exist"),
    (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "unsupported format"),
    (lambda d: (d / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage") and d / "bad.nii.gz", "cannot be read"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no volume"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, make, needle):
    path = make(tmp_path)
    result = _run_cbir("slices", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("cbir: error: ") and str(path) in lines[0] and needle in lines[0]


def test_bad_options_are_one_line_errors(sample, tmp_path):
    for args, needle in ((["--roi-ras", "1,2,3"], "six"), (["--window", "sharp"], "window"), (["--montage", "4"], "RxC"),
                         (["--roi-ras", "0,0,500,10,10,10"], "outside")):
        result = _run_cbir("slices", str(sample), "--out", str(tmp_path), *args)
        assert result.returncode == 1 and needle in result.stderr and "Traceback" not in result.stderr


def test_search_offers_the_match_intents_the_query_knows():
    """`cbir search --match` lists the intents without importing the query module; they must stay the same."""
    from CBIRSlicerLib.cli import search as search_command
    from CBIRSlicerLib.cli.program import build_parser
    from CBIRSlicerLib.retrieval.queries import MATCH_INTENTS

    assert tuple(search_command.MATCH_CHOICES) == tuple(MATCH_INTENTS)
    parsed = build_parser().parse_args(["search", "--index", "index", "--volume", "v.nii.gz", "--match", "finding"])
    assert parsed.match == "finding"
    assert build_parser().parse_args(["search", "--index", "index", "--volume", "v.nii.gz"]).match == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--index", "index", "--volume", "v.nii.gz", "--match", "organ"])
