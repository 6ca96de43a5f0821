"""Whole-volume ranking by modality and body region on the mixed real index, for several models side by side.

The index is ``real_anatomy.py``'s (:func:`real_anatomy.build`, ``--quick`` by default): pseudo-patients of the shared
abdominal CT, the Debian head CT and brain MR, with synthetic phantoms as distractors, built with each model's default
settings. Each copy is asked as a whole volume (``volume_query``, axial, the product's search with its own case left
out); the top case should be of the same modality and body region ("CT abdomen", "CT head", "MR head"; a phantom is
its own kind), and is it another copy of the same real volume. Placement moves a result's match point, not the order of
the cases, so this table is the same with it on or off. Copies of one real patient are easier than other patients.

    python benchmarks/case_ranking.py --models litemedsam,handcrafted,astra-ct [--full] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_anatomy

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def rank_cases(model: str, work: str, quick: bool, cache: str | None = None) -> dict:
    """Build (or reuse) one model's mixed index and ask every copy as a whole volume."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import volume_query
    from CBIRSlicerLib.retrieval.search import Searcher

    config = {**real_anatomy.CONFIGS["quick" if quick else "full"], "model": model}
    began, cpu = time.monotonic(), _cpu()
    bench = real_anatomy.build(os.path.join(work, model), config, cache=cache)
    build = {"build_wall_s": round(time.monotonic() - began, 1), "build_cpu_s": round(_cpu() - cpu, 1)}
    searcher = Searcher(Index.open(bench.index_folder))
    by_source = {os.path.abspath(c.image): c for c in bench.copies}
    rows = []
    began, cpu = time.monotonic(), _cpu()
    for copy in bench.copies:
        kind = real_anatomy.kind_of(bench.volumes[copy.volume])
        answer = searcher.search(volume_query(read_volume(copy.image), "axial", searcher.index), k=10)
        kinds = []
        for result in answer.results:
            other = by_source.get(os.path.abspath(result.source))
            kinds.append(("phantom", None) if other is None else (real_anatomy.kind_of(bench.volumes[other.volume]), other.volume))
        same = [k == kind for k, _ in kinds]
        rows.append({"volume": copy.volume, "copy": copy.number, "kind": kind, "top_kind": kinds[0][0] if kinds else None,
                     "same_kind_at_1": bool(same and same[0]), "same_volume_at_1": bool(kinds and kinds[0][1] == copy.volume),
                     "first_same_kind_rank": same.index(True) + 1 if any(same) else None,
                     "kinds_ranked": [k for k, _ in kinds]})
    return {"model": model, "copies": len(rows), "same_kind_at_1": sum(r["same_kind_at_1"] for r in rows),
            "same_volume_at_1": sum(r["same_volume_at_1"] for r in rows), **build,
            "query_wall_s": round(time.monotonic() - began, 1), "query_cpu_s": round(_cpu() - cpu, 1),
            "load": round(os.getloadavg()[0], 2), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="litemedsam,handcrafted,astra-ct")
    parser.add_argument("--full", action="store_true", help="real_anatomy.py's full build (4 copies, native spacing)")
    parser.add_argument("--work", default=None, help="folder for the copies and indexes (kept; reused when present)")
    parser.add_argument("--cache", default=None, help="folder of the Debian packages (real_data.py)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "case_ranking.json"))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="cbir-case-ranking-")
    results = []
    for model in args.models.split(","):
        result = rank_cases(model, work, not args.full, args.cache)
        results.append(result)
        print(f"{model}: same kind at 1 {result['same_kind_at_1']}/{result['copies']}, same real volume at 1 "
              f"{result['same_volume_at_1']}/{result['copies']}; build {result['build_cpu_s']} CPU s, queries "
              f"{result['query_cpu_s']} CPU s", flush=True)
        # written after each model, so a run stopped by its time bound keeps what it measured
        Path(args.out).write_text(json.dumps({"protocol": "whole-volume queries on real_anatomy.py's mixed index",
                                              "build": "full" if args.full else "quick", "date": time.strftime("%Y-%m-%d %H:%M"),
                                              "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
