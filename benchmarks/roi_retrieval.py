"""ROI retrieval on the synthetic cohort: which items to index, and which case ranking, by measurement.

For each indexing configuration (whole slices only; tiles of several sizes and overlaps; tiles plus
crops centred on blobs, the default) an index of a 16-case cohort (4 lesion kinds, one lesion per
case) is built with the ``handcrafted`` model, then every lesion is queried with an ROI of 2.5 radii
(or other sizes) and the answers scored: modified P@1 and P@3 (Denner et al.), mAP@3, and
localisation (the best match of a same-kind result lies inside its lesion; the match's focus is
used, and the best item's own centre is reported beside it), for
MaxSim, vote and pooled ranking. Storage per case and build time are recorded.

    python benchmarks/roi_retrieval.py [--cases 16] [--seed 0] [--configs 0,4] [--methods maxsim]
        [--roi-scales 2,2.5,3] [--out docs/benchmarks/roi_retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval.evaluation import evaluate_lesions
from CBIRSlicerLib.retrieval.search import Searcher

NO_BLOBS = {"blobs_per_slice": 0}
CONFIGS = {
    "slices only": {"tile_sizes_mm": [], **NO_BLOBS},
    "tiles 32 mm, 50 %": {"tile_sizes_mm": [32.0], **NO_BLOBS},
    "tiles 32 mm, 75 %": {"tile_sizes_mm": [32.0], "tile_overlap": 0.75, **NO_BLOBS},
    "tiles 24 mm, 75 %": {"tile_sizes_mm": [24.0], "tile_overlap": 0.75, **NO_BLOBS},
    "default: tiles 32 mm, 50 % + blob crops": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride-mm", type=float, default=4.0)
    parser.add_argument("--configs", default="", help="comma-separated indexes into the configurations (default all)")
    parser.add_argument("--methods", default="maxsim,votes,pooled", help="case rankings to score")
    parser.add_argument("--roi-scales", default="2.5", help="query box sides in lesion radii, comma-separated")
    parser.add_argument("--out", default="docs/benchmarks/roi_retrieval.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="cbir-roi-")
    cases = synthetic.make_cohort(args.cases, seed=args.seed)
    paths = dict(zip([c.name for c in cases], synthetic.write_cohort(cases, work)))
    truth = synthetic.read_cohort(os.path.join(work, synthetic.COHORT_CSV))
    embedder = create_embedder("handcrafted")
    rows = []
    chosen = [int(n) for n in args.configs.split(",") if n] or range(len(CONFIGS))
    for label, options in [list(CONFIGS.items())[n] for n in chosen]:
        folder = os.path.join(work, f"index-{len(rows)}")
        began = time.monotonic()
        with Index.create(folder, embedder, IndexSettings(stride_mm=args.stride_mm, **options)) as index:
            index.add_sources(list(paths.values()), embedder)
        build = time.monotonic() - began
        index = Index.open(folder)
        info = index.info()
        searcher = Searcher(index, embedder)
        for method in args.methods.split(","):
            for scale in [float(x) for x in args.roi_scales.split(",")]:
                summary = evaluate_lesions(searcher, truth, paths, method=method, roi_scale=scale).summary
                grid = evaluate_lesions(searcher, truth, paths, method=method, roi_scale=scale, use_focus=False).summary
                summary["localised_item_centre"] = grid["localised"]
                row = {"config": label, "method": method, "items_per_case": round(info["counts"]["items"] / args.cases),
                       "kib_per_case": round(info["bytes_per_case"] / 1024), "build_s": round(build, 1),
                       **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"cases": args.cases, "seed": args.seed, "stride_mm": args.stride_mm, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
