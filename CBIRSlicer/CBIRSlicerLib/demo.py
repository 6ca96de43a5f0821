"""``cbir demo``: the whole road on any machine, in about a minute, ending in an HTML report.

A synthetic CT-like cohort with lesions of a few kinds at known places is written to disk, an
index is built from the files (as a user would build one), one ROI query is made per lesion,
leave-one-case-out, and the answers are scored (``evaluation.json``) and drawn
(``report.html``): each query slice beside its top neighbours at their best-matching slices.
The default model is ``handcrafted`` (nothing to download); ``--model biomedclip`` runs the
same road with the foundation model.
"""

from __future__ import annotations

import html
import json
import os
import time

from .imaging import synthetic
from .imaging.intensity import choose_window
from .imaging.readers import read_volume
from .index.files import MANIFEST
from .index.folder import Index
from .index.items import IndexSettings
from .models.registry import create_embedder
from .plots import precision_curve_png
from .report import match_panel, query_panel, save_panel, write_report
from .retrieval.evaluation import evaluate_lesions
from .retrieval.search import Searcher

DEMO_CASES = 12  # 3 of each of the 4 default kinds: chance mP@1 = 2/11
DEMO_KS = (1, 3, 5)
DEMO_RESULTS_SHOWN = 3
ROI_SCALE = 2.5  # the query ROI is a cube of 2.5 lesion radii, as a user would draw it around a lesion


def demo_settings() -> IndexSettings:
    """The demo's slicing: every 4 mm axially, with the tiles region queries need."""
    return IndexSettings(axes=["axial"], stride_mm=4.0)


def run_demo(out: str, model: str = "handcrafted", cases: int = DEMO_CASES, seed: int = 0, device: str | None = None,
             progress=None, log=print) -> dict:
    """Generate, index, query, score and report; returns the evaluation summary (with the report's path)."""
    began = time.monotonic()
    out = os.path.abspath(out)
    cohort_dir, index_dir = os.path.join(out, "cohort"), os.path.join(out, "index")
    log(f"writing a synthetic cohort of {cases} cases (seed {seed}) to {cohort_dir}")
    cohort = synthetic.make_cohort(cases, seed=seed)
    paths = dict(zip([c.name for c in cohort], synthetic.write_cohort(cohort, cohort_dir)))
    truth = synthetic.read_cohort(os.path.join(cohort_dir, synthetic.COHORT_CSV))
    embedder = create_embedder(model, device=device)
    if os.path.exists(os.path.join(index_dir, MANIFEST)):
        index = Index.open(index_dir, writable=True)  # a rerun: same files, same checksums, nothing to embed again
        index.check_model(embedder)
    else:
        index = Index.create(index_dir, embedder, demo_settings())
    log(f"indexing with model {embedder.name} into {index_dir}")
    with index:
        report = index.add_sources(list(paths.values()), embedder, progress=progress)
    log(report.summary())
    searcher = Searcher(Index.open(index_dir), embedder)
    log(f"querying: one ROI per lesion ({sum(len(v) for v in truth.values())} queries), leave-one-case-out")
    evaluation = evaluate_lesions(searcher, truth, paths, ks=DEMO_KS, roi_scale=ROI_SCALE)
    summary = evaluation.summary
    summary.update(model=embedder.name, cases=cases, seed=seed)
    curve = {**evaluation.curve, "chance": summary["chance_mP@1"]}
    figure = precision_curve_png({embedder.name: curve}, os.path.join(out, "precision_at_k.png"),
                                 f"ROI queries on {cases} synthetic cases: {embedder.name}")
    queries = _draw_queries(out, evaluation.records, truth, paths, searcher.index)
    summary["seconds"] = round(time.monotonic() - began, 1)
    intro = _intro(embedder.name, cases, seed, report, summary)
    with open(os.path.join(out, "evaluation.json"), "w", encoding="utf-8") as handle:
        json.dump(evaluation.as_dict(), handle, indent=1)
    summary["report"] = write_report(os.path.join(out, "report.html"), "CBIRSlicer demo: similar-case search by ROI", intro,
                                     summary, DEMO_KS, os.path.basename(figure), queries)
    return summary


def _draw_queries(out: str, records: list[dict], truth: dict, paths: dict, index: Index) -> list[dict]:
    """Panels for each query and its top results."""
    volumes, windows = {}, {}

    def volume_of(name):
        if name not in volumes:
            volumes[name] = read_volume(paths[name])
            windows[name] = choose_window(volumes[name], index.settings.window)
        return volumes[name], windows[name]

    drawn = []
    lesion_counter: dict[str, int] = {}
    for record in records:
        name = record["query"]
        number = lesion_counter.get(name, 0)
        lesion_counter[name] = number + 1
        lesion = truth[name][number]
        side = ROI_SCALE * lesion.radius_mm
        volume, window = volume_of(name)
        stem = f"{name}_{number}"
        query_image = save_panel(query_panel(volume, window, "axial", lesion.center, (side, side, side)), out, f"{stem}_query.png")
        results = []
        for rank, (other, best, score, relevant) in enumerate(zip(record["ranked"], record["best_matches"], record["scores"],
                                                                  record["relevant"]), start=1):
            if rank > DEMO_RESULTS_SHOWN:
                break
            other_volume, other_window = volume_of(other)
            image = save_panel(match_panel(other_volume, other_window, best), out, f"{stem}_result{rank}.png")
            kinds = "/".join(lesion.kind for lesion in truth[other])
            results.append({"image": image, "relevant": relevant,
                            "caption": f"#{rank} {other} ({kinds}) score {score:.3f}, slice {best['slice_index']}"})
        drawn.append({"title": f"{name}: {lesion.kind} lesion, r {lesion.radius_mm:.0f} mm", "image": query_image,
                      "results": results})
    return drawn


def _intro(model: str, cases: int, seed: int, report, summary: dict) -> str:
    kinds = ", ".join(f"<b>{k}</b> ({html.escape(synthetic.LESION_SPECS[k].description)})" for k in synthetic.LESION_KINDS)
    model_note = ("the <code>handcrafted</code> descriptor (intensity, gradient and texture histograms; no weights, nothing to "
                  "download): a baseline, not a foundation model" if model == "handcrafted" else f"<code>{html.escape(model)}</code>")
    return (f"<p>Model: {model_note}. To run the same demo with BiomedCLIP (weights from the Hugging Face hub, or a local "
            "copy): <code>pip install -e \".[models]\" &amp;&amp; cbir demo --model biomedclip</code> "
            "(or <code>--model local-dir:/path/to/BiomedCLIP</code>).</p>"
            f"<p>Cohort: {cases} synthetic CT-like volumes (seed {seed}), one lesion each, kinds balanced: {kinds}. "
            f"Index: {html.escape(report.summary())}. One ROI query per lesion (a cube of {ROI_SCALE} lesion radii around "
            "it), leave-one-case-out; a result is relevant when it holds a lesion of the same kind. "
            f"The whole run took {summary['seconds']} s.</p>")
