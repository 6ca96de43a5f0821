"""The 3D CT encoder (astra-ct) measured: cost on 2 cores, phantom cohorts against handcrafted, real-anatomy check.

Parts (``--parts``, default all):

* ``cost``: load time, MONAI preprocessing, one pass over the shared abdominal CT and over a phantom case, an ROI
  query (sub-volume with context), batches of ROI blocks, peak memory (max RSS).
* ``phantom``: the demo's protocol (``evaluation.evaluate_lesions``: one ROI query of 2.5 radii per lesion,
  leave-one-case-out) on synthetic cohorts, for ``handcrafted`` (its default 2D index) and ``astra-ct`` (whole
  volume + feature-map cells), the latter raw and centred (the mean of the index's vectors subtracted from index
  and query vectors, then re-normalised), with ROI vectors from a sub-volume crop or pooled from the query
  volume's cells.
* ``organ_index``: the same copies indexed (astra-ct and handcrafted), organ ROIs of the original searched; the
  distance from each result's best-match focus to the organ's true centre in that copy.
* ``organs``: real anatomy. Pseudo-patients of the shared abdominal CT (rotated, shifted, resampled, noise and an
  intensity shift added; every organ's true place known); for each labelled organ an ROI around its centroid in
  the original is compared with the same-size ROIs around every organ's true place in a copy: top-1 organ
  accuracy and mean wrong-above-right count, real weights against random weights of the same network, raw and
  centred.

    PYTHONPATH=CBIRSlicer python benchmarks/ct3d.py [--parts cost,phantom,organs] [--cases 12] [--seeds 0]
        [--roi-modes crop,cells] [--out docs/benchmarks/ct3d.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import warnings

import numpy as np

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.imaging.volume import Volume
from CBIRSlicerLib.index.faiss_store import VectorStore
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.base import l2_normalize
from CBIRSlicerLib.models.i3d import pool_cells
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval.evaluation import evaluate_lesions
from CBIRSlicerLib.retrieval.search import Searcher


def shared_data_dir() -> str:
    """The shared data folder: $CBIR_SHARED_DATA, else ``shared/data`` beside the repository root or a folder above."""
    if os.environ.get("CBIR_SHARED_DATA"):
        return os.environ["CBIR_SHARED_DATA"]
    folder = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    while True:
        if os.path.isdir(os.path.join(folder, "shared", "data", "real", "abdomen-ct")):
            return os.path.join(folder, "shared", "data")
        if os.path.dirname(folder) == folder:
            raise SystemExit("no shared/data/real/abdomen-ct beside the repository or above it; set CBIR_SHARED_DATA")
        folder = os.path.dirname(folder)


ABDOMEN = os.path.join(shared_data_dir(), "real", "abdomen-ct", "abdomen_ct.nii.gz")
ORGANS = {1: "spleen", 2: "kidney_right", 5: "liver", 6: "stomach", 31: "vertebrae_L1", 52: "aorta",
          86: "autochthon_left", 87: "autochthon_right", 20: "colon"}


def peak_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Variant:
    """astra-ct seen through a variant: vectors centred on a learned mean, ROI vectors from a crop or pooled cells."""

    def __init__(self, base, mean: np.ndarray | None = None, roi_mode: str = "crop", cache: dict | None = None,
                 context_mm: float = 24.0):
        self.base, self.mean, self.roi_mode, self.context_mm = base, mean, roi_mode, context_mm
        self.name, self.dim, self.fingerprint, self.embeds_volumes = base.name, base.dim, base.fingerprint, True
        self.cache = {} if cache is None else cache

    def _centre(self, vectors: np.ndarray) -> np.ndarray:
        return vectors if self.mean is None else l2_normalize(np.atleast_2d(vectors) - self.mean).reshape(np.shape(vectors))

    def _features(self, volume: Volume):
        key = ("features", volume.source)
        if key not in self.cache:
            self.cache[key] = self.base.embed_volume(volume)
        return self.cache[key]

    def embed_volume(self, volume: Volume):
        features = self._features(volume)
        return type(features)(features.cells, features.centres_ras, features.foreground, features.cell_mm,
                              self._centre(features.whole))

    def embed_region(self, volume: Volume, roi: RoiBox) -> np.ndarray:
        key = (self.roi_mode, self.context_mm, volume.source, tuple(roi.as_list()))
        if key not in self.cache:
            if self.roi_mode == "crop":
                self.cache[key] = self.base.embed_crop(volume, roi, self.context_mm)
            else:  # the cells of one pass over the query volume that overlap the ROI, averaged (the library's default)
                self.cache[key] = pool_cells(self._features(volume), roi)
        return self._centre(self.cache[key])


def centred_store(index: Index) -> tuple[VectorStore, np.ndarray]:
    """The index's vectors with their mean subtracted and re-normalised (in memory), and that mean."""
    ids = index.store.ids()
    vectors = index.store.reconstruct(ids)
    mean = vectors.mean(axis=0)
    store = VectorStore.create(index.store.dim, "flat")
    store.add(l2_normalize(vectors - mean), ids)
    return store, mean


def brief(evaluation) -> dict:
    """The figures the docs table shows."""
    s = evaluation.summary
    keep = ("queries", "mP@1_micro", "mP@3_micro", "mAP@3_micro", "localised", "localised_fraction", "seconds_per_query")
    return {k: s[k] for k in keep if k in s} | {k: v for k, v in s.items() if k.startswith(("mP@", "mAP@", "local"))}


def part_cost(astra, out: dict) -> None:
    """Seconds and memory of the steps."""
    abdomen = read_volume(ABDOMEN)
    began = time.monotonic()
    prepared = astra.prepare(abdomen)
    out["abdomen_prepare_s"] = round(time.monotonic() - began, 2)
    out["abdomen_prepared_shape"] = list(prepared.array.shape)
    began = time.monotonic()
    features = astra.embed_volume(abdomen, prepared)
    out["abdomen_embed_volume_s"] = round(time.monotonic() - began, 1)
    out["abdomen_cells"] = list(features.cells.shape[:3])
    out["abdomen_cells_body"] = int((features.foreground >= 0.2).sum())
    case = synthetic.make_cohort(1, seed=0)[0]
    began = time.monotonic()
    astra.embed_volume(case.volume)
    out["phantom_embed_volume_s"] = round(time.monotonic() - began, 1)
    lesion = case.lesions[0]
    roi = RoiBox(lesion.center, (2.5 * lesion.radius_mm,) * 3)
    began = time.monotonic()
    astra.embed_crop(case.volume, roi, 24.0)
    out["phantom_roi_crop_embed_s"] = round(time.monotonic() - began, 2)
    block = astra.region_array(astra.prepare(case.volume), roi, 24.0)
    for count in (1, 12):
        began = time.monotonic()
        astra.embed_blocks([block] * count)
        out[f"roi_blocks_{count}_s"] = round(time.monotonic() - began, 2)
    out["roi_block_shape"] = list(block.shape)
    out["peak_rss_mb"] = round(peak_mb())


def part_phantom(astra, out: dict, cases: int, seeds: list[int], roi_modes: list[str], contexts: list[float],
                 work_root: str | None, skip_handcrafted: bool = False) -> None:
    """The demo's protocol, handcrafted against astra-ct variants; an index already in ``work_root`` is reused."""
    handcrafted = create_embedder("handcrafted")
    for seed in seeds:
        # the real path: the index stores its sources' absolute paths and the evaluation matches results by them
        work = os.path.realpath(os.path.join(work_root, f"seed{seed}") if work_root else tempfile.mkdtemp(prefix="cbir-ct3d-"))
        os.makedirs(work, exist_ok=True)
        if not os.path.exists(os.path.join(work, synthetic.COHORT_CSV)):
            synthetic.write_cohort(synthetic.make_cohort(cases, seed=seed), work)
        truth = synthetic.read_cohort(os.path.join(work, synthetic.COHORT_CSV))
        paths = {name: os.path.join(work, f"{name}.nii.gz") for name in truth}
        rows = out.setdefault(f"cohort_{cases}_seed_{seed}", {})
        cache: dict = {}
        for label, embedder in (("handcrafted", handcrafted), ("astra-ct", Variant(astra, cache=cache))):
            folder = os.path.join(work, f"index-{label}")
            if not os.path.exists(folder):
                began = time.monotonic()
                with Index.create(folder, embedder, IndexSettings()) as index:
                    index.add_sources(list(paths.values()), embedder)
                rows[label] = {"build_s_per_case": round((time.monotonic() - began) / cases, 2)}
            index = Index.open(folder)
            rows.setdefault(label, {})["items_per_case"] = index.store.count / cases
            if label == "handcrafted":
                if not skip_handcrafted:
                    rows[label] |= brief(evaluate_lesions(Searcher(index, embedder), truth, paths, ks=(1, 3, 5)))
                print(label, rows[label], flush=True)
                continue
            raw_store = index.store
            store, mean = centred_store(index)
            whole = raw_store.reconstruct(raw_store.ids()[:: max(1, raw_store.count // 400)])
            cosines = whole @ whole.T
            rows["raw_item_cosine_mean"] = round(float(cosines[~np.eye(len(whole), dtype=bool)].mean()), 3)
            for mode, context in [(m, c) for m in roi_modes for c in (contexts if m == "crop" else [0.0])]:
                for centred in (False, True):
                    index.store = store if centred else raw_store
                    variant = Variant(astra, mean if centred else None, mode, cache, context)
                    name = f"astra-ct {mode}{f' context {context:g} mm' if mode == 'crop' else ''}{' centred' if centred else ''}"
                    rows[name] = {**rows[label], **brief(evaluate_lesions(Searcher(index, variant), truth, paths, ks=(1, 3, 5)))}
                    print(name, rows[name], flush=True)
            del rows[label]


def pseudo_patient(volume: Volume, degrees, shift, spacing, noise_hu: float, offset_hu: float, seed: int,
                   nearest: bool = False):
    """A copy of a volume as another 'patient': anatomy rotated about its centre and shifted, resampled, noise added.

    Returns the copy and the map from a RAS point of the original to the same anatomy's RAS point in the copy.
    """
    import SimpleITK as sitk

    rotation = synthetic.rotation(*degrees)
    centre, shift = volume.center_ras, np.asarray(shift, float)
    low, high = volume.corners_ras().min(axis=0), volume.corners_ras().max(axis=0)
    shape = np.round((high - low) / np.asarray(spacing)).astype(int) + 1
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = np.diag(spacing), low
    reference = Volume.from_array(np.zeros(shape[::-1], np.float32), matrix).to_sitk()
    flip = np.diag([-1.0, -1.0, 1.0])  # SimpleITK works in LPS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((flip @ rotation.T @ flip).ravel().tolist())
    transform.SetCenter((flip @ (centre + shift)).tolist())
    transform.SetTranslation((-flip @ shift).tolist())
    method = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    fill = 0.0 if nearest else -1024.0
    resampled = sitk.Resample(volume.to_sitk(volume.array.astype(np.float32)), reference, transform, method, fill, sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(resampled)
    if not nearest:
        values = values + offset_hu + np.random.default_rng(seed).standard_normal(values.shape).astype(np.float32) * noise_hu
    copy = Volume.from_array(values, matrix, name=f"pseudo{seed}", modality="CT")
    return copy, lambda p: rotation @ (np.asarray(p) - centre) + centre + shift


def organ_centroids(labels: Volume, organs: dict[int, str]) -> dict[str, np.ndarray]:
    """RAS centroid of each labelled organ."""
    return {name: labels.ijk_to_ras_points(np.argwhere(labels.array == value).mean(axis=0)[::-1][None])[0]
            for value, name in organs.items()}


def organ_scores(queries: np.ndarray, keys: np.ndarray) -> dict:
    """Top-1 accuracy, mean count of wrong organs above the right one, raw and centred on the keys' mean."""
    out = {}
    for label, (q, k) in {"raw": (queries, keys), "centred": (queries - keys.mean(0), keys - keys.mean(0))}.items():
        similarity = l2_normalize(q) @ l2_normalize(k).T
        diagonal = np.diag(similarity)
        out[label] = {"top1": round(float(np.mean(similarity.argmax(axis=1) == np.arange(len(q)))), 3),
                      "wrong_above": round(float(np.mean((similarity > diagonal[:, None]).sum(axis=1))), 3),
                      "gap": round(float(diagonal.mean() - similarity[~np.eye(len(q), dtype=bool)].mean()), 4)}
    return out


def part_organs(out: dict, side_mm: float = 40.0) -> None:
    """Real anatomy: organ ROIs of the original against organ ROIs of pseudo-patients, real against random weights."""
    import torch

    from CBIRSlicerLib.models.i3d import I3DEmbedder, astra_weights_path, build_network, load_network

    abdomen = read_volume(ABDOMEN)
    labels = read_volume(ABDOMEN.replace("abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz"))
    centroids = organ_centroids(labels, ORGANS)
    copies = [pseudo_patient(abdomen, (4, 0, 8), (6, -8, 10), (2.5, 2.5, 3.5), 15, 15, 1),
              pseudo_patient(abdomen, (-5, 3, -6), (-8, 5, -6), (2.0, 2.0, 5.0), 25, -20, 2)]
    network, _ = load_network(astra_weights_path())
    torch.manual_seed(0)
    for label, net in (("real", network), ("random", build_network())):
        embedder = I3DEmbedder(label, "-", "cpu", network=net, weights_sha256="-")
        began = time.monotonic()
        prepared = embedder.prepare(abdomen)
        queries = embedder.embed_blocks([embedder.region_array(prepared, RoiBox(tuple(c), (side_mm,) * 3), 24.0)
                                         for c in centroids.values()])
        for n, (copy, mapping) in enumerate(copies):
            prepared_copy = embedder.prepare(copy)
            keys = embedder.embed_blocks([embedder.region_array(prepared_copy, RoiBox(tuple(mapping(c)), (side_mm,) * 3), 24.0)
                                          for c in centroids.values()])
            out[f"{label} copy{n + 1}"] = organ_scores(queries, keys)
            print(label, n, out[f"{label} copy{n + 1}"], flush=True)
        out[f"{label} seconds"] = round(time.monotonic() - began, 1)
    out["organs"] = list(ORGANS.values())
    out["roi_side_mm"] = side_mm


def part_organ_index(astra, out: dict, work_root: str | None, side_mm: float = 40.0,
                     modes: tuple = ("handcrafted", "astra-ct")) -> None:
    """Real anatomy through the whole pipeline: index two pseudo-patients, query organ ROIs of the original.

    For each organ and each indexed copy: the distance from the result's best-match focus to the organ's true
    centroid in that copy, for astra-ct (raw index) and handcrafted (its default 2D index).
    """
    from CBIRSlicerLib.imaging.synthetic import write_volume
    from CBIRSlicerLib.retrieval.queries import roi_query

    work = work_root or tempfile.mkdtemp(prefix="cbir-ct3d-organs-")
    abdomen = read_volume(ABDOMEN)
    labels = read_volume(ABDOMEN.replace("abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz"))
    centroids = organ_centroids(labels, ORGANS)
    copies = [pseudo_patient(abdomen, (4, 0, 8), (6, -8, 10), (2.5, 2.5, 3.5), 15, 15, 1),
              pseudo_patient(abdomen, (-5, 3, -6), (-8, 5, -6), (2.0, 2.0, 5.0), 25, -20, 2)]
    paths = [write_volume(copy, os.path.join(work, f"copy{n + 1}.nii.gz")) for n, (copy, _) in enumerate(copies)]
    mappings = {os.path.abspath(p): mapping for p, (_, mapping) in zip(paths, copies)}
    cache: dict = {}
    for label, embedder in (("handcrafted", create_embedder("handcrafted")), ("astra-ct", Variant(astra, cache=cache)),
                            ("astra-ct cells", Variant(astra, roi_mode="cells", cache=cache))):
        if label.split()[0] not in modes:
            continue
        folder = os.path.join(work, f"organs-{label.split()[0]}")
        began = time.monotonic()
        if not os.path.exists(folder):
            with Index.create(folder, embedder, IndexSettings()) as index:
                index.add_sources(paths, embedder)
        build = time.monotonic() - began
        index = Index.open(folder)
        searcher = Searcher(index, embedder)
        distances, seconds = {}, []
        for organ, centre in centroids.items():
            began = time.monotonic()
            answer = searcher.search(roi_query(abdomen, RoiBox(tuple(centre), (side_mm,) * 3), "axial", index), k=2)
            seconds.append(time.monotonic() - began)
            distances[organ] = [round(float(np.linalg.norm(np.array(r.best_match.spot) -
                                                           mappings[os.path.abspath(r.source)](centre))), 1)
                                for r in answer.results]
        flat = np.array([d for v in distances.values() for d in v])
        out[label] = {"build_s_per_case": round(build / len(paths), 1), "seconds_per_query": round(float(np.mean(seconds)), 2),
                      "median_mm": round(float(np.median(flat)), 1), "within_25mm": round(float(np.mean(flat <= 25)), 3),
                      "within_50mm": round(float(np.mean(flat <= 50)), 3), "distances_mm": distances}
        print(label, {k: v for k, v in out[label].items() if k != "distances_mm"}, flush=True)


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="cost,phantom,organs")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--roi-modes", default="crop,cells")
    parser.add_argument("--contexts", default="24", help="ROI crop context in mm, comma-separated")
    parser.add_argument("--work", default=None, help="folder for cohorts and indexes (kept, and reused when there)")
    parser.add_argument("--skip-handcrafted", action="store_true", help="index handcrafted but do not query it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/ct3d.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    result: dict = {"threads": args.threads, "note": "2 cores shared with other jobs (load average 6-8): times are upper bounds"}
    began = time.monotonic()
    astra = create_embedder("astra-ct", device="cpu", threads=args.threads)
    result["load_s"] = round(time.monotonic() - began, 1)
    result["load_peak_rss_mb"] = round(peak_mb())
    if "cost" in parts:
        part_cost(astra, result.setdefault("cost", {}))
        print(result["cost"], flush=True)
    if "organs" in parts:
        part_organs(result.setdefault("organs", {}))
    if "organ_index" in parts:
        part_organ_index(astra, result.setdefault("organ_index", {}), args.work,
                         modes=("astra-ct",) if args.skip_handcrafted else ("handcrafted", "astra-ct"))
    if "phantom" in parts:
        part_phantom(astra, result.setdefault("phantom", {}), args.cases, [int(s) for s in args.seeds.split(",")],
                     args.roi_modes.split(","), [float(c) for c in args.contexts.split(",")], args.work,
                     args.skip_handcrafted)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1, default=float)
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
