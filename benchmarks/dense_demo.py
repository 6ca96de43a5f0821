"""The demo's ROI retrieval with crops against dense region vectors (mean and GeM pooling), per seed.

    python benchmarks/dense_demo.py [--model handcrafted] [--seeds 0,1] [--out docs/benchmarks/dense_demo.json]

Runs ``cbir demo``'s whole road (synthetic cohort, index, one ROI query per lesion, leave-one-case-out) with the
index's ``region_strategy`` and ``dense_pooling`` set each way. With ``--model biomedclip`` (or ``local-dir:...``)
the same comparison measures a foundation model, where its weights exist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from CBIRSlicerLib import demo
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.retrieval import queries

VARIANTS = {"crops": {"region_strategy": "crops"}, "dense mean": {"region_strategy": "dense", "dense_pooling": "mean"},
            "dense gem": {"region_strategy": "dense", "dense_pooling": "gem"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="handcrafted")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cell-mm", type=float, default=10.0)
    parser.add_argument("--query-images", default="16", help="comma-separated: most slices an ROI query embeds (default 16)")
    parser.add_argument("--out", default="docs/benchmarks/dense_demo.json")
    args = parser.parse_args()
    rows = []
    base = demo.demo_settings()
    runs = [(name, seed, int(q)) for name in args.variants.split(",") for q in args.query_images.split(",")
            for seed in (int(s) for s in args.seeds.split(","))]
    for name, seed, query_images in runs:
        settings = IndexSettings(**{**base.as_dict(), **VARIANTS[name], "dense_cell_mm": args.cell_mm})
        demo.demo_settings = lambda settings=settings: settings
        queries.MAX_QUERY_IMAGES = query_images
        summary = demo.run_demo(tempfile.mkdtemp(prefix="cbir-dense-demo-"), args.model, seed=seed, log=lambda *a: None)
        row = {"variant": name, "seed": seed, "query_images": query_images, "mP@1": round(summary["mP@1_micro"], 3),
               "mP@3": round(summary["mP@3_micro"], 3), "localised": summary["localised"],
               "localised_count": summary["localised_count"], "seconds": summary["seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"command": "python " + " ".join(sys.argv), "model": args.model, "cell_mm": args.cell_mm,
                   "note": "2 shared cores with other work running (seconds inflated)", "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
