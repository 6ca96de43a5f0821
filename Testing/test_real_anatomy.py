"""The real-anatomy benchmark in small: pseudo-patients of the shared abdominal CT, their bookkeeping, a few organ queries.

The abdominal CT comes from the shared data folder (benchmarks/real_data.py finds it); without it these tests
skip, saying so. Numbers asserted for retrieval are floors today's handcrafted model passes (docs/benchmarks.md,
"Real anatomy"); copies of one real patient are easier than other patients.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import pseudo_patients
import real_anatomy
import real_data

COMPACT = ("spleen", "kidney_left", "kidney_right", "vertebrae_L1", "vertebrae_T12", "aorta")


@pytest.fixture(scope="module")
def abdomen():
    try:
        return real_data.abdomen_ct()
    except real_data.RealDataError as error:
        pytest.skip(f"real abdominal CT not available: {error}")


@pytest.fixture(scope="module")
def bench(abdomen, tmp_path_factory):
    """Three copies of the abdominal CT and two phantoms, indexed at coarse settings (fewer items, same code path)."""
    config = {"copies": 3, "phantoms": 2, "inplane_mm": {"abdomen_ct": None}, "volumes": ["abdomen_ct"],
              "brain_regions": 0, "settings": {"stride_mm": 9.0, "tile_overlap": 0.0, "blobs_per_slice": 4}}
    return real_anatomy.build(str(tmp_path_factory.mktemp("real")), config, seed=3)


def _read(path):
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    return image, sitk.GetArrayFromImage(image)


def _ras_of_voxels(image, kji: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = kji[:, ::-1].astype(float) * np.array(image.GetSpacing()) @ direction.T + np.array(image.GetOrigin())
    return lps * pseudo_patients.FLIP


def test_copies_are_as_strong_as_asked(bench, abdomen):
    source, _ = _read(abdomen.image)
    for copy in bench.copies:
        spec = pseudo_patients.CopySpec(**copy.spec)
        patient = pseudo_patients.PseudoPatient.load(copy.transform)
        assert max(abs(v) for v in spec.rotation_deg) >= 3 and max(abs(v) for v in spec.rotation_deg) <= 10
        assert max(abs(v) for v in spec.translation_mm) >= 10 and max(abs(v) for v in spec.translation_mm) <= 30
        assert all(0.9 <= s <= 1.1 for s in spec.scale) and 1.0 <= spec.slice_mm <= 5.0 and 10 <= spec.noise_sd <= 30
        assert pseudo_patients.elastic_rms_mm(patient) >= 7.5  # 8-10 mm over the copy's box, a little less over the margin
        image, _ = _read(copy.image)
        assert image.GetSpacing()[2] == pytest.approx(spec.slice_mm)
        # The body axis is cropped by 20-35 % of the source's box as the affine part moves it.
        low, high = pseudo_patients._bounds_lps(source)
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
        inverse = np.linalg.inv(patient.affine_lps)
        moved = corners @ inverse[:3, :3].T + inverse[:3, 3]
        extent = moved[:, 2].max() - moved[:, 2].min()
        assert (image.GetSize()[2] - 1) * image.GetSpacing()[2] <= 0.8 * extent + 1e-6


def test_labels_follow_the_transform_exactly(bench, abdomen):
    """Every sampled copy voxel's label is the source label at the point its transform names (nearest voxel)."""
    source, source_labels = _read(abdomen.labels)
    copy = bench.copies[0]
    image, labels = _read(copy.labels)
    patient = pseudo_patients.PseudoPatient.load(copy.transform)
    rng = np.random.default_rng(0)
    inside = np.argwhere(labels > 0)
    kji = np.concatenate([inside[rng.choice(len(inside), 300, replace=False)],
                          np.stack([rng.integers(0, n, 300) for n in labels.shape], -1)])
    ras = _ras_of_voxels(image, kji)
    there = patient.copy_to_source(ras)
    agree = []
    for point, (k, j, i) in zip(there, kji):
        index = source.TransformPhysicalPointToContinuousIndex(tuple(point * pseudo_patients.FLIP))
        nearest = [int(np.floor(v + 0.5)) for v in index]
        if any(abs(v - np.floor(v) - 0.5) < 1e-3 for v in index):
            continue  # a tie between two voxels: either may be taken
        outside = any(not 0 <= nearest[n] < source.GetSize()[n] for n in range(3))
        agree.append((0 if outside else source_labels[nearest[2], nearest[1], nearest[0]]) == labels[k, j, i])
    assert len(agree) > 550 and all(agree)
    # The inverse is exact to the Newton tolerance.
    assert np.abs(patient.source_to_copy(there) - ras).max() < 1e-3


def test_mapped_organ_centroids_match_the_warped_label_maps(bench, abdomen):
    """An organ's source voxels carried into the copy average where the copy's warped label map has it (within 2 voxels)."""
    source, source_labels = _read(abdomen.labels)
    by_name = {name: label for label, name in abdomen.names.items()}
    for copy in bench.copies:
        image, labels = _read(copy.labels)
        patient = pseudo_patients.PseudoPatient.load(copy.transform)
        for name in COMPACT:
            label = by_name[name]
            mine = np.argwhere(labels == label)
            assert len(mine) > 0, f"{name} missing from {copy.labels}"
            theirs = np.argwhere(source_labels == label)[::3]
            mapped = patient.source_to_copy(_ras_of_voxels(source, theirs))
            ijk = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p * pseudo_patients.FLIP)) for p in mapped])
            kept = np.all((ijk > -0.5) & (ijk < np.array(image.GetSize()) - 0.5), axis=1)  # what the copy's field of view holds
            mapped = mapped[kept].mean(axis=0)
            centroid = _ras_of_voxels(image, mine).mean(axis=0)
            assert np.linalg.norm(mapped - centroid) <= 2 * max(image.GetSpacing()), (name, copy.image)


@pytest.mark.slow
def test_metrics_score_a_perfect_answer_as_perfect(bench):
    """A searcher that answers each query with the other copy's true place scores 0 mm and mostly inside the organ."""

    class Oracle:
        def __init__(self, real):
            self.real, self.index = real, real.index
            self.copies = {os.path.abspath(c.image): c for c in bench.copies}
            self.patients = {c.number: pseudo_patients.PseudoPatient.load(c.transform) for c in bench.copies}

        def search(self, query, k=10, filters=None, method="maxsim"):
            mine = self.copies[query.spec.volume]
            if query.mode != "roi":
                return self.real.search(query, k=k, filters=filters, method=method)
            other = bench.copies[(mine.number + 1) % len(bench.copies)]
            centre = np.array(query.roi.center)
            truth = self.patients[other.number].source_to_copy(self.patients[mine.number].copy_to_source(centre))
            match = SimpleNamespace(spot=tuple(truth), focus_ras=tuple(truth))
            return SimpleNamespace(results=[SimpleNamespace(source=os.path.abspath(other.image), best_match=match)])

        def place(self, query, answer, limit=None):
            return answer

    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.search import Searcher

    outcome = real_anatomy.run(bench, Oracle(Searcher(Index.open(bench.index_folder))))
    records = outcome["records"]
    assert len(records) >= 60
    assert all(r["error_mm_at_1"] == pytest.approx(0.0, abs=0.01) for r in records)
    large = [r["inside_at_1"] for r in records if r["large"]]
    assert np.mean(large) >= 0.85  # the true place is inside the warped organ but for nearest-neighbour edges


@pytest.mark.slow
def test_organ_queries_find_the_same_patient(bench):
    """Today's handcrafted baseline: the top case of organ queries is another copy of the abdominal CT, not a phantom."""
    outcome = real_anatomy.run(bench, place_top=1)
    summary = real_anatomy.summarise(outcome)["summary"]
    large = summary["abdomen_ct (large)"]
    assert large["queries"] >= 20
    assert large["same_patient_at_1"] >= 0.7
    assert large["first_same_patient_in_top10"] == 1.0
    assert summary["case ranking (volume queries)"]["top_case_same_kind"] == 1.0
    print("organ queries, coarse index:", {k: large[k] for k in ("queries", "inside_at_1", "median_error_mm_at_1")})
    # Placed (the first result, as the benchmark scores): mostly inside, millimetres off (docs/benchmarks.md has the
    # figures of the product's index settings; these copies are indexed coarser, seed 3).
    assert large["inside_at_1"] >= 0.75 and large["median_error_mm_at_1"] <= 8.0


def test_a_placed_organ_match_shows_the_same_anatomy(bench, abdomen):
    """An organ box placed into another copy: the match is the registered place and says so (best_match.shown)."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import roi_query
    from CBIRSlicerLib.retrieval.search import Searcher

    copy = bench.copies[0]
    labels = real_anatomy._LabelMap(copy.labels)
    label = {name: n for n, name in abdomen.names.items()}["kidney_right"]
    query = next(q for q in real_anatomy.queries_of(bench, copy, labels, pseudo_patients.PseudoPatient.load(copy.transform),
                                                   read_volume(copy.image)) if q["label"] == label)
    searcher = Searcher(Index.open(bench.index_folder))
    asked = roi_query(read_volume(copy.image), query["roi"], "axial", searcher.index)
    placed = searcher.place(asked, searcher.search(asked, k=2), limit=1)
    best = placed.results[0].best_match
    assert best.shown == "anatomy" and best.spot == best.placed_ras
    assert placed.results[1].best_match.shown is None  # past the limit: not placed


def test_the_index_infers_modality_and_body_region(bench):
    """NIfTI copies say nothing of themselves: the catalog holds CT / ABDOMEN inferred from the image."""
    kinds = real_anatomy.catalog_kinds(bench)
    assert kinds["cases"] == 3 and kinds["right"] == 3 and kinds["sources"] == ["inferred"]


def test_body_region_and_modality_of_every_real_volume(abdomen):
    """The head CT and brain MR come from Debian packages (.ci/run fetches them): missing, this fails rather than skips."""
    from CBIRSlicerLib.imaging.body_region import fill_in, infer
    from CBIRSlicerLib.imaging.readers import read_volume

    volumes = {"abdomen_ct": abdomen, **real_data.prepare(names=("head_ct", "brain_mr"))}
    for volume in volumes.values():
        found = infer(read_volume(volume.image))
        assert (found.modality, found.body_part) == (volume.modality, volume.body_region.upper()), (volume.name, found)
    told = read_volume(abdomen.image)
    told.modality, told.body_part = "CT", "PELVIS"  # what a DICOM header says wins
    kept = fill_in(told)
    assert told.body_part == "PELVIS" and (kept["modality_source"], kept["body_part_source"]) == ("dicom", "dicom")
    assert kept["regions"] == ["PELVIS"] and "body_part_dicom" not in kept and "modality_image" not in kept
    # the body coordinate is the image's, whatever the header says: the abdominal CT's levels, not the pelvis band's
    assert kept["body_axis"]["modality"] == "CT" and 500 < kept["levels"][0] < 520 and 720 < kept["levels"][1] < 900


def test_cli_queries_by_segment(bench, abdomen, capsys):
    """cbir search --roi-mask LABELS --label N queries the box around segment N, as --roi-ras with that box would (the
    segment's voxels then weight the placement, off here)."""
    import json

    from CBIRSlicerLib import cli
    from CBIRSlicerLib.imaging.roi import roi_of_label

    copy = bench.copies[0]
    label = {name: n for n, name in abdomen.names.items()}["kidney_left"]
    # Without placement: its registration sums in ITK threads, so two runs may differ by a micrometre (test_placement.py).
    common = ["search", "--index", bench.index_folder, "--volume", copy.image, "-k", "2", "--json", "--no-place"]
    assert cli.main([*common, "--roi-mask", copy.labels, "--label", str(label)]) == 0
    by_mask = json.loads(capsys.readouterr().out)
    box = roi_of_label(copy.labels, label)
    assert cli.main([*common, "--roi-ras=" + ",".join(str(v) for v in box.as_list())]) == 0
    by_box = json.loads(capsys.readouterr().out)
    assert by_mask["results"] == by_box["results"] and by_mask["query"]["mode"] == "roi"
    assert by_mask["query"]["segment"] == f"label {label}" and "segment" not in by_box["query"]
    assert 20 < min(box.size) and max(box.size) < 120  # a kidney, not the whole volume
    assert cli.main([*common, "--roi-mask", copy.labels, "--label", "250"]) != 0
    assert "holds no voxel of label 250" in capsys.readouterr().err


def test_a_thin_slab_is_placed_at_its_own_level(bench, abdomen):
    """A 60 mm slab of the real CT around an organ is registered into a copy at the organ's level: its level is searched
    (registration.level_starts), where the centres of mass of slab and whole abdomen lie a hand's breadth apart."""
    from CBIRSlicerLib.imaging import registration
    from CBIRSlicerLib.imaging.readers import read_volume

    source = read_volume(abdomen.image)
    labels = real_anatomy._LabelMap(abdomen.labels)
    copy = bench.copies[0]
    patient = pseudo_patients.PseudoPatient.load(copy.transform)
    target_image = registration.coarse_image(read_volume(copy.image))
    by_name = {name: n for n, name in abdomen.names.items()}
    errors, moments_errors = [], []
    for name in ("spleen", "kidney_right", "vertebrae_L1", "liver"):
        centre = labels.deepest_ras(by_name[name])
        slab = real_anatomy.slab_around(source, centre, 60.0)
        assert registration.body_axis_extent(registration.coarse_image(slab)) <= 64.0  # the top of the CT may cut it shorter
        query_image = registration.coarse_image(slab)
        truth = patient.source_to_copy(centre)
        placed = registration.place(slab, centre, None, registration.global_transform(query_image, target_image), query_image,
                                 target_image)
        errors.append(float(np.linalg.norm(np.array(placed.ras) - truth)))
        share = registration.SLAB_SHARE
        try:
            registration.SLAB_SHARE = 0.0  # every start from the centres of mass, as before the level search
            moments = registration.global_transform(query_image, target_image)
        finally:
            registration.SLAB_SHARE = share
        moments_errors.append(float(np.linalg.norm(registration.carry(moments, centre) - truth)))
    print("slab placement errors (mm):", np.round(errors, 1), "moments start:", np.round(moments_errors, 1))
    # About 80 % of 60 mm slab queries land inside their organ in the placement harness (docs/benchmarks.md): here 3 of 4
    # within 12 mm today (7, 2, 30, 9 mm), all closer than from the centres of mass (83-170 mm).
    assert sum(error < 12.0 for error in errors) >= 3, errors
    assert min(moments_errors) > 60.0, moments_errors  # the level really had to be found
    assert all(error < moments for error, moments in zip(errors, moments_errors))
