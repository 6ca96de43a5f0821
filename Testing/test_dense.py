"""Dense features: grid geometry (a cell holds the right millimetres), pooling formula, one path for query and index, pinning."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from volume_helpers import write_blob_cases

from CBIRSlicerLib.errors import IndexMismatchError, ParameterError
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models import handcrafted
from CBIRSlicerLib.models.dense import DenseGrid, overlap_weights, plan_windows, pool_region, pool_regions, window_starts
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.models.torch_runtime import TorchEmbedder
from CBIRSlicerLib.retrieval.queries import roi_query, slice_query
from CBIRSlicerLib.retrieval.search import Searcher

SETTINGS = IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[20.0], blob_sizes_mm=[12.0], dense_cell_mm=6.0)


class PatchMeanModel(TorchEmbedder):
    """A stand-in 'ViT' whose token is the mean of its 8-px patch (32-px windows): every step of the real dense path but the network."""

    name, dim = "patch-mean", 3

    def __init__(self):
        super().__init__("cpu", "fp32", 1)

    def _dense_geometry(self):
        return 32, 8

    def _normalisation(self):
        return [0.0] * 3, [1.0] * 3

    def _tokens(self, pixels):
        import torch.nn.functional as F

        return F.avg_pool2d(pixels, 8).permute(0, 2, 3, 1)


def test_a_cell_holds_the_millimetres_it_claims():
    # 0.5 mm pixels, 5 mm cells: a bright square over rows 40-79 and columns 60-99 (20-40 mm, 30-50 mm) lights
    # exactly cells 4-7 and 6-9 of a 12 x 14 grid, through resizing (10 px -> 8 px per cell), windows and stitching.
    image = np.zeros((120, 135), np.uint8)
    image[40:80, 60:100] = 255
    grid = PatchMeanModel().embed_dense([image], 0.5, 5.0)[0]
    assert grid.cells.shape == (12, 14, 3) and grid.cell_px == 10.0 and grid.valid.all()
    lit = grid.cells[..., 0] > 0.5
    assert np.argwhere(lit).min(axis=0).tolist() == [4, 6] and np.argwhere(lit).max(axis=0).tolist() == [7, 9]
    assert np.allclose(grid.cells[4:8, 6:10], 1.0, atol=0.02) and grid.cells[~lit].max() < 0.05
    assert grid.cell_box(4, 6) == (40.0, 60.0, 50.0, 70.0)
    # 96 x 112 model px in 32-px windows on the 8-px patch grid, overlapping (no edge token without context), last flush
    plan = plan_windows((120, 135), 0.5, 5.0, 32, 8)
    assert plan.canvas == (96, 112) and plan.rows == [0, 24, 40, 64] and plan.cols == [0, 24, 56, 80]
    assert grid.passes == 16 and window_starts(20, 32, 8) == [0]


def test_slices_made_together_get_the_grids_they_get_alone():
    # Canvases are resized and normalised several slices at a time (and windows batched across slices); each slice's
    # grid must be what it is alone, also when shapes change within the list (a new group starts there).
    rng = np.random.default_rng(4)
    images = [(rng.random(shape) * 255).astype(np.uint8) for shape in [(70, 90)] * 3 + [(50, 40), (70, 90)]]
    model = PatchMeanModel()
    together = model.embed_dense(images, 0.7, 5.0, batch_size=5)
    for image, grid in zip(images, together):
        alone = model.embed_dense([image], 0.7, 5.0)[0]
        assert np.array_equal(grid.cells, alone.cells) and grid.passes == alone.passes
    assert together[0].cells.shape[:2] == (10, 13) and not np.allclose(together[0].cells, together[1].cells)


def test_handcrafted_cells_are_the_descriptors_of_their_squares():
    rng = np.random.default_rng(0)
    image = (rng.random((50, 40)) * 255).astype(np.uint8)
    grid = create_embedder("handcrafted").embed_dense([image], 2.0, 20.0)[0]  # 10-px cells
    assert grid.cells.shape == (5, 4, handcrafted.DIM) and grid.passes == 0
    assert np.allclose(grid.cells[3, 2], handcrafted.describe(image[30:40, 20:30]), atol=1e-6)


def test_pooling_is_the_documented_formula():
    rng = np.random.default_rng(1)
    cells = rng.normal(size=(4, 5, 6)).astype(np.float32)
    grid = DenseGrid(cells, np.ones((4, 5), bool), 10.0, (40, 50))
    box = (5.0, 12.0, 27.0, 50.0)  # half of row 0, rows 1 and 2 whole (row 2 to 27: 0.7); cols 1 from 12: 0.8, 2-4 whole
    weights = np.outer([0.5, 1.0, 0.7, 0.0], [0.0, 0.8, 1.0, 1.0, 1.0])
    assert np.allclose(overlap_weights((4, 5), 10.0, box), weights)
    mean = (weights[..., None] * cells).sum((0, 1)) / weights.sum()
    assert np.allclose(pool_region(grid, box, "mean"), mean / np.linalg.norm(mean), atol=1e-6)
    gem = ((weights[..., None] * np.maximum(cells, 0) ** 3).sum((0, 1)) / weights.sum()) ** (1 / 3)
    assert np.allclose(pool_region(grid, box, "gem"), gem / np.linalg.norm(gem), atol=1e-6)
    # Many regions at once (how a slice's items are pooled) give each region's formula, whatever cells they touch.
    boxes = [box, (0.0, 0.0, 40.0, 50.0), (31.0, 44.5, 39.0, 50.0), (-3.0, -2.0, 8.0, 9.0)]
    for method in ("mean", "gem"):
        single = [pool_region(grid, b, method) for b in boxes]
        assert single[1] @ single[0] < 0.99 and np.allclose(pool_regions(grid, boxes, method), single, atol=1e-6)
    for b in boxes[1:]:
        w = overlap_weights((4, 5), 10.0, b)
        assert np.allclose(pool_region(grid, b), l2(np.tensordot(w, cells, 2) / w.sum()), atol=1e-6)
    grid.valid[:, 1:] = False
    with pytest.raises(ParameterError, match="covers no computed cell"):
        pool_region(grid, box)
    with pytest.raises(ParameterError, match=r"region \(5.0, 12.0, 27.0, 50.0\) covers no computed cell"):
        pool_regions(grid, [(0.0, 0.0, 9.0, 9.0), box])


def l2(vector):
    return vector / np.linalg.norm(vector)


@pytest.fixture(scope="module")
def dense_index(tmp_path_factory):
    from random_checkpoints import write_open_clip_folder

    root = tmp_path_factory.mktemp("dense")
    os.makedirs(root / "cases")
    paths = write_blob_cases(str(root / "cases"), count=2)
    embedder = create_embedder(f"local-dir:{write_open_clip_folder(str(root / 'clip'))}", device="cpu")
    with Index.create(str(root / "idx"), embedder, SETTINGS) as index:
        report = index.add_sources(paths, embedder)
    assert len(report.added) == 2
    return str(root / "idx"), paths, embedder


def test_region_query_of_an_indexed_region_scores_one_against_it(dense_index):
    from CBIRSlicerLib.imaging.readers import read_volume

    folder, paths, embedder = dense_index
    with Index.open(folder) as index:
        assert index.settings.region_strategy == "dense"  # a ViT's default, pinned
        case = next(c for c in index.catalog.cases() if c.source == os.path.abspath(paths[0]))
        all_items = index.catalog.items_of_cases([case.row])[case.row]
        items = [item for item in all_items if item.kind in ("tile", "blob")]
        assert len(items) >= 3
        searcher = Searcher(index, embedder=embedder)
        volume = read_volume(paths[0])
        for item in items[:: max(1, len(items) // 3)]:
            low, high = np.array(item.low_ras), np.array(item.high_ras)
            centre = (low + high) / 2
            roi = RoiBox(tuple(centre), (*(high - low + 0.75)[:2], 0.5))  # the item's pixels on its own slice only
            query = roi_query(volume, roi, "axial", index)
            assert len(query.images) == 1 and query.boxes[0] == tuple(item.box)
            vector = searcher.query_vectors(query)
            stored = index.store.reconstruct(np.array([item.id]))[0]
            assert float(vector[0] @ stored) > 0.9999
        whole = searcher.query_vectors(slice_query(volume, "axial", index, ras=centre))
        slice_item = next(i for i in all_items if i.kind == "slice" and i.plane == item.plane)
        assert float(whole[0] @ index.store.reconstruct(np.array([slice_item.id]))[0]) > 0.9999


def test_region_strategy_is_pinned_and_refused_on_mismatch(dense_index, tmp_path, capsys):
    from CBIRSlicerLib import cli

    folder, paths, _ = dense_index
    assert cli.main(["index", "add", paths[0], "--index", folder, "--region-strategy", "crops"]) == 1
    assert "--region-strategy crops (the index has dense)" in capsys.readouterr().err
    with Index.open(folder) as index:
        index.check_settings(SETTINGS)  # 'auto' asks for whatever the index pinned
        with pytest.raises(IndexMismatchError, match="region_strategy: 'dense' in the index, 'crops' asked for"):
            index.check_settings(IndexSettings(**{**SETTINGS.as_dict(), "region_strategy": "crops"}))
    with open(os.path.join(folder, "manifest.json")) as handle:
        assert json.load(handle)["settings"]["region_strategy"] == "dense"
    assert IndexSettings.from_stored({"axes": ["axial"]}).region_strategy == "crops"  # indexes made before dense vectors
    assert SETTINGS.resolved(create_embedder("handcrafted")).region_strategy == "crops"
    with pytest.raises(ParameterError, match="region strategy must be one of"):
        IndexSettings(region_strategy="tokens")


def test_the_worker_pools_a_dense_query_as_the_library_does(dense_index):
    from CBIRSlicerLib.models.dense import region_vectors
    from CBIRSlicerLib.models.worker import EmbeddingService

    folder, _, embedder = dense_index
    model = Index.open(folder).model_name()
    rng = np.random.default_rng(2)
    images = [(rng.random((40, 50)) * 255).astype(np.uint8) for _ in range(3)]
    boxes, pixel_mm = [(5, 10, 25, 30)] * 3, [1.5] * 3
    local, chosen = region_vectors(embedder, images, pixel_mm, boxes, 6.0, "mean", passes=2)
    assert chosen == [1]  # the 30 mm box needs 9 windows of each slice: within 2 passes only the central slice is embedded
    with EmbeddingService(model, device="cpu") as service:
        remote = service.submit_regions(images, boxes, pixel_mm, 6.0, "mean", passes=2).result(timeout=120)
    assert remote.shape == (1, embedder.dim) and np.allclose(remote, local, atol=1e-5)
