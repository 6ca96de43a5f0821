"""The demo's phantom cohorts for several models side by side, placement off and on.

``cbir demo``'s protocol (``retrieval.evaluation.evaluate_lesions``: the synthetic cohort ``make_cohort(12, seed)``,
one ROI query per lesion, a cube of 2.5 lesion radii, leave-one-case-out; relevant cases hold a lesion of the same
kind; chance mP@1 = 2/11), each model with its own default index (the demo's slicing; region strategy ``auto``:
crops for ``handcrafted``, dense for ``litemedsam``, feature-map cells for ``astra-ct``). Placement off is the
embedding's own answer (what ``cbir demo`` scores); placement on places each shown match as ``cbir search`` does by
default (``Searcher.place``), which registers the query's neighbourhood into the result instead of taking the
best-matching item. Localised: the match lies inside a lesion of the query's kind in a relevant result.

    python benchmarks/phantom_models.py --models litemedsam,handcrafted,astra-ct --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def run(model: str, seed: int, work: str) -> list[dict]:
    """One model on one cohort: the index built once, queried with placement off and on."""
    from CBIRSlicerLib import demo
    from CBIRSlicerLib.imaging import synthetic
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.models.registry import create_embedder
    from CBIRSlicerLib.retrieval.evaluation import evaluate_lesions
    from CBIRSlicerLib.retrieval.search import Searcher

    cohort_dir, index_dir = os.path.join(work, "cohort"), os.path.join(work, f"index-{model}")
    cohort = synthetic.make_cohort(demo.DEMO_CASES, seed=seed)
    paths = dict(zip([c.name for c in cohort], synthetic.write_cohort(cohort, cohort_dir)))
    truth = synthetic.read_cohort(os.path.join(cohort_dir, synthetic.COHORT_CSV))
    embedder = create_embedder(model, device="cpu")
    began, cpu = time.monotonic(), _cpu()
    with Index.create(index_dir, embedder, demo.demo_settings()) as index:
        report = index.add_sources(list(paths.values()), embedder)
        strategy = index.settings.region_strategy
    build = {"build_wall_s": round(time.monotonic() - began, 1), "build_cpu_s": round(_cpu() - cpu, 1), "vectors": report.vectors}
    searcher = Searcher(Index.open(index_dir), embedder)
    rows = []
    for place in (False, True):
        began, cpu, load = time.monotonic(), _cpu(), os.getloadavg()[0]
        evaluation = evaluate_lesions(searcher, truth, paths, ks=demo.DEMO_KS, roi_scale=demo.ROI_SCALE, place=place)
        summary = evaluation.summary
        rows.append({"model": model, "seed": seed, "placement": "on" if place else "off", "region_strategy": strategy,
                     "queries": len(evaluation.records), "mP@1": round(summary["mP@1_micro"], 3),
                     "mP@3": round(summary["mP@3_micro"], 3), "mAP@3": round(summary["mAP@3"], 3),
                     "localised": summary["localised"], "localised_count": summary["localised_count"],
                     "chance_mP@1": round(summary["chance_mP@1"], 3), "query_wall_s": round(time.monotonic() - began, 1),
                     "query_cpu_s": round(_cpu() - cpu, 1), "load": round(load, 2), **build})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="litemedsam,handcrafted,astra-ct")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "phantom_models.json"))
    args = parser.parse_args()
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="cbir-phantom-models-") as work:
            for model in args.models.split(","):
                rows += run(model, seed, work)
                # written after each model, so a run stopped by its time bound keeps what it measured
                Path(args.out).write_text(json.dumps({"protocol": "cbir demo (evaluate_lesions), 12 cases, leave-one-case-out",
                                                      "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")
                print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
