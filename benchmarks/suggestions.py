"""Suggested findings on real labelled cases: accuracy, abstention and reliability (calibration) of the confidence.

The labelled set is real anatomy: 60 mm slabs (real crops) of the *reporting* head-and-neck patients
(``patient_split``) centred on an organ, labelled by the level they show ("skull base" at the brainstem's
centroid, "jaw" at the mandible's, "larynx" at the larynx's), slabs of the abdominal CT ("upper abdomen" at 70
and 85 % of its height, "pelvis" at 15 and 30 %), of the head CT and of the brain MR ("brain" at 60 and 85 %).
Every slab is a case of one index (handcrafted model, demo settings) with its label. Each case is then the query
(the whole slab), its own patient's other slabs left out of the answer; the top 10 others vote (suggestion.py).

Three ways to answer, on the same searches:
* ``before``: what issue 29 found: every labelled neighbour votes, the raw vote share is the confidence, never
  abstains;
* ``abstaining``: neighbours that do not hold the query's anatomy (body_region.prior_group on the levels and
  regions of the catalog) do not vote; fewer than MIN_SIMILAR similar labelled neighbours, or a confidence under
  MIN_CONFIDENCE, abstain; confidence = the raw share (an index nobody calibrated);
* ``abstaining_calibrated``: the same with Platt scaling cross-fitted on the *other* patients' votes (what
  ``cbir evaluate`` pins into an index).

Out-of-distribution queries: the abdominal CT seen with a T1-like contrast (benchmarks/body_region.pseudo_mr), slabs
of it as MR queries: the index's only MR cases are brain slabs, and the issue's failure was an abdominal MR
suggested "head (conf 0.82)".

    python benchmarks/suggestions.py [--patients 30] [--work DIR] [--out docs/benchmarks/suggestions.json]
                                     [--figure docs/benchmarks/suggestions_reliability.png]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from body_axis_template import organ_levels_s
from body_region import pseudo_mr
from patient_split import part
from real_anatomy import slab_around
from real_data import prepare, shared_data_dir

HN_LEVELS = {"brainstem": "skull base", "mandible": "jaw", "larynx": "larynx"}
OTHER_SLABS = {"abdomen_ct": {0.85: "upper abdomen", 0.7: "upper abdomen", 0.3: "pelvis", 0.15: "pelvis"},
               "head_ct": {0.85: "brain", 0.6: "brain"}, "brain_mr": {0.85: "brain", 0.6: "brain"}}
SLAB_MM = 60.0
K = 10
BINS = 5


def at_s(volume, s: float, thickness: float = SLAB_MM):
    centre = volume.center_ras.copy()
    centre[2] = s
    return slab_around(volume, centre, thickness)


def write_cases(work: Path, patients: int) -> list[dict]:
    """The labelled slabs as NIfTI files: [{path, label, patient}]."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.imaging.synthetic import write_volume

    folder = shared_data_dir() / "real" / "head-neck-ct"
    with open(folder / "cases.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if part(r["case"]) == "reporting"]
    cases = []
    (work / "cases").mkdir(parents=True, exist_ok=True)
    for row in rows[:patients]:
        volume = read_volume(folder / f"{row['case']}_ct.nii.gz")
        organs = organ_levels_s(read_volume(folder / f"{row['case']}_labels.nii.gz"))
        for organ, label in HN_LEVELS.items():
            if organ in organs:
                path = work / "cases" / f"{row['case']}_{organ}.nii.gz"
                if not path.exists():
                    write_volume(at_s(volume, organs[organ][0]), str(path))
                cases.append({"path": str(path), "label": label, "patient": row["case"], "modality": "CT"})
    for name, item in prepare().items():
        volume = read_volume(item.image)
        s = volume.corners_ras()[:, 2]
        for fraction, label in OTHER_SLABS[name].items():
            path = work / "cases" / f"{name}_{int(fraction * 100)}.nii.gz"
            if not path.exists():
                write_volume(at_s(volume, s.min() + fraction * np.ptp(s)), str(path))
            cases.append({"path": str(path), "label": label, "patient": name, "modality": item.modality})
    return cases


def build_index(work: Path, cases: list[dict]):
    from CBIRSlicerLib.demo import demo_settings
    from CBIRSlicerLib.index.files import MANIFEST
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.models.registry import create_embedder

    embedder = create_embedder("handcrafted")
    folder = work / "index"
    index = Index.open(str(folder), writable=True) if (folder / MANIFEST).exists() else Index.create(str(folder), embedder,
                                                                                                      demo_settings())
    with index:
        index.add_sources([c["path"] for c in cases], embedder, labels={os.path.abspath(c["path"]): [c["label"]] for c in cases})
    return str(folder)


def searches(index_folder: str, queries: list[dict], patient_of: dict[str, str]) -> list[dict]:
    """Each query's top K results of other patients: their case ids, scores, labels and whether they hold its anatomy."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import volume_query
    from CBIRSlicerLib.retrieval.search import Searcher
    from CBIRSlicerLib.retrieval.suggestion import Suggester

    index = Index.open(index_folder)
    searcher = Searcher(index)
    suggester = Suggester(index, "label")
    out = []
    for q in queries:
        volume = q["volume"] if "volume" in q else read_volume(q["path"])
        answer = searcher.search(volume_query(volume, "axial", index), k=K + 12)
        keep = [r for r in answer.results if patient_of.get(os.path.abspath(r.source)) != q["patient"]][:K]
        similar = suggester.similar(answer)
        prior = answer.query.prior.to_json() if answer.query.prior else None
        out.append({"query": os.path.basename(q.get("path", q.get("name", ""))), "truth": q["label"], "patient": q["patient"],
                    "labels": [suggester.labels_of(r) for r in keep], "scores": [r.score for r in keep],
                    "similar": [bool(similar(r)) if similar else True for r in keep], "prior": prior})
    return out


def answer_of(search: dict, mode: str, calibration) -> dict:
    """One way's answer to one search: the label (None: abstained), its confidence, and why it abstained."""
    from CBIRSlicerLib.retrieval import suggestion

    class Result:
        def __init__(self, n):
            self.n, self.score, self.case_id = n, search["scores"][n], str(n)

    results = [Result(n) for n in range(len(search["scores"]))]
    labels = search["labels"]
    counts = {"any": 99, **{name: 99 for names in labels for name in names}}  # every label is well represented here
    if mode == "before":
        shares = suggestion.vote(labels, search["scores"])
        if not shares:
            return {"label": None, "confidence": None, "reason": "no labelled neighbour"}
        winner, share = next(iter(shares.items()))
        return {"label": winner, "confidence": share, "share": share}
    found = suggestion.decide(results, "label", lambda r: labels[r.n], calibration, counts, K,
                              lambda r: search["similar"][r.n])
    if isinstance(found, suggestion.Suggestion):
        return {"label": found.label, "confidence": found.confidence, "share": found.share}
    return {"label": None, "confidence": None, "reason": found}


def reliability(answers: list[dict], truths: list[str]) -> dict:
    """Accuracy, coverage, ECE and the reliability curve (confidence bins: mean confidence, accuracy, count)."""
    from CBIRSlicerLib.retrieval.suggestion import expected_calibration_error

    given = [(a, t) for a, t in zip(answers, truths) if a["label"] is not None]
    right = [a["label"] == t for a, t in given]
    conf = [a["confidence"] for a, _ in given]
    curve = []
    edges = np.linspace(0, 1, BINS + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [(c, r) for c, r in zip(conf, right) if lo <= c < hi or (hi == 1 and c == 1)]
        if inside:
            curve.append({"bin": [round(lo, 2), round(hi, 2)], "confidence": round(float(np.mean([c for c, _ in inside])), 3),
                          "accuracy": round(float(np.mean([r for _, r in inside])), 3), "count": len(inside)})
    return {"queries": len(answers), "answered": len(given), "coverage": round(len(given) / max(1, len(answers)), 3),
            "accuracy_answered": round(float(np.mean(right)), 3) if right else None,
            "wrong_answers": int(len(right) - sum(right)),
            "ece": round(float(expected_calibration_error(conf, right)), 3) if conf else None, "curve": curve}


def run(work: Path, patients: int) -> dict:
    from CBIRSlicerLib.retrieval.suggestion import Calibration, fit_calibration

    began = time.process_time()
    cases = write_cases(work, patients)
    index_folder = build_index(work, cases)
    built = time.process_time() - began
    patient_of = {os.path.abspath(c["path"]): c["patient"] for c in cases}
    found = searches(index_folder, cases, patient_of)
    truths = [s["truth"] for s in found]
    identity = Calibration(source="identity")
    modes = {"before": [answer_of(s, "before", identity) for s in found],
             "abstaining": [answer_of(s, "abstaining", identity) for s in found]}
    # cross-fitted: a Platt map fitted on the votes of the other patients' queries (their winner share, right or not)
    votes = [answer_of(s, "before", identity) for s in found]
    crossed = []
    for s in found:
        others = [(v["share"], v["label"] == o["truth"]) for v, o in zip(votes, found)
                  if o["patient"] != s["patient"] and v["label"] is not None]
        calibration = fit_calibration([x for x, _ in others], [y for _, y in others], "cross-fitted")
        crossed.append(answer_of(s, "abstaining", calibration))
    modes["abstaining_calibrated"] = crossed
    report = {"data": "60 mm slabs of real/head-neck-ct reporting patients (OpenKBP), the abdominal CT, the head CT and the "
                      "brain MR; labels = the level each shows", "cases": len(cases), "patients": patients,
              "classes": {label: truths.count(label) for label in sorted(set(truths))},
              "modes": {m: reliability(a, truths) for m, a in modes.items()}}
    # out of distribution: the abdominal CT as a pseudo-MR, sliced like the CT's cases
    from CBIRSlicerLib.imaging.readers import read_volume

    abdomen = read_volume(prepare(names=("abdomen_ct",))["abdomen_ct"].image)
    mr = pseudo_mr(abdomen)
    s = mr.corners_ras()[:, 2]
    ood = [{"volume": at_s(mr, s.min() + f * np.ptp(s)), "label": label, "patient": "abdomen_pseudo_mr",
            "name": f"abdomen_pseudo_mr_{int(f * 100)}"} for f, label in OTHER_SLABS["abdomen_ct"].items()]
    ood_found = searches(index_folder, ood, patient_of)
    report["pseudo_mr_abdomen_queries"] = [
        {"query": q["query"], "truth": q["truth"], "neighbour_labels": [n[0] if n else None for n in q["labels"]],
         "similar": q["similar"], **{m: answer_of(q, "before" if m == "before" else "abstaining", identity)
                                     for m in ("before", "abstaining")}} for q in ood_found]
    report["cpu_s"] = {"build": round(built, 1), "total": round(time.process_time() - began, 1)}
    report["searches"] = found
    return report


def figure(report: dict, path: str) -> None:
    """The reliability curves of the three ways (accuracy against mean confidence per bin, bubble size = count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="perfectly calibrated")
    for (mode, stats), colour in zip(report["modes"].items(), ("tab:red", "tab:blue", "tab:green")):
        curve = stats["curve"]
        ax.plot([c["confidence"] for c in curve], [c["accuracy"] for c in curve], "-o", color=colour,
                label=f"{mode}: acc {stats['accuracy_answered']}, coverage {stats['coverage']}, ECE {stats['ece']}")
        for c in curve:
            ax.annotate(str(c["count"]), (c["confidence"], c["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("confidence shown (mean per bin)")
    ax.set_ylabel("share right")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Suggested level, {report['cases']} real slabs (labels: {len(report['classes'])})", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=30, help="reporting head-and-neck patients (first N in cases.csv)")
    parser.add_argument("--work", default="", help="folder for the slabs and the index (default: a temporary one)")
    parser.add_argument("--out", default="")
    parser.add_argument("--figure", default="")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cbir_suggestions_"))
    report = run(work, args.patients)
    if args.figure:
        figure(report, args.figure)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    summary = {k: v for k, v in report.items() if k != "searches"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
