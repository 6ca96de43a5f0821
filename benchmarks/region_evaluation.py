"""``cbir evaluate`` by body region on a mixed index of real DICOM series whose headers say PARTIALBODY (issue 29).

The series (DICOM, written by Testing/dicom_helpers.write_series, Body Part Examined = PARTIALBODY, one patient id
each): the head CT and the brain MR and 60 mm slabs at the brainstem's level of reporting head-and-neck patients
("head"); 60 mm slabs at the larynx of other reporting patients ("neck"); the lowest 50 mm of others whose field
of view reaches the lung apices ("chest"); the abdominal CT ("abdomen", a class of one: a distractor, its query
unscored). Each is queried whole against the others (leave-one-case-out, handcrafted model, demo settings), as
``cbir evaluate --labels`` does, in three ways:

* ``similarity``: no prior (``--no-prior``);
* ``modality_only``: what the prior did before when every header said PARTIALBODY (the word was taken as a region,
  every case shared it, so the modality alone ordered);
* ``prior``: today's prior (the image's regions and levels, the PARTIALBODY header set aside).

    python benchmarks/region_evaluation.py [--per-class 4] [--work DIR] [--out docs/benchmarks/region_evaluation.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "Testing"))
from body_axis_template import organ_levels_s  # noqa: E402
from dicom_helpers import write_series  # noqa: E402
from patient_split import part  # noqa: E402
from real_anatomy import slab_around  # noqa: E402
from real_data import prepare, shared_data_dir  # noqa: E402


def at_s(volume, s: float, thickness: float):
    centre = volume.center_ras.copy()
    centre[2] = s
    return slab_around(volume, centre, thickness)


def integer(volume):
    """The volume with integer voxels (DICOM stores integers)."""
    import dataclasses

    return dataclasses.replace(volume, array=np.round(np.asarray(volume.array, float)).astype(np.int32), extra=dict(volume.extra))


def series(work: Path, per_class: int) -> list[dict]:
    """Write the DICOM series (once); [{folder, label, patient, modality}]."""
    from CBIRSlicerLib.imaging import body_axis
    from CBIRSlicerLib.imaging.readers import read_volume

    out = []

    def add(volume, name, label, patient, modality="CT"):
        folder = work / "series" / name
        if not folder.exists():
            write_series(integer(volume), str(folder), name, patient_id=patient, modality=modality, body_part="PARTIALBODY")
        out.append({"folder": str(folder), "label": label, "patient": patient, "modality": modality})

    folder = shared_data_dir() / "real" / "head-neck-ct"
    with open(folder / "cases.csv", newline="") as handle:
        cases = [r["case"] for r in csv.DictReader(handle) if part(r["case"]) == "reporting"]
    wanted = {"head": per_class, "neck": per_class, "chest": per_class}
    for case in cases:
        if not any(wanted.values()):
            break
        volume = read_volume(folder / f"{case}_ct.nii.gz")
        organs = organ_levels_s(read_volume(folder / f"{case}_labels.nii.gz"))
        axis = body_axis.body_axis(volume)
        # one piece per patient, to the class that still wants one: chest first (fewest patients reach it)
        if wanted["chest"] and axis is not None and axis.level_range[1] >= 340.0:
            add(at_s(volume, axis.s_range[0] + 25.0, 50.0), f"{case}_chest", "chest", case)
            wanted["chest"] -= 1
        elif wanted["neck"] and "larynx" in organs:
            add(at_s(volume, organs["larynx"][0], 60.0), f"{case}_larynx", "neck", case)
            wanted["neck"] -= 1
        elif wanted["head"] and "brainstem" in organs:
            add(at_s(volume, organs["brainstem"][0], 60.0), f"{case}_brainstem", "head", case)
            wanted["head"] -= 1
    real = prepare()
    add(read_volume(real["head_ct"].image), "head_ct", "head", "HEADCT")
    add(read_volume(real["brain_mr"].image), "brain_mr", "head", "COLIN27", "MR")
    add(read_volume(real["abdomen_ct"].image), "abdomen_ct", "abdomen", "TOTALSEG")
    return out


class _ModalityOnly:
    """A searcher whose prior orders by modality alone (the prior before, when every header said PARTIALBODY)."""

    def __init__(self, searcher):
        self.inner, self.index = searcher, searcher.index

    def search(self, query, k=10, filters=None, method="maxsim", **kwargs):
        answer = self.inner.search(query, k=len(self.index.catalog.cases()), filters=filters, method=method, prior=False)
        modality = (query.volume.modality or "").upper()
        cases = {c.case_id: (c.modality or "").upper() for c in self.index.catalog.cases()}
        ordered = sorted(answer.results, key=lambda r: cases.get(r.case_id) != modality)  # stable: similarity within
        import dataclasses

        return dataclasses.replace(answer, results=ordered[:k])


class _NoPrior:
    def __init__(self, searcher):
        self.inner, self.index = searcher, searcher.index

    def search(self, query, k=10, filters=None, method="maxsim", **kwargs):
        return self.inner.search(query, k=k, filters=filters, method=method, prior=False)


def run(work: Path, per_class: int) -> dict:
    from CBIRSlicerLib.demo import demo_settings
    from CBIRSlicerLib.index.files import MANIFEST
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.models.registry import create_embedder
    from CBIRSlicerLib.retrieval.evaluation import LabelledVolume, evaluate_volumes
    from CBIRSlicerLib.retrieval.search import Searcher

    began = time.process_time()
    written = series(work, per_class)
    embedder = create_embedder("handcrafted")
    folder = work / "index"
    index = Index.open(str(folder), writable=True) if (folder / MANIFEST).exists() else Index.create(str(folder), embedder,
                                                                                                      demo_settings())
    with index:
        index.add_sources([w["folder"] for w in written], embedder)
    built = time.process_time() - began
    index = Index.open(str(folder))
    sources = {c.source: c for c in index.catalog.cases()}
    catalog = [{"series": os.path.basename(w["folder"]), "label": w["label"], "body_part": case.body_part,
                "body_part_dicom": case.metadata.get("body_part_dicom"), "regions": case.metadata.get("regions"),
                "levels": case.metadata.get("levels")}
               for w in written if (case := sources.get(w["folder"])) is not None]
    rows = [LabelledVolume(w["folder"], w["label"]) for w in written]
    searcher = Searcher(index)
    out = {"data": "real DICOM series written from real/head-neck-ct reporting patients (OpenKBP), the head CT, brain MR and "
                   "abdominal CT, every header Body Part Examined = PARTIALBODY", "series": len(written),
           "classes": {label: sum(1 for w in written if w["label"] == label) for label in sorted({w["label"] for w in written})},
           "catalog": catalog, "ways": {}}
    for name, engine in (("similarity", _NoPrior(searcher)), ("modality_only", _ModalityOnly(searcher)), ("prior", searcher)):
        evaluation = evaluate_volumes(rows, engine, ks=(1, 3, 5))
        summary = evaluation.summary
        out["ways"][name] = {key: (round(v, 3) if isinstance(v, float) else v) for key, v in summary.items()
                             if key.startswith(("mP@", "mAP@", "chance", "queries", "scored"))}
        out["ways"][name]["suggestion"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary["knn"].items()
                                           if k != "calibration"}
        out["ways"][name]["top1"] = {os.path.basename(r["case"]): r["ranked"][0] if r["ranked"] else None
                                     for r in evaluation.records}
    out["cpu_s"] = {"build": round(built, 1), "total": round(time.process_time() - began, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=4, help="head-and-neck patients per class (head, neck, chest)")
    parser.add_argument("--work", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="cbir_region_eval_"))
    report = run(work, args.per_class)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
