"""ROI selection and crops, strides and montages, checked against voxel positions computed independently."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_case

from CBIRSlicerLib.errors import GeometryError, ParameterError
from CBIRSlicerLib.imaging import slicing, synthetic
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.imaging.volume import Volume


@pytest.fixture(scope="module")
def phantom():
    canonical, _, _, blobs = make_case("identity")
    return canonical, blobs


def _voxel_planes_inside(volume, axis_index, low, high):
    """Voxel indices along one RAS axis whose plane position lies in [low, high] (canonical volumes only)."""
    scale, offset = volume.ijk_to_ras[axis_index, axis_index], volume.ijk_to_ras[axis_index, 3]
    positions = scale * np.arange(volume.shape_ijk[axis_index]) + offset
    return set(np.flatnonzero((positions >= low - 1e-9) & (positions <= high + 1e-9)).tolist())


@pytest.mark.parametrize("axis, ras_axis", [("axial", 2), ("coronal", 1), ("sagittal", 0)])
def test_roi_selects_exactly_the_slices_it_spans_cropped_to_it(phantom, axis, ras_axis):
    volume, blobs = phantom
    blob = blobs[0]
    roi = RoiBox(blob.center, (11.0, 9.0, 7.0))
    crops = slicing.extract_slices(volume, axis, roi)
    expected = _voxel_planes_inside(volume, ras_axis, roi.low[ras_axis], roi.high[ras_axis])
    assert {c.slice_index for c in crops} == expected and len(crops) == len(expected)
    full = {s.slice_index: s for s in slicing.extract_slices(volume, axis)}
    in_plane = [a for a in range(3) if a != ras_axis]
    for crop in crops:
        assert crop.kind == "crop"
        r0, c0, r1, c1 = crop.box
        assert np.array_equal(crop.pixels, full[crop.slice_index].pixels[r0:r1, c0:c1])
        low, high = crop.bounds_ras()
        # Pixel centres inside the ROI, and no pixel centre of the ROI left out (1 mm pixels).
        assert np.all(low[in_plane] >= roi.low[in_plane] - 1e-6) and np.all(high[in_plane] <= roi.high[in_plane] + 1e-6)
        assert np.all(low[in_plane] - 1.0 < roi.low[in_plane]) and np.all(high[in_plane] + 1.0 > roi.high[in_plane])
    # The crop nearest the blob centre shows the blob there.
    middle = slicing.nearest_slice(crops, blob.center)
    row, col = middle.ras_to_pixel(blob.center)
    assert middle.pixels[round(row), round(col)] == pytest.approx(blob.value, abs=30)


def test_roi_on_a_reoriented_twin_gives_the_same_crops():
    canonical, twin, _, blobs = make_case("sagittal-stored")
    roi = RoiBox(blobs[1].center, (12.0, 12.0, 12.0))
    for axis in slicing.AXES:
        a = slicing.extract_slices(canonical, axis, roi, margin_mm=2.0)
        b = slicing.extract_slices(twin, axis, roi, margin_mm=2.0)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert np.allclose(x.ras, y.ras) and np.allclose(x.pixels, y.pixels, atol=1e-3)


def test_margin_grows_the_crop_but_not_the_slices(phantom):
    volume, blobs = phantom
    roi = RoiBox(blobs[0].center, (10.0, 10.0, 10.0))
    tight = slicing.extract_slices(volume, "axial", roi)
    wide = slicing.extract_slices(volume, "axial", roi, margin_mm=3.0)
    assert [s.slice_index for s in tight] == [s.slice_index for s in wide]
    assert wide[0].pixels.shape == (tight[0].pixels.shape[0] + 6, tight[0].pixels.shape[1] + 6)


def test_uncropped_roi_keeps_whole_slices(phantom):
    volume, blobs = phantom
    roi = RoiBox(blobs[0].center, (10.0, 10.0, 4.0))
    images = slicing.extract_slices(volume, "axial", roi, crop=False)
    assert len(images) == 4 and all(i.kind == "slice" and i.pixels.shape == (36, 40) for i in images)


def test_roi_thinner_than_a_slice_gives_the_nearest_slice(phantom):
    volume, _ = phantom
    images = slicing.extract_slices(volume, "axial", RoiBox((0.0, 0.0, 0.2), (10.0, 10.0, 0.5)))
    assert len(images) == 1 and images[0].ras[2] == pytest.approx(0.5)


def test_roi_outside_the_volume_is_an_error(phantom):
    volume, _ = phantom
    with pytest.raises(GeometryError, match="outside"):
        slicing.extract_slices(volume, "axial", RoiBox((0.0, 0.0, 200.0), (10.0, 10.0, 10.0)))
    with pytest.raises(GeometryError, match="outside"):
        slicing.extract_slices(volume, "axial", RoiBox((300.0, 0.0, 0.0), (10.0, 10.0, 10.0)))


def test_roi_partly_outside_is_clipped_to_the_volume(phantom):
    volume, _ = phantom
    images = slicing.extract_slices(volume, "axial", RoiBox((19.5, 0.0, 13.5), (10.0, 10.0, 10.0)))
    assert len(images) == 6  # z from 8.5 to 18.5 meets the planes 8.5 ... 13.5
    assert images[0].pixels.shape == (10, 6)  # R from 14.5 to 24.5 meets the columns 14.5 ... 19.5


def test_stride_in_mm_and_in_slices():
    matrix = synthetic.centered_matrix((16, 16, 20), (1.0, 1.0, 2.5))
    volume = synthetic.render(matrix, (16, 16, 20), blobs=[], body_radii=(6.0, 6.0, 20.0))
    every_5mm = slicing.extract_slices(volume, "axial", stride_mm=5.0)
    assert [s.slice_index for s in every_5mm] == list(range(0, 20, 2))
    assert np.allclose(np.diff([s.ras[2] for s in every_5mm]), 5.0)
    assert [s.slice_index for s in slicing.extract_slices(volume, "axial", stride=3)] == list(range(0, 20, 3))
    assert len(slicing.extract_slices(volume, "axial", stride_mm=0.5)) == 20  # never finer than the voxels
    with pytest.raises(ParameterError):
        slicing.extract_slices(volume, "axial", stride_mm=-1.0)
    with pytest.raises(ParameterError):
        slicing.extract_slices(volume, "axial", stride=0)


def test_montage_tiles_evenly_spaced_slices_row_by_row(phantom):
    volume, _ = phantom
    montage = slicing.make_montage(volume, "axial", (2, 3))
    assert montage.pixels.shape == (2 * 36, 3 * 40)
    assert [t.slice_index for t in montage.tiles] == [0, 5, 11, 16, 22, 27]  # linspace(0, 27, 6), rounded
    full = {s.slice_index: s.pixels for s in slicing.extract_slices(volume, "axial")}
    for n, tile in enumerate(montage.tiles):
        r, c = divmod(n, 3)
        assert np.array_equal(montage.pixels[r * 36:(r + 1) * 36, c * 40:(c + 1) * 40], full[tile.slice_index])
    assert montage.describe()["kind"] == "montage" and len(montage.describe()["tiles"]) == 6


def test_montage_of_an_roi_with_fewer_slices_than_tiles_leaves_tiles_empty(phantom):
    volume, blobs = phantom
    roi = RoiBox(blobs[0].center, (8.0, 8.0, 2.0))  # z from 2 to 4 spans the planes at 2.5 and 3.5
    montage = slicing.make_montage(volume, "axial", (2, 2), roi)
    assert len(montage.tiles) == 2
    h, w = montage.tiles[0].pixels.shape
    assert (h, w) == (8, 8)
    assert np.all(montage.pixels[h:, :] == volume.array.min())
    assert montage.pixels[:h, :].max() > 250


def test_parse_layout():
    assert slicing.parse_layout("4x4") == (4, 4) and slicing.parse_layout("2X3") == (2, 3)
    for bad in ("4", "0x3", "axb", "2x3x4"):
        with pytest.raises(ParameterError):
            slicing.parse_layout(bad)


@pytest.mark.parametrize("kind", ["constant", "nan", "inf", "all-nan"])
def test_degenerate_voxels_never_crash(kind):
    array = np.full((6, 7, 8), 5.0, np.float32)
    if kind == "nan":
        array[2, 3, 4] = np.nan
        array[0] = 100.0
    if kind == "inf":
        array[1, 1, 1], array[2, 2, 2] = np.inf, -np.inf
    if kind == "all-nan":
        array[:] = np.nan
    volume = Volume.from_array(array, np.diag([1.0, 1.0, 2.0, 1.0]))
    for axis in slicing.AXES:
        images = slicing.extract_slices(volume, axis)
        assert all(np.all(np.isfinite(i.pixels)) for i in images)
    montage = slicing.make_montage(volume, "axial", (2, 2))
    assert np.all(np.isfinite(montage.pixels))
