"""Vector transforms (none, centering, PCA whitening with shrinkage) measured: score spread and retrieval, phantoms and real CT.

Phantoms: the demo protocol (``cbir demo``: 12 synthetic cases, 3 per lesion kind, axial every 4 mm,
one ROI query of 2.5 lesion radii per lesion, leave-one-case-out) for each seed; one index is built
per seed and each transform is fitted to its vectors and swapped in, so every variant answers the
same queries on the same index. Reported: mP@1 and localisation (evaluation.evaluate_lesions), and
the score spread: the MaxSim scores of same-kind (related) and other-kind (unrelated) cases, and
the AUC of telling them apart. Small indexes: the transform fitted to an even sample of n vectors.

Real (``--real``): the shared abdominal CT (TotalSegmentator reference) and three copies of it moved
rigidly (rotation up to 10 degrees, translation up to 20 mm), with noise (20 HU) and an intensity
shift, resampled onto its grid with SimpleITK, labels with them; an index of the three copies, the
InVesalius head CT and the Colin27 brain MR (default slicing). One ROI query per organ of the
labelled slab (k 82-111; organs at least 20 mm across on every side there): a cube of at most 40 mm
around the organ's deepest point, in the original; a copy's best match is a hit when its focus lies
in the same organ of that copy (outside the slab: a miss); error: distance from the focus to the
query centre's true place in the copy. One patient's copies are easier than other patients.

First stage: the raw store is asked with the folded query (vector_transform.first_stage), fetching 1x
or FOLD_OVERFETCH x the hits and re-scoring them exactly; its top 100 items are compared with an exact
search over all transformed vectors (item recall@100). Search time per query, embedding excluded.

    python benchmarks/vector_transform.py [--seeds 0,1] [--real] [--out docs/benchmarks/vector_transform.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import plistlib
import tarfile
import tempfile
import time

import numpy as np

from CBIRSlicerLib.demo import DEMO_CASES, DEMO_KS, ROI_SCALE, demo_settings
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index import vector_transform
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval import ranking
from CBIRSlicerLib.retrieval.evaluation import evaluate_lesions
from CBIRSlicerLib.retrieval.queries import roi_query
from CBIRSlicerLib.retrieval.search import Searcher

ABDOMEN = "/work/shared/data/real/abdomen-ct"
DEBIAN = os.path.expanduser("~/.cache/cbirslicer/debian/x")
HEAD_CT = f"{DEBIAN}/usr/share/doc/invesalius-examples/examples/Cranium.inv3"
BRAIN_MR = f"{DEBIAN}/usr/share/mricron/templates/ch2.nii.gz"
TEMPERATURES = (ranking.FOCUS_TEMPERATURE, ranking.CENTRE_TEMPERATURE)
SLAB = (82, 111)
QUERY_BOX_MM = 40.0  # labelled k range of the abdominal CT
VARIANTS = {  # name: (kind, shrinkage, placing: which cosines the centre weights and the focus use)
    "none": ("identity", None, "transformed"),
    "center": ("center", None, "transformed"),
    "whiten a=0.5": ("whiten", 0.5, "transformed"),
    "whiten a=0.3": ("whiten", 0.3, "transformed"),
    "whiten a=0.1": ("whiten", 0.1, "transformed"),
    "whiten a=0.03": ("whiten", 0.03, "transformed"),
    "whiten a=0.3, placing temperatures x4": ("whiten", 0.3, "x4"),
}


class CachedEmbedder:
    """The model, remembering the vectors of image lists already embedded (every variant asks the same queries)."""

    def __init__(self, embedder):
        self.embedder, self.cache = embedder, {}

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def embed_images(self, images):
        key = hashlib.sha1(b"".join(np.ascontiguousarray(i).tobytes() for i in images)).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.embedder.embed_images(images)
        return self.cache[key]


class RecordingSearcher:
    """A searcher that keeps every answer (for the score spread)."""

    def __init__(self, searcher):
        self.searcher, self.answers = searcher, []

    def __getattr__(self, name):
        return getattr(self.searcher, name)

    def search(self, query, **options):
        answer = self.searcher.search(query, **options)
        self.answers.append(answer)
        return answer


def live_vectors(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, raw vectors) of every searchable item."""
    ids = np.setdiff1d(index.store.ids(), index.excluded_ids())
    return ids, index.store.reconstruct(ids)


def use_variant(index: Index, vectors: np.ndarray, name: str, sample: int | None = None, rows: np.ndarray | None = None) -> dict:
    """Fit a variant's transform to the index's vectors (or an even sample of them, or some rows) and swap it in.

    Sampled or chosen fits have no small-index fallback: they measure where it should begin.
    """
    kind, shrinkage, placing = VARIANTS[name]
    if sample is not None:
        rows = np.random.default_rng(0).choice(len(vectors), sample, replace=False)
    chosen = vectors if rows is None else vectors[rows]
    fitted = vector_transform.fit(chosen, kind, shrinkage if shrinkage is not None else vector_transform.SHRINKAGE,
                                  fallback=rows is None)
    index.transform = None if fitted.kind == "identity" else fitted
    scale = 4.0 if placing == "x4" else 1.0  # the transformed cosines spread about four times as far as the raw ones
    ranking.FOCUS_TEMPERATURE, ranking.CENTRE_TEMPERATURE = scale * TEMPERATURES[0], scale * TEMPERATURES[1]
    return {"fitted_kind": fitted.kind, "fitted_on": len(chosen)}


def auc(related: list[float], unrelated: list[float]) -> float:
    """P(a related score > an unrelated one), ties half."""
    a, b = np.asarray(related)[:, None], np.asarray(unrelated)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def spread(related: list[float], unrelated: list[float]) -> dict:
    """Medians, ranges and AUC of related and unrelated scores."""
    return {"related_median": round(float(np.median(related)), 4), "unrelated_median": round(float(np.median(unrelated)), 4),
            "related_range": [round(float(np.min(related)), 4), round(float(np.max(related)), 4)],
            "unrelated_range": [round(float(np.min(unrelated)), 4), round(float(np.max(unrelated)), 4)],
            "gap": round(float(np.median(related) - np.median(unrelated)), 4), "auc": round(auc(related, unrelated), 4)}


def phantom_run(seed: int, embedder, work: str) -> dict:
    """The demo cohort of one seed: every variant, then fits on few vectors."""
    folder = os.path.join(work, f"seed{seed}")
    cohort = synthetic.make_cohort(DEMO_CASES, seed=seed)
    paths = dict(zip([c.name for c in cohort], synthetic.write_cohort(cohort, os.path.join(folder, "cohort"))))
    truth = synthetic.read_cohort(os.path.join(folder, "cohort", synthetic.COHORT_CSV))
    began = time.monotonic()
    with Index.create(os.path.join(folder, "index"), embedder, demo_settings()) as index:
        index.add_sources(list(paths.values()), embedder)
    built = time.monotonic() - began
    index = Index.open(os.path.join(folder, "index"))
    ids, vectors = live_vectors(index)
    kinds_of = {name: {lesion.kind for lesion in lesions} for name, lesions in truth.items()}
    by_source = {os.path.abspath(p): name for name, p in paths.items()}
    out = {"cases": DEMO_CASES, "vectors": len(ids), "build_seconds": round(built, 1),
           "pinned": index.manifest["transform"], "variants": {}, "fit_sample": {}}

    def evaluate(label: str, **fit) -> dict:
        fitted = use_variant(index, vectors, label, **fit)
        recorder = RecordingSearcher(Searcher(index, embedder))
        summary = evaluate_lesions(recorder, truth, paths, ks=DEMO_KS, roi_scale=ROI_SCALE).summary
        related, unrelated = [], []
        for answer in recorder.answers:
            query = by_source[answer["query"]["volume"]]
            lesion_kinds = kinds_of[query]
            for result in answer["results"]:
                other = by_source[result["source"]]
                (related if kinds_of[other] & lesion_kinds else unrelated).append(result["score"])
        return {**fitted, "mP@1": round(summary["mP@1_micro"], 4), "mP@3": round(summary["mP@3_micro"], 4),
                "localised": round(summary["localised"], 4), "localised_count": summary["localised_count"],
                "spread": spread(related, unrelated)}

    for label in VARIANTS:
        out["variants"][label] = evaluate(label)
        print(f"seed {seed} {label}: {out['variants'][label]}", flush=True)
    d = vectors.shape[1]
    for n in (10, 30, 100, d, 4 * d):
        for label in ("whiten a=0.3",):
            out["fit_sample"][f"{label}, n={n}"] = evaluate(label, sample=n)
            print(f"seed {seed} {label} n={n}: {out['fit_sample'][f'{label}, n={n}']}", flush=True)
    # What a small index fits: the vectors of its first cases only (one case, then two, three), judged on all twelve.
    case_of = index.catalog.case_rows_of_items(ids)
    rows_of_case = np.array([case_of[int(i)] for i in ids]) if isinstance(case_of, dict) else np.asarray(case_of)[ids]
    first_rows = sorted(set(rows_of_case.tolist()))
    for m in (1, 3):
        chosen = np.flatnonzero(np.isin(rows_of_case, first_rows[:m]))
        for label in ("center", "whiten a=0.3"):
            out["fit_sample"][f"{label}, first {m} case(s)"] = evaluate(label, rows=chosen)
            print(f"seed {seed} {label} first {m}: {out['fit_sample'][f'{label}, first {m} case(s)']}", flush=True)
    use_variant(index, vectors, "none")
    out["first_stage"] = first_stage_recall(index, vectors, ids, embedder, truth, paths)
    index.close()
    return out


def first_stage_recall(index: Index, vectors: np.ndarray, ids: np.ndarray, embedder, truth, paths) -> dict:
    """Item recall@100 of the folded first stage against an exact search of transformed vectors, for each transform;
    and the time of a whole search (embedding excluded) with each."""
    queries = []
    for name, lesions in truth.items():
        volume = read_volume(paths[name])
        for lesion in lesions:
            side = ROI_SCALE * lesion.radius_mm
            query = roi_query(volume, RoiBox(lesion.center, (side,) * 3), "axial", index)
            query.vectors = embedder.embed_images(query.images)
            queries.append(query)
    out = {}
    for label in ("none", "center", "whiten a=0.3"):
        use_variant(index, vectors, label)
        searcher = Searcher(index, embedder)
        began = time.perf_counter()
        for query in queries:
            searcher.search(query, k=len(truth))
        out[label] = {"search_ms": round(1000 * (time.perf_counter() - began) / len(queries), 1)}
        transform = index.transform
        if transform is None:
            continue
        stored = transform.apply(vectors)
        for overfetch in (1, vector_transform.FOLD_OVERFETCH):
            vector_transform.FOLD_OVERFETCH, kept = overfetch, vector_transform.FOLD_OVERFETCH
            recalls = []
            for query in queries:
                _, folded = vector_transform.first_stage(index.store, transform, query.vectors, 100)
                exact = ids[np.argsort(-(transform.apply(query.vectors) @ stored.T), axis=1)[:, :100]]
                recalls += [len(np.intersect1d(f, e)) / 100 for f, e in zip(folded, exact)]
            vector_transform.FOLD_OVERFETCH = kept
            out[label][f"item_recall@100, {overfetch}x fetched"] = {"mean": round(float(np.mean(recalls)), 4),
                                                                    "min": round(float(np.min(recalls)), 4)}
    print(f"first stage and time: {out}", flush=True)
    return out


# ----- real data ----------------------------------------------------------------------------------------------------
def head_ct(path: str, out: str) -> str:
    """The InVesalius example (a gzipped tar: main.plist + raw int16 matrix.dat) as NIfTI."""
    import SimpleITK as sitk

    with tarfile.open(path) as archive:
        members = {os.path.basename(m.name): m for m in archive.getmembers()}
        plist = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        raw = archive.extractfile(members[plist["matrix"]["filename"]]).read()
    array = np.frombuffer(raw, dtype=plist["matrix"]["dtype"]).reshape(plist["matrix"]["shape"])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in plist["spacing"]])
    sitk.WriteImage(image, out)
    return out


def moved_copy(image, labels, seed: int):
    """A rigidly moved, noised, intensity-shifted copy on the same grid, its labels, and the transform (copy -> original)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    transform = sitk.Euler3DTransform()
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    transform.SetCenter(centre)
    transform.SetRotation(*np.deg2rad(rng.uniform(-10, 10, 3)))
    transform.SetTranslation(rng.uniform(-20, 20, 3).tolist())
    moved = sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(moved)
    array = array + rng.normal(0, 20, array.shape) + rng.uniform(-30, 30)
    noisy = sitk.GetImageFromArray(array.astype(np.int16))
    noisy.CopyInformation(image)
    moved_labels = sitk.Resample(labels, labels, transform, sitk.sitkNearestNeighbor, 0)
    return noisy, moved_labels, transform


def organ_queries(volume, labels: np.ndarray, names: dict) -> list[dict]:
    """One ROI per organ of the labelled slab at least 20 mm across on every side there: a cube of at most QUERY_BOX_MM
    (the organ's extent where smaller) around the organ's deepest point (farthest from its border), as a reader would box
    a place in it; the organ's box itself is far larger than the 16-32 mm items a large organ is indexed as."""
    import SimpleITK as sitk

    queries = []
    slab = np.zeros_like(labels)
    slab[SLAB[0]:SLAB[1] + 1] = labels[SLAB[0]:SLAB[1] + 1]
    spacing = np.abs(np.diag(volume.ijk_to_ras[:3, :3]))[::-1]  # (k, j, i) mm, for an axis-aligned grid
    for value in sorted(int(v) for v in np.unique(slab) if v):
        mask = slab == value
        k, j, i = np.nonzero(mask)
        extent = (np.array([np.ptp(i), np.ptp(j), np.ptp(k)]) + 1) * spacing[::-1]
        if extent.min() < 20:
            continue
        inside = sitk.GetImageFromArray(mask.astype(np.uint8))
        inside.SetSpacing(tuple(float(v) for v in spacing[::-1]))
        depth = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(inside, insideIsPositive=False, useImageSpacing=True))
        deepest = np.array(np.unravel_index(np.argmax(depth), mask.shape))[::-1].astype(float)  # (i, j, k)
        centre = volume.ijk_to_ras_points(deepest[None])[0]
        box = RoiBox(tuple(centre), tuple(np.minimum(extent, QUERY_BOX_MM)))
        queries.append({"label": value, "name": names.get(str(value), str(value)), "box": box, "centroid": centre})
    return queries


def real_run(embedder, work: str) -> dict:
    """Organ queries from the abdominal CT into three moved copies, among a head CT and a brain MR."""
    import SimpleITK as sitk

    folder = os.path.join(work, "real")
    os.makedirs(folder, exist_ok=True)
    image = sitk.ReadImage(f"{ABDOMEN}/abdomen_ct.nii.gz")
    labels = sitk.ReadImage(f"{ABDOMEN}/abdomen_ct_labels.nii.gz")
    with open(f"{ABDOMEN}/labels.json") as handle:
        names = json.load(handle)
    copies = {}
    for n in range(3):
        moved, moved_labels, transform = moved_copy(image, labels, seed=100 + n)
        path = os.path.join(folder, f"abdomen_copy{n}.nii.gz")
        sitk.WriteImage(moved, path)
        copies[os.path.abspath(path)] = (sitk.GetArrayFromImage(moved_labels), transform.GetInverse())
    others = [head_ct(HEAD_CT, os.path.join(folder, "head_ct.nii.gz")), BRAIN_MR]
    began = time.monotonic()
    with Index.create(os.path.join(folder, "index"), embedder, IndexSettings()) as index:
        index.add_sources(list(copies) + others, embedder)
    built = time.monotonic() - began
    index = Index.open(os.path.join(folder, "index"))
    ids, vectors = live_vectors(index)
    original = read_volume(f"{ABDOMEN}/abdomen_ct.nii.gz")
    queries = organ_queries(original, sitk.GetArrayFromImage(labels), names)
    copy_volumes = {path: read_volume(path) for path in copies}
    out = {"cases": len(copies) + len(others), "vectors": len(ids), "build_seconds": round(built, 1), "queries": len(queries),
           "pinned": index.manifest["transform"], "variants": {}}
    searcher = Searcher(index, embedder)
    prepared = []
    for q in queries:
        query = roi_query(original, q["box"], "axial", index)
        query.vectors = embedder.embed_images(query.images)
        prepared.append(query)
    for label in VARIANTS:
        use_variant(index, vectors, label)
        hits, errors, top_is_abdomen, related, unrelated, per_organ = [], [], [], [], [], {}
        for q, query in zip(queries, prepared):
            answer = searcher.search(query, k=5)
            top_is_abdomen.append(answer["results"][0]["source"] in copies)
            for result in answer["results"]:
                (related if result["source"] in copies else unrelated).append(result["score"])
            organ_hits = []
            for result in answer["results"]:
                if result["source"] not in copies:
                    continue
                copy_labels, to_copy = copies[result["source"]]
                volume = copy_volumes[result["source"]]
                focus = np.array(result["best_match"]["focus_ras"])
                i, j, k = np.round(volume.ras_to_ijk_points(focus[None])[0]).astype(int)
                inside = 0 <= k < copy_labels.shape[0] and 0 <= j < copy_labels.shape[1] and 0 <= i < copy_labels.shape[2]
                organ_hits.append(bool(inside and copy_labels[k, j, i] == q["label"]))
                lps = np.array([-q["centroid"][0], -q["centroid"][1], q["centroid"][2]])
                truth = np.array(to_copy.TransformPoint(lps.tolist()))
                errors.append(float(np.linalg.norm(focus - np.array([-truth[0], -truth[1], truth[2]]))))
            hits += organ_hits
            per_organ[q["name"]] = round(float(np.mean(organ_hits)), 3) if organ_hits else None
        out["variants"][label] = {"in_organ": round(float(np.mean(hits)), 4), "in_organ_count": f"{sum(hits)}/{len(hits)}",
                                  "median_error_mm": round(float(np.median(errors)), 1),
                                  "top_case_abdominal": f"{sum(top_is_abdomen)}/{len(top_is_abdomen)}",
                                  "spread": spread(related, unrelated), "per_organ": per_organ}
        print(f"real {label}: { {k: v for k, v in out['variants'][label].items() if k != 'per_organ'} }", flush=True)
    use_variant(index, vectors, "none")
    index.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--real", action="store_true", help="also the abdominal CT copies among a head CT and a brain MR")
    parser.add_argument("--out", default="docs/benchmarks/vector_transform.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="cbir-transform-")
    embedder = CachedEmbedder(create_embedder("handcrafted"))
    results = {"model": "handcrafted", "date": time.strftime("%Y-%m-%d"), "default": vector_transform.DEFAULT_KIND,
               "shrinkage": vector_transform.SHRINKAGE}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        results[f"phantoms seed {seed}"] = phantom_run(seed, embedder, work)
    if args.real:
        results["real"] = real_run(embedder, work)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
