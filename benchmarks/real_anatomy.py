"""Real anatomy: find the same structure in another "patient" made from a real volume, and rank cases by kind.

From each real volume (abdominal CT with organ labels, head CT, brain MR with the AAL atlas;
:mod:`real_data`) a few pseudo-patients are made by known transformations (:mod:`pseudo_patients`),
and indexed with synthetic phantoms as distractors through the product path (``Index`` with the
default settings, ``roi_query`` + ``Searcher.search``). Each query is an ROI around one structure of
one copy, its own case left out; the answer's top case should be another copy of the same real volume,
and its match focus should lie inside the same structure (looked up in that copy's warped label map)
and near the query centre's true position there (mapped exactly through both copies' transforms).

* Query centre: the structure's deepest voxel (farthest from its border: inside it even when the
  structure is curved, and its true place in another copy stays inside). Query ROI: a box centred
  there, each side the structure's extent along that axis clipped to 20-60 mm (head CT landmarks: a 40 mm cube).
* Abdominal CT: organs inside the labelled slab (k 82-111) only; a match outside it finds label 0, a
  miss. Brain MR: AAL regions. Head CT: bone and air landmarks (``landmarks()``, committed in
  docs/benchmarks/real_head_landmarks.json), scored by distance only.
* Structures whose equivalent-sphere diameter and smallest box side are both >= 20 mm are "large"
  (the main table); the rest are reported apart.
* Case ranking: a whole-volume query per copy (16 axial slices); the top case should be of the same
  modality and body region (phantoms are their own kind).

Copies of one real patient are easier than other patients: every figure here is an upper bound on
what the same code does across real patients.

    python benchmarks/real_anatomy.py --quick          # ~5 min on 2 cores
    python benchmarks/real_anatomy.py                  # the full run
    python benchmarks/real_anatomy.py --work DIR       # keep (and reuse) the copies and the index there

Across real different patients (the main figure since issue 29; benchmarks/cross_patient.py):

    python benchmarks/real_anatomy.py --cross-patient --quick [--slabs from|into] [--part tuning] [--model M]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pseudo_patients
import real_data

REPO = Path(__file__).resolve().parents[1]
LANDMARKS_JSON = REPO / "docs" / "benchmarks" / "real_head_landmarks.json"
LARGE_MM = 20.0
ROI_MIN_MM, ROI_MAX_MM, LANDMARK_ROI_MM = 20.0, 60.0, 40.0

CONFIGS = {
    # copies per real volume, phantoms, in-plane spacing of the copies (None: the source's), AAL regions queried per copy
    "quick": {"copies": 3, "phantoms": 4, "inplane_mm": {"abdomen_ct": None, "head_ct": 1.5, "brain_mr": 1.5},
              "brain_regions": 16, "abdomen_structures": 0},
    "full": {"copies": 4, "phantoms": 6, "inplane_mm": {"abdomen_ct": None, "head_ct": None, "brain_mr": None},
             "brain_regions": 0, "abdomen_structures": 0},
}


@dataclass
class Copy:
    """One pseudo-patient: its files, its transform and the real volume it comes from."""

    volume: str
    number: int
    image: str
    labels: str | None
    transform: str
    spec: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    """The copies, phantoms and index of one benchmark build, with the real volumes' descriptions."""

    work: str
    volumes: dict
    copies: list[Copy]
    phantoms: list[str]
    index_folder: str
    structures: dict  # volume -> {label: {"name", "large", "diameter_mm", ...}}
    landmarks: dict  # head landmarks: name -> RAS
    config: dict
    build_seconds: float = 0.0


def kind_of(volume: real_data.RealVolume | None) -> str:
    """'CT head', 'MR head', 'CT abdomen' or 'phantom'."""
    return f"{volume.modality} {volume.body_region}" if volume is not None else "phantom"


def structure_table(labels_path: str, names: dict[int, str]) -> dict[int, dict]:
    """Per label: name, voxel count, equivalent-sphere diameter, box sides (mm), and whether it is large."""
    import SimpleITK as sitk

    stats = sitk.LabelShapeStatisticsImageFilter()
    image = sitk.ReadImage(labels_path)
    stats.Execute(image)
    spacing = np.array(image.GetSpacing())
    table = {}
    for label in stats.GetLabels():
        sides = np.array(stats.GetBoundingBox(label)[3:]) * spacing
        diameter = 2 * stats.GetEquivalentSphericalRadius(label)
        table[int(label)] = {"name": names.get(int(label), str(label)), "volume_mm3": round(float(stats.GetPhysicalSize(label))),
                             "diameter_mm": round(float(diameter), 1), "box_mm": [round(float(s), 1) for s in sides],
                             "large": bool(diameter >= LARGE_MM and sides.min() >= LARGE_MM)}
    return table


def landmarks(head_ct_path: str) -> dict[str, list[float]]:
    """Bone and air landmarks of the head CT (RAS mm), each found by a threshold and a centroid or an extreme point.

    Head: the largest connected part above -300 HU (drops the head rest). Bone: > 300 HU inside it. Enclosed air:
    < -500 HU parts that do not touch the volume's border. Dense bone: > 1500 HU; enamel: > 2500 HU.
    """
    import SimpleITK as sitk

    image = sitk.ReadImage(head_ct_path)
    array = sitk.GetArrayFromImage(image)
    head = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(image > -300))) == 1
    k, j, i = np.indices(array.shape)
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = ijk * np.array(image.GetSpacing()) @ direction.T + np.array(image.GetOrigin())
    ras = (lps * pseudo_patients.FLIP).reshape(array.shape + (3,))
    bone = head & (array > 300)
    air = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((array < -500).astype(np.uint8)))))
    edge = set(np.unique(np.concatenate([air[0].ravel(), air[-1].ravel(), air[:, 0].ravel(), air[:, -1].ravel(),
                                         air[:, :, 0].ravel(), air[:, :, -1].ravel()])))
    pockets = [n for n in range(1, int(air.max()) + 1) if n not in edge]  # relabelled: largest first
    out = {}

    def centroid(mask):
        return [round(float(v), 2) for v in ras[mask].mean(axis=0)]

    def extreme(mask, axis, sign):
        points = ras[mask]
        return [round(float(v), 2) for v in points[np.argmax(sign * points[:, axis])]]

    out["sinus_air_largest"] = centroid(air == pockets[0])
    lateral = [n for n in pockets if abs(ras[air == n][:, 0].mean()) > 40]
    out["mastoid_air_largest"] = centroid(air == lateral[0])
    dense = head & (array > 1500) & (array <= 2500)
    out["dense_bone_left"] = centroid(dense & (ras[..., 0] > 0))
    out["dense_bone_right"] = centroid(dense & (ras[..., 0] < 0))
    out["enamel"] = centroid(head & (array > 2500))
    out["bone_most_anterior"] = extreme(bone, 1, 1)
    out["bone_most_posterior"] = extreme(bone, 1, -1)
    out["bone_most_superior"] = extreme(bone, 2, 1)
    out["bone_most_left"] = extreme(bone, 0, 1)
    out["bone_most_right"] = extreme(bone, 0, -1)
    return out


def write_landmarks(head_ct_path: str, path: Path = LANDMARKS_JSON) -> dict:
    """Compute the head CT landmarks and write them with how they were chosen."""
    points = landmarks(head_ct_path)
    data = {"volume": "InVesalius Cranium.inv3 (Debian invesalius-examples) converted by benchmarks/real_data.py",
            "frame": "RAS mm of that NIfTI (volume centre at the origin)",
            "how": landmarks.__doc__.split("\n\n")[1].strip().replace("\n    ", " ") + " Names say which centroid or extreme.",
            "landmarks": points}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return points


def build(work: str, config: dict, seed: int = 0, cache: str | None = None) -> Benchmark:
    """Make (or reuse from ``work``) the copies, phantoms and index of the benchmark."""
    from CBIRSlicerLib.imaging import synthetic
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.models.registry import create_embedder

    began = time.monotonic()
    volumes = real_data.prepare(cache, config.get("volumes", real_data.VOLUMES))
    copies: list[Copy] = []
    for number, (name, volume) in enumerate(volumes.items()):
        folder = Path(work, name)
        listing = folder / "copies.json"
        if listing.exists() and json.loads(listing.read_text()).get("config") == [config["copies"], config["inplane_mm"].get(name), seed]:
            made = json.loads(listing.read_text())["copies"]
        else:
            made = pseudo_patients.write_copies(volume.image, volume.labels, volume.modality, folder, config["copies"],
                                                seed=seed * 10 + number, inplane_mm=config["inplane_mm"].get(name),
                                                name=name, protect_k=volume.labelled_k)
            listing.write_text(json.dumps({"config": [config["copies"], config["inplane_mm"].get(name), seed], "copies": made}))
        copies += [Copy(name, n, m["image"], m["labels"], m["transform"], m["spec"]) for n, m in enumerate(made)]
    phantoms = []
    if config["phantoms"]:
        folder = Path(work, "phantoms")
        phantoms = sorted(str(p) for p in folder.glob("*.nii.gz")) if folder.is_dir() else []
        if len(phantoms) != config["phantoms"]:
            phantoms = synthetic.write_cohort(synthetic.make_cohort(config["phantoms"], seed=seed, prefix="phantom"), str(folder))
    index_folder = os.path.join(work, "index")
    embedder = create_embedder(config.get("model", "handcrafted"))  # settings: the product's defaults unless a test asks
    if not os.path.exists(os.path.join(index_folder, "manifest.json")):
        with Index.create(index_folder, embedder, IndexSettings(**config.get("settings", {}))) as index:
            index.add_sources([c.image for c in copies] + phantoms, embedder)
    else:
        with Index.open(index_folder, writable=True) as index:
            index.add_sources([c.image for c in copies] + phantoms, embedder)
    structures = {name: structure_table(v.labels, v.names) for name, v in volumes.items() if v.labels}
    points = {}
    if "head_ct" in volumes:
        if LANDMARKS_JSON.exists():
            points = json.loads(LANDMARKS_JSON.read_text())["landmarks"]
        else:
            points = write_landmarks(volumes["head_ct"].image)
    return Benchmark(work, volumes, copies, phantoms, index_folder, structures, points, config, time.monotonic() - began)


class _LabelMap:
    """A copy's label map for look-ups at RAS points."""

    def __init__(self, path: str):
        import SimpleITK as sitk

        self.image = sitk.ReadImage(path)
        self.array = sitk.GetArrayFromImage(self.image)

    def at(self, ras) -> int:
        point = tuple(float(v) for v in np.asarray(ras, float) * pseudo_patients.FLIP)
        index = self.image.TransformPhysicalPointToIndex(point)
        if all(0 <= index[n] < self.image.GetSize()[n] for n in range(3)):
            return int(self.array[index[2], index[1], index[0]])
        return 0

    def _ras(self, kji: np.ndarray) -> np.ndarray:
        direction = np.array(self.image.GetDirection()).reshape(3, 3)
        lps = kji[:, ::-1].astype(float) * np.array(self.image.GetSpacing()) @ direction.T + np.array(self.image.GetOrigin())
        return lps * pseudo_patients.FLIP

    def voxels_ras(self, label: int) -> np.ndarray:
        return self._ras(np.argwhere(self.array == label))

    def deepest_ras(self, label: int) -> np.ndarray:
        """The structure's voxel farthest inside it (largest distance to its border, in mm); ties: nearest its centroid."""
        import SimpleITK as sitk

        where = np.argwhere(self.array == label)
        low, high = where.min(axis=0) - 1, where.max(axis=0) + 2
        low = np.maximum(low, 0)
        crop = (self.array[low[0]:high[0], low[1]:high[1], low[2]:high[2]] == label).astype(np.uint8)
        mask = sitk.GetImageFromArray(crop)
        mask.SetSpacing(self.image.GetSpacing())
        depth = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False,
                                                                     useImageSpacing=True))
        inside = np.argwhere(crop > 0)
        values = depth[tuple(inside.T)]
        best = inside[values >= values.max() - 1e-6] + low
        points = self._ras(best)
        centroid = self._ras(where).mean(axis=0)
        return points[np.argmin(np.linalg.norm(points - centroid, axis=1))]


def queries_of(bench: Benchmark, copy: Copy, labels: _LabelMap | None, patient, volume) -> list[dict]:
    """The structures queried in one copy: label (or landmark name), centre (RAS, in the copy), ROI box."""
    from CBIRSlicerLib.imaging.roi import RoiBox

    out = []
    if copy.volume == "head_ct":
        for name, point in bench.landmarks.items():
            centre = patient.source_to_copy(np.array(point))
            out.append({"structure": name, "label": None, "large": True, "centre": centre,
                        "roi": RoiBox(tuple(centre), (LANDMARK_ROI_MM,) * 3)})
        return out
    table = bench.structures[copy.volume]
    chosen = sorted(table)
    if copy.volume == "brain_mr" and bench.config.get("brain_regions"):
        large = [n for n in chosen if table[n]["large"]]
        small = [n for n in chosen if not table[n]["large"]]
        rng = np.random.default_rng(copy.number)
        want = bench.config["brain_regions"]
        chosen = sorted(rng.choice(large, min(len(large), want), replace=False).tolist()
                        + rng.choice(small, min(len(small), max(1, want // 4)), replace=False).tolist())
    for label in chosen:
        points = labels.voxels_ras(label)
        if len(points) * np.prod(labels.image.GetSpacing()) < 0.5 * table[label]["volume_mm3"]:
            continue  # mostly cropped away in this copy: no fair query
        centre = labels.deepest_ras(label)
        sides = np.clip(points.max(axis=0) - points.min(axis=0), ROI_MIN_MM, ROI_MAX_MM)
        out.append({"structure": table[label]["name"], "label": label, "large": table[label]["large"], "centre": centre,
                    "roi": RoiBox(tuple(centre), tuple(sides))})
    return out


def _contains(volume, ras, tolerance_voxels: float = 0.5) -> bool:
    """Whether a RAS point lies inside a volume's voxel grid (with half a voxel of margin)."""
    ijk = volume.ras_to_ijk_points(np.asarray(ras, float)[None])[0]
    return bool(np.all(ijk >= -tolerance_voxels) and np.all(ijk <= np.array(volume.shape_ijk) - 1 + tolerance_voxels))


def slab_around(volume, centre_ras, thickness_mm: float):
    """The volume cut to a slab of about ``thickness_mm`` along its voxel axis nearest the body axis, centred on a point:
    a thin clinical series of the same patient (the query volumes of ``--slab-mm``), with the volume's source and
    metadata."""
    import dataclasses

    axis = int(np.argmax(np.abs(volume.directions[2])))  # i, j or k: the one most along S
    index = volume.ras_to_ijk_points(np.asarray(centre_ras, float)[None])[0][axis]
    half = thickness_mm / 2 / volume.spacing[axis]
    low = max(0, int(round(index - half)))
    high = min(volume.shape_ijk[axis] - 1, int(round(index + half)))
    cut = [slice(None)] * 3
    cut[2 - axis] = slice(low, high + 1)  # the array is [k, j, i]
    shift = np.eye(4)
    shift[axis, 3] = low
    # The same source, so a search leaves the copy the slab was cut from out as it leaves the query's own case out.
    return dataclasses.replace(volume, array=np.ascontiguousarray(volume.array[tuple(cut)]), ijk_to_ras=volume.ijk_to_ras @ shift,
                               extra=dict(volume.extra))


def run(bench: Benchmark, searcher=None, k: int = 10, method: str = "maxsim", prior: bool = False, place: bool = True,
        place_top: int | None = None, slab_mm: float | None = None) -> dict:
    """Every query of the benchmark through ``searcher`` (default: the index's own model); per-query records.

    ``place``: each shown result's match placed as ``cbir search`` places it by default (:meth:`Searcher.place`);
    ``place_top``: only the first so many (the figures score the first result of the same real volume, rank 1 whenever
    ``same_patient_at_1`` is 100 %: placing the rest changes no figure and costs most of the time).

    ``prior``: search only cases of the query's own modality and body region as the catalog holds them (inferred
    from the images here), through the search's catalog filters.

    ``slab_mm``: each ROI query is asked on a slab of that thickness around its centre, cut from the query copy (a thin
    clinical series: its level in a result must be found, not taken from the centres of mass); the whole-volume case
    queries keep the whole copy.
    """
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import roi_query, volume_query
    from CBIRSlicerLib.retrieval.search import Searcher

    if searcher is None:
        searcher = Searcher(Index.open(bench.index_folder))
    by_source = {os.path.abspath(c.image): c for c in bench.copies}
    phantoms = {os.path.abspath(p) for p in bench.phantoms}
    patients = {(c.volume, c.number): pseudo_patients.PseudoPatient.load(c.transform) for c in bench.copies}
    label_maps = {(c.volume, c.number): _LabelMap(c.labels) for c in bench.copies if c.labels}
    records, cases = [], []
    began = time.monotonic()
    for copy in bench.copies:
        volume = read_volume(copy.image)
        key = (copy.volume, copy.number)
        patient = patients[key]
        kind = kind_of(bench.volumes[copy.volume])
        filters = None
        if prior:
            case = next(c for c in searcher.index.catalog.cases() if os.path.abspath(c.source) == os.path.abspath(copy.image))
            filters = {"modality": case.modality, "body_part": case.body_part}

        def describe(result):
            other = by_source.get(os.path.abspath(result.source))
            if other is None:
                return None, "phantom" if os.path.abspath(result.source) in phantoms else "other"
            return other, kind_of(bench.volumes[other.volume])

        answer = searcher.search(volume_query(volume, "axial", searcher.index), k=k, filters=filters, method=method)
        top, top_kind = describe(answer.results[0]) if answer.results else (None, "none")
        cases.append({"volume": copy.volume, "copy": copy.number, "kind": kind, "top_kind": top_kind,
                      "same_kind": top_kind == kind, "same_volume": top is not None and top.volume == copy.volume})
        for query in queries_of(bench, copy, label_maps.get(key), patient, volume):
            if not _contains(volume, query["centre"]):
                continue  # a landmark cropped out of this copy
            asked_volume = volume if not slab_mm else slab_around(volume, query["centre"], slab_mm)
            asked = roi_query(asked_volume, query["roi"], "axial", searcher.index)
            answer = searcher.search(asked, k=k, filters=filters, method=method)
            if place:
                answer = searcher.place(asked, answer, limit=place_top)
            source_point = patient.copy_to_source(query["centre"])
            outcome = {"volume": copy.volume, "copy": copy.number, "structure": query["structure"], "label": query["label"],
                       "large": query["large"], "roi_ras": [round(v, 2) for v in query["roi"].as_list()]}
            first_same = None
            for rank, result in enumerate(answer.results, start=1):
                other, other_kind = describe(result)
                if rank == 1:
                    outcome["top_kind"], outcome["same_kind_at_1"] = other_kind, other_kind == kind
                if other is None or other.volume != copy.volume:
                    continue
                focus = np.array(result.best_match.spot)
                truth = patients[(other.volume, other.number)].source_to_copy(source_point)
                found = {"rank": rank, "copy": other.number, "error_mm": round(float(np.linalg.norm(focus - truth)), 2),
                         "focus_ras": [round(float(v), 2) for v in focus], "truth_ras": [round(float(v), 2) for v in truth],
                         **{name: getattr(result.best_match, name, None) for name in ("shown", "in_view", "note")}}
                if query["label"] is not None:
                    found["inside"] = label_maps[(other.volume, other.number)].at(focus) == query["label"]
                    # The ceiling: whether the true place itself reads the label there (it can fall outside that copy's
                    # field of view or labelled slab, or off a thin structure's nearest-neighbour-warped label).
                    found["truth_inside"] = label_maps[(other.volume, other.number)].at(truth) == query["label"]
                first_same = found
                break
            outcome["first_same_patient"] = first_same
            at_1 = first_same is not None and first_same["rank"] == 1
            outcome["error_mm_at_1"] = first_same["error_mm"] if at_1 else None
            outcome["inside_at_1"] = bool(at_1 and first_same.get("inside", False)) if query["label"] is not None else None
            records.append(outcome)
    seconds = time.monotonic() - began
    return {"records": records, "cases": cases, "seconds": round(seconds, 1),
            "seconds_per_query": round(seconds / max(1, len(records) + len(cases)), 3)}


def catalog_kinds(bench: Benchmark) -> dict:
    """Whether the index inferred each copy's modality and body region right (the files are NIfTI: nothing is told)."""
    from CBIRSlicerLib.index.folder import Index

    expected = {os.path.abspath(c.image): bench.volumes[c.volume] for c in bench.copies}
    index = Index.open(bench.index_folder)
    rows = []
    for case in index.catalog.cases():
        volume = expected.get(os.path.abspath(case.source))
        if volume is None:
            continue
        rows.append({"case": os.path.basename(case.source), "modality": case.modality, "body_part": case.body_part,
                     "sources": [case.metadata.get("modality_source"), case.metadata.get("body_part_source")],
                     "right": case.modality == volume.modality and (case.body_part or "").lower() == volume.body_region})
    index.close()
    return {"cases": len(rows), "right": sum(r["right"] for r in rows), "wrong": [r for r in rows if not r["right"]],
            "sources": sorted({s for r in rows for s in r["sources"] if s})}


def add_chance(bench: Benchmark, records: list[dict]) -> None:
    """Each labelled query's chance of 'inside': the structure's share of the body (CT > -500 HU; MR > 10 % of p99) in its copy."""
    import SimpleITK as sitk

    shares = {}
    for copy in bench.copies:
        if not copy.labels:
            continue
        image = sitk.GetArrayFromImage(sitk.ReadImage(copy.image))
        ct = bench.volumes[copy.volume].modality == "CT"
        body = np.count_nonzero(image > (-500 if ct else 0.1 * np.percentile(image, 99)))
        counts = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(copy.labels)).ravel())
        shares[(copy.volume, copy.number)] = counts / max(1, body)
    for r in records:
        share = shares.get((r["volume"], r["copy"]))
        if share is not None and r["label"] is not None:
            r["chance_inside"] = round(float(share[r["label"]]) if r["label"] < len(share) else 0.0, 5)


def _median(values) -> float | None:
    values = [np.inf if v is None else v for v in values]
    return round(float(np.median(values)), 1) if values else None


def summarise(outcome: dict) -> dict:
    """Per-structure table and per-volume summary (large and small structures apart) of a run's records."""
    records = outcome["records"]
    per_structure = {}
    for r in records:
        per_structure.setdefault((r["volume"], r["structure"]), []).append(r)
    table = []
    for (volume, structure), rows in sorted(per_structure.items()):
        row = {"volume": volume, "structure": structure, "large": rows[0]["large"], "queries": len(rows),
               "same_patient_at_1": round(np.mean([r["error_mm_at_1"] is not None for r in rows]), 3),
               "median_error_mm_at_1": _median([r["error_mm_at_1"] for r in rows])}
        if rows[0]["label"] is not None:
            row["inside_at_1"] = round(float(np.mean([r["inside_at_1"] for r in rows])), 3)
        table.append(row)
    summary = {}
    for volume in sorted({r["volume"] for r in records}):
        for size in ("large", "small"):
            rows = [r for r in records if r["volume"] == volume and r["large"] == (size == "large")]
            if not rows:
                continue
            errors = [r["error_mm_at_1"] for r in rows]
            entry = {"queries": len(rows), "same_kind_at_1": round(float(np.mean([r["same_kind_at_1"] for r in rows])), 3),
                     "same_patient_at_1": round(float(np.mean([e is not None for e in errors])), 3),
                     "median_error_mm_at_1": _median(errors),
                     "within_10mm_at_1": round(float(np.mean([e is not None and e <= 10 for e in errors])), 3)}
            if rows[0]["label"] is not None:
                entry["inside_at_1"] = round(float(np.mean([r["inside_at_1"] for r in rows])), 3)
                at_1 = [r["first_same_patient"] for r in rows if r["error_mm_at_1"] is not None]
                if at_1 and all("truth_inside" in f for f in at_1):  # what a perfect placement would score
                    entry["truth_inside_at_1"] = round(float(np.sum([f["truth_inside"] for f in at_1]) / len(rows)), 3)
                if all("chance_inside" in r for r in rows):
                    entry["chance_inside"] = round(float(np.mean([r["chance_inside"] for r in rows])), 4)
            firsts = [r["first_same_patient"] for r in rows if r["first_same_patient"] is not None]
            entry["first_same_patient_in_top10"] = round(len(firsts) / len(rows), 3)
            entry["first_same_patient_median_error_mm"] = _median([f["error_mm"] for f in firsts]) if firsts else None
            if rows[0]["label"] is not None and firsts:
                entry["first_same_patient_inside"] = round(float(np.mean([f["inside"] for f in firsts])), 3)
            summary[f"{volume} ({size})"] = entry
    cases = outcome["cases"]
    summary["case ranking (volume queries)"] = {
        "queries": len(cases), "top_case_same_kind": round(float(np.mean([c["same_kind"] for c in cases])), 3),
        "top_case_same_volume": round(float(np.mean([c["same_volume"] for c in cases])), 3),
        "by_kind": {kind: round(float(np.mean([c["same_kind"] for c in cases if c["kind"] == kind])), 3)
                    for kind in sorted({c["kind"] for c in cases})}}
    return {"summary": summary, "per_structure": table}


def markdown(result: dict) -> str:
    """The summary and per-structure tables of a result JSON as Markdown, for docs/benchmarks.md."""
    def cell(value, percent=False):
        if value is None:
            return "-"
        if isinstance(value, float) and np.isinf(value):
            return "inf"
        return f"{100 * value:.0f} %" if percent else f"{value:g}"

    lines = ["| volume (structures) | queries | top case same kind | top case same patient | inside, top 1 (chance) |"
             " median error, top 1 | within 10 mm | same patient in top 10: inside / median error |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in result["summary"].items():
        if "queries" not in e or name.startswith("case ranking"):
            continue
        chance = e.get("chance_inside")
        inside = cell(e.get("inside_at_1"), True) + (f" ({100 * chance:.1f} %)" if chance is not None else "")
        inside = inside if "inside_at_1" in e else "-"
        first = (f"{cell(e.get('first_same_patient_inside'), True)} / {cell(e.get('first_same_patient_median_error_mm'))} mm"
                 if "first_same_patient_inside" in e else f"- / {cell(e.get('first_same_patient_median_error_mm'))} mm")
        lines.append(f"| {name} | {e['queries']} | {cell(e['same_kind_at_1'], True)} | {cell(e['same_patient_at_1'], True)} | "
                     f"{inside} | {cell(e['median_error_mm_at_1'])} mm | {cell(e['within_10mm_at_1'], True)} | {first} |")
    ranking = result["summary"].get("case ranking (volume queries)")
    if ranking:
        lines += ["", f"Whole-volume queries ({ranking['queries']}): top case of the same modality and body region "
                      f"{cell(ranking['top_case_same_kind'], True)}, a copy of the same real volume "
                      f"{cell(ranking['top_case_same_volume'], True)} (by kind: "
                      + ", ".join(f"{k} {cell(v, True)}" for k, v in ranking["by_kind"].items()) + ")."]
    lines += ["", "| volume | structure | large | queries | inside, top 1 | median error, top 1 |", "|---|---|---|---|---|---|"]
    for row in result["per_structure"]:
        lines.append(f"| {row['volume']} | {row['structure']} | {'yes' if row['large'] else 'no'} | {row['queries']} | "
                     f"{cell(row.get('inside_at_1'), True)} | {cell(row['median_error_mm_at_1'])} mm |")
    return "\n".join(lines)


def main() -> None:
    if "--cross-patient" in sys.argv[1:]:  # the main figure of issue 29: real different patients (cross_patient.py)
        import cross_patient

        cross_patient.main([a for a in sys.argv[1:] if a != "--cross-patient"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 copies per volume, coarser copies, 16 AAL regions per copy")
    parser.add_argument("--work", default=None, help="folder for the copies and the index (kept; reused when present)")
    parser.add_argument("--cache", default=None, help="folder of the Debian packages (real_data.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--volumes", default="", help="comma-separated subset of abdomen_ct,head_ct,brain_mr")
    parser.add_argument("--out", default=None, help="JSON file (default docs/benchmarks/real_anatomy[_quick].json)")
    parser.add_argument("--landmarks", action="store_true", help="recompute and write the head CT landmarks JSON, then stop")
    parser.add_argument("--prior", action="store_true", help="search only the query's own modality and body region (catalog)")
    parser.add_argument("--model", default="handcrafted", help="the index's model (e.g. astra-ct, with the ct3d extra)")
    parser.add_argument("--no-place", action="store_true", help="keep the look-alike matches (no placement), as before it")
    parser.add_argument("--place-top", type=int, default=None, help="place only the first N results (default all shown)")
    parser.add_argument("--slab-mm", type=float, default=None,
                        help="ask each ROI query on a slab of this thickness around it, cut from its copy (thin series)")
    parser.add_argument("--markdown", metavar="JSON", help="print the tables of a result JSON as Markdown, then stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.landmarks:
        print(json.dumps(write_landmarks(real_data.prepare(args.cache)["head_ct"].image), indent=1))
        return
    config = dict(CONFIGS["quick" if args.quick else "full"], model=args.model)
    if args.volumes:
        config["volumes"] = args.volumes.split(",")
    work = args.work or tempfile.mkdtemp(prefix="cbir-real-")
    bench = build(work, config, args.seed, args.cache)
    print(f"built in {bench.build_seconds:.0f} s: {len(bench.copies)} copies, {len(bench.phantoms)} phantoms, in {work}", flush=True)
    outcome = run(bench, prior=args.prior, place=not args.no_place, place_top=args.place_top, slab_mm=args.slab_mm)
    add_chance(bench, outcome["records"])
    kinds = catalog_kinds(bench)
    result = {"inferred_kinds": kinds, "data": {n: {"kind": kind_of(v), "source": v.source} for n, v in bench.volumes.items()},
              "note": "pseudo-patients of one real volume each: copies of one real patient are easier than other patients",
              "model": args.model, "prior": args.prior, "placed": not args.no_place, "place_top": args.place_top,
              "slab_mm": args.slab_mm,
              "config": config, "seed": args.seed, "build_seconds": round(bench.build_seconds, 1),
              "copies": [asdict(c) | {"image": os.path.basename(c.image)} for c in bench.copies],
              **summarise(outcome), "seconds": outcome["seconds"], "seconds_per_query": outcome["seconds_per_query"],
              "records": outcome["records"], "cases": outcome["cases"]}
    stem = "real_anatomy" + ("_quick" if args.quick else "") + ("_prior" if args.prior else "")
    stem += ("" if args.no_place else "_placed") + ("" if args.model == "handcrafted" else "_" + args.model)
    stem += f"_slab{args.slab_mm:g}" if args.slab_mm else ""
    out = args.out or str(REPO / "docs" / "benchmarks" / f"{stem}.json")
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
