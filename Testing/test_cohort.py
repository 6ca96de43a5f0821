"""The synthetic cohort: deterministic cases, lesions where the ground truth says and looking like their kind,
balanced kinds, files and CSV that read back, and lesion crops that a weight-free descriptor can tell apart."""

from __future__ import annotations

import csv
import os
from collections import Counter

import numpy as np
import pytest
from volume_helpers import contains_ras

from CBIRSlicerLib.imaging import intensity, readers, slicing, synthetic
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.models.registry import create_embedder

GAP_MM = 10.0  # make_case's default clearance between lesion surfaces


def _voxel(volume, ras) -> float:
    """The stored value of the voxel nearest a RAS point."""
    i, j, k = np.round(volume.ras_to_ijk_points(ras)).astype(int)
    return float(volume.array[k, j, i])


@pytest.fixture(scope="module")
def all_kinds_cases():
    """A few cases each holding one lesion of every kind."""
    return [synthetic.make_case(f"mixed{seed}", seed, kinds=synthetic.LESION_KINDS) for seed in range(4)]


def test_same_seed_same_case_other_seed_other_case():
    a = synthetic.make_case("a", 7)
    b = synthetic.make_case("a", 7)
    c = synthetic.make_case("a", 8)
    assert np.array_equal(a.volume.array, b.volume.array) and a.lesions == b.lesions and a.anatomy == b.anatomy
    assert np.array_equal(a.volume.ijk_to_ras, b.volume.ijk_to_ras)
    assert not np.array_equal(a.volume.array, c.volume.array) and a.lesions != c.lesions
    assert a.volume.array.dtype == np.int16 and a.volume.shape_ijk == synthetic.DEFAULT_CASE_SHAPE
    assert a.volume.modality == "CT"


def test_cohort_is_deterministic_and_cases_differ():
    first = synthetic.make_cohort(5, seed=3)
    again = synthetic.make_cohort(5, seed=3)
    other = synthetic.make_cohort(5, seed=4)
    assert [c.name for c in first] == [f"case{n:03d}" for n in range(5)]
    for x, y in zip(first, again):
        assert np.array_equal(x.volume.array, y.volume.array) and x.lesions == y.lesions
    assert not np.array_equal(first[0].volume.array, other[0].volume.array)
    # Each case has its own anatomy.
    assert len({c.anatomy for c in first}) == len(first)
    assert len({c.anatomy.body_radii for c in first}) == len(first)


def test_lesions_lie_inside_the_body_clear_of_bone_and_of_each_other(all_kinds_cases):
    for case in all_kinds_cases:
        anatomy, volume = case.anatomy, case.volume
        assert len(case.lesions) == len(synthetic.LESION_KINDS)
        for n, lesion in enumerate(case.lesions):
            center = np.asarray(lesion.center)
            assert 6.0 <= lesion.radius_mm <= 13.0
            assert lesion.radius_mm / max(volume.spacing) >= 1.5  # at least 3 voxels across along every axis
            assert contains_ras(volume, center + lesion.radius_mm) and contains_ras(volume, center - lesion.radius_mm)
            assert anatomy.body_depth(center, anatomy.fat_mm) >= lesion.radius_mm
            bone = np.linalg.norm(center[:2] - np.asarray(anatomy.vertebra_center))
            assert bone >= max(anatomy.vertebra_radii) + lesion.radius_mm
            for other in case.lesions[n + 1:]:
                distance = np.linalg.norm(center - np.asarray(other.center))
                assert distance >= lesion.radius_mm + other.radius_mm + GAP_MM
            # Around the lesion there is only soft tissue or organ, never fat, air or bone (noise-free background).
            offsets = np.random.default_rng(0).normal(size=(200, 3))
            offsets *= (lesion.radius_mm + 4.0) / np.linalg.norm(offsets, axis=1, keepdims=True)
            background = synthetic.anatomy_values(center + offsets, anatomy)
            assert background.min() > 20.0 and background.max() < 80.0


def test_lesion_centres_look_like_their_kind(all_kinds_cases):
    for case in all_kinds_cases:
        volume = case.volume
        for lesion in case.lesions:
            center = np.asarray(lesion.center)
            value = _voxel(volume, center)
            # Centres sit on voxel centres, so the centre voxel is the lesion's own value (plus noise).
            assert np.allclose(volume.ijk_to_ras_points(np.round(volume.ras_to_ijk_points(center))), center, atol=1e-3)
            if lesion.kind == "enhancing":
                assert value > 150.0
            elif lesion.kind == "cyst":
                assert value < 30.0
            elif lesion.kind == "calcified":
                assert value > 500.0
            elif lesion.kind == "rim":
                walls = [_voxel(volume, center + (lesion.radius_mm - 1.5) * np.asarray(d))
                         for d in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0))]
                assert min(walls) > value + 100.0
            elif lesion.kind == "textured":
                # Heterogeneous: a wide spread of values inside, far above the pixel noise.
                ijk = np.argwhere(np.ones(volume.array.shape, bool))[:, ::-1]
                near = np.linalg.norm(volume.ijk_to_ras_points(ijk) - center, axis=1) < 0.7 * lesion.radius_mm
                inside = volume.array.reshape(-1)[near]
                assert inside.std() > 3 * case.anatomy.noise_hu and inside.mean() > 60.0


def test_rendered_voxels_are_the_analytic_case_plus_noise():
    case = synthetic.make_case("c", 11, kinds=("rim", "textured"), shape=(40, 36, 20), spacing=(3.0, 3.0, 5.0),
                               gap_mm=4.0)
    volume = case.volume
    ijk = np.argwhere(np.ones(volume.array.shape, bool))[:, ::-1]
    clean = synthetic.case_values(volume.ijk_to_ras_points(ijk), case.anatomy, case.lesions)
    residual = volume.array.reshape(-1) - clean
    assert abs(residual.mean()) < 1.0 and residual.std() == pytest.approx(case.anatomy.noise_hu, rel=0.1)


def test_a_case_stored_rotated_keeps_its_lesions_on_voxels():
    directions = synthetic.rotation(0.0, 0.0, 90.0) @ np.diag([1.0, -1.0, 1.0])
    case = synthetic.make_case("turned", 5, kinds=("enhancing", "calcified"), directions=directions)
    assert np.allclose(case.volume.directions, directions)
    for lesion in case.lesions:
        assert _voxel(case.volume, lesion.center) > (500.0 if lesion.kind == "calcified" else 150.0)
    # The same seed gives the same anatomy whichever way the grid is stored.
    assert case.anatomy == synthetic.make_case("plain", 5, kinds=("enhancing", "calcified")).anatomy


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown lesion kind"):
        synthetic.Lesion("tumour", (0.0, 0.0, 0.0), 8.0)


@pytest.mark.parametrize("n_cases, per_case, kinds", [
    (10, 1, synthetic.LESION_KINDS),
    (6, 2, ("enhancing", "cyst", "rim", "calcified")),
    (9, (1, 2), synthetic.LESION_KINDS),
])
def test_kinds_are_balanced_across_the_cohort(n_cases, per_case, kinds):
    cases = synthetic.make_cohort(n_cases, seed=1, lesions_per_case=per_case, kinds=kinds, shape=(64, 64, 32),
                                  spacing=(2.5, 2.5, 5.0))
    counts = Counter(lesion.kind for case in cases for lesion in case.lesions)
    assert set(counts) == set(kinds)
    assert max(counts.values()) - min(counts.values()) <= 1
    if isinstance(per_case, int):
        assert all(len(case.lesions) == per_case for case in cases)
    else:
        assert all(1 <= len(case.lesions) <= 2 for case in cases)


def test_write_cohort_writes_readable_volumes_and_the_ground_truth(tmp_path):
    cases = synthetic.make_cohort(3, seed=2, lesions_per_case=2)
    folder = tmp_path / "cohort"
    paths = synthetic.write_cohort(cases, str(folder))
    assert [os.path.basename(p) for p in paths] == [f"{c.name}.nii.gz" for c in cases]
    for case, path in zip(cases, paths):
        volume = readers.read_volume(path)
        assert volume.name == case.name
        assert np.array_equal(volume.array, case.volume.array)
        assert np.allclose(volume.ijk_to_ras, case.volume.ijk_to_ras, atol=1e-4)
    with open(folder / synthetic.COHORT_CSV, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == synthetic.COHORT_COLUMNS
        rows = list(reader)
    expected = [(case, lesion) for case in cases for lesion in case.lesions]
    assert len(rows) == len(expected) == 6
    for row, (case, lesion) in zip(rows, expected):
        assert os.path.isfile(folder / row["path"]) and row["case"] == case.name and row["kind"] == lesion.kind
        center = [float(row[f"center_{axis}"]) for axis in "ras"]
        assert np.allclose(center, lesion.center, atol=1e-3)
        assert float(row["radius_mm"]) == pytest.approx(lesion.radius_mm, abs=1e-3)
    truth = synthetic.read_cohort(str(folder / synthetic.COHORT_CSV))
    assert list(truth) == [c.name for c in cases]
    for case in cases:
        read_back = truth[case.name]
        assert [t.kind for t in read_back] == [x.kind for x in case.lesions]
        assert np.allclose([t.center for t in read_back], [x.center for x in case.lesions], atol=1e-3)


def _lesion_crops(cases, box_per_radius: float):
    """uint8 RGB axial crops, one per lesion, through its centre, of a box ``box_per_radius`` times its radius."""
    images, kinds = [], []
    for case in cases:
        window = intensity.choose_window(case.volume)
        for lesion in case.lesions:
            roi = RoiBox(lesion.center, (box_per_radius * lesion.radius_mm,) * 3)
            crop = slicing.nearest_slice(slicing.extract_slices(case.volume, "axial", roi=roi), lesion.center)
            images.append(intensity.to_uint8_rgb(crop.pixels, window))
            kinds.append(lesion.kind)
    return images, np.array(kinds)


@pytest.mark.parametrize("kinds, box_per_radius", [
    (synthetic.LESION_KINDS, 2.5),  # a tight box around the lesion
    (synthetic.LESION_KINDS, 5.0),  # 2.5 radii either side: more of the surroundings in every crop
    (synthetic.ALL_LESION_KINDS, 2.5),  # with the hard "textured" kind too
], ids=["default-kinds-tight-box", "default-kinds-wide-box", "all-kinds-tight-box"])
def test_a_lesion_query_finds_a_lesion_of_the_same_kind(kinds, box_per_radius):
    """The point of the cohort: the nearest other lesion (cosine, handcrafted descriptor) is mostly of the same kind."""
    cases = synthetic.make_cohort(16, seed=0, kinds=kinds)
    images, found_kinds = _lesion_crops(cases, box_per_radius)
    vectors = create_embedder("handcrafted").embed_images(images)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    same_kind = found_kinds[similarity.argmax(axis=1)] == found_kinds
    # Chance is about 1 / len(kinds): 25 % or 20 %.
    assert same_kind.mean() >= 0.75, f"same-kind nearest neighbour for {same_kind.mean():.0%} of queries"


def test_the_index_holds_crops_centred_on_every_lesion():
    """Blob crops (index_items) put every lesion, of every kind, at the centre of a crop on the slice through it."""
    from CBIRSlicerLib.index.items import IndexSettings, volume_items

    settings = IndexSettings(stride_mm=4.0, tile_sizes_mm=[])
    for case in synthetic.make_cohort(8, seed=2):
        items = volume_items(case.volume, settings).items
        blobs = np.array([item.ras for item in items if item.kind == "blob"])
        assert {item.size_mm for item in items if item.kind == "blob"} == {16.0, 24.0, 32.0}
        for lesion in case.lesions:
            on_slice = blobs[np.abs(blobs[:, 2] - lesion.center[2]) <= 2.0]
            offset = np.linalg.norm(on_slice[:, :2] - np.array(lesion.center[:2]), axis=1).min()
            assert offset <= 2.9, f"{case.name}: nearest blob crop {offset:.1f} mm from its {lesion.kind} lesion"
