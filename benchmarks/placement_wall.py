"""Wall-clock seconds to place a query's 10 results through the product's own call (``Searcher.place``), one result at a
time against several at once (``workers``), on real head-and-neck CT of different patients.

The index: the first ``--patients`` tuning patients (``benchmarks/patient_split.py``; cost only, reporting patients stay
unseen) and the three real distractors, ``handcrafted`` with the default settings (``cross_patient.build``). The first
``--queries`` of them ask each of their organ boxes (``head_neck.organ_queries``), top 10, and the answer is placed with
each ``--workers`` setting by a fresh searcher: its first box is cold (every result volume read and gridded, the
whole-volume registrations made), the later boxes of the same volume warm (grids and whole-volume registrations kept).
Every setting's placed points are compared with the first setting's (the same answers, to ITK's threading noise).
Run on a quiet machine: wall time is the figure; the load average is recorded beside it::

    nice -n 10 python benchmarks/placement_wall.py [--workers 1,2] [--patients 12] [--queries 2] [--slabs] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cross_patient
import head_neck

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def measure(folder: str, queried: list, workers: int, slabs: bool = False) -> list[dict]:
    """Every organ box of the queried patients, searched and placed by one fresh searcher with ``workers``; with
    ``slabs``, each asked on a 40-60 mm slab of its patient's series around the organ (``cross_patient.py --slabs
    from``'s slabs: every query a new volume, its level searched in each result)."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.imaging.roi import RoiBox
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import roi_query
    from CBIRSlicerLib.retrieval.search import Searcher

    searcher = Searcher(Index.open(folder))
    rows = []
    for patient in queried:
        volume = read_volume(patient.image)
        for number, query in enumerate(q for q in head_neck.organ_queries(patient) if q.kind == "box"):
            asked_volume = volume
            if slabs:
                thickness, shift = head_neck.slab_draw(patient.number * 10 + query.label)
                asked_volume = head_neck.cut(volume, query.centre[2] + shift, thickness)
            asked = roi_query(asked_volume, RoiBox(query.centre, query.size), "axial", searcher.index)
            answer = searcher.search(asked, k=10)
            wall, cpu = time.monotonic(), _cpu()
            placed = searcher.place(asked, answer, workers=workers)
            rows.append({"patient": patient.name, "organ": query.organ, "cold": number == 0 or slabs, "results": len(answer.results),
                         "wall_s": round(time.monotonic() - wall, 2), "cpu_s": round(_cpu() - cpu, 2),
                         "load": round(os.getloadavg()[0], 2),
                         "spots": [[round(float(v), 2) for v in r.best_match.spot] for r in placed.results]})
            print(f"workers {workers} {patient.name} {query.organ}: {rows[-1]['wall_s']} s wall, {rows[-1]['cpu_s']} CPU s"
                  f" ({'cold' if number == 0 else 'warm'}, load {rows[-1]['load']})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="settings of Searcher.place's workers, compared in this order")
    parser.add_argument("--patients", type=int, default=12, help="tuning patients indexed")
    parser.add_argument("--queries", type=int, default=2, help="of them, patients whose organ boxes are asked")
    parser.add_argument("--slabs", action="store_true", help="ask each box on a 40-60 mm slab of its series (all cold)")
    parser.add_argument("--work", default=None, help="folder for the index (kept; reused when present)")
    parser.add_argument("--cache", default=None, help="folder of the Debian packages (real_data.py)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "placement_wall.json"))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="cbir-placement-wall-")
    config = {"index_patients": args.patients, "query_patients": args.queries, "k": 10}
    built = cross_patient.build(work, "tuning", config, "none", "handcrafted", args.cache)
    queried = [p for p in head_neck.patients("tuning") if p.name in built["patients"]][:args.queries]
    settings = [int(v) for v in args.workers.split(",")]
    runs = {workers: measure(built["folder"], queried, workers, args.slabs) for workers in settings}
    first = runs[settings[0]]
    summary = {}
    for workers, rows in runs.items():
        moved = [float(np.linalg.norm(np.subtract(a, b), axis=1).max()) for r0, r in zip(first, rows)
                 for a, b in [(r0["spots"], r["spots"])] if len(a) == len(b) and a]
        summary[workers] = {kind: {"median_wall_s": round(float(np.median([r["wall_s"] for r in rows if r["cold"] == cold])), 2),
                                   "max_wall_s": max(r["wall_s"] for r in rows if r["cold"] == cold),
                                   "median_cpu_s": round(float(np.median([r["cpu_s"] for r in rows if r["cold"] == cold])), 2)}
                            for kind, cold in (("cold", True), ("warm", False)) if any(r["cold"] == cold for r in rows)}
        summary[workers]["largest_move_from_first_setting_mm"] = round(max(moved), 4) if moved else None
        print(f"workers {workers}: {json.dumps(summary[workers])}", flush=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                                          f"{os.cpu_count()} cores", "index_patients": built["patients"],
                                          "queried": [p.name for p in queried], "summary": summary,
                                          "runs": {str(k): v for k, v in runs.items()}}, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
