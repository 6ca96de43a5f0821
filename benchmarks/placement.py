"""Placing the shown results anatomically: seconds to place 10 results of an ROI query, cold and warm.

Cold: every result's volume read from its file and brought to the 4 mm registration grid (as the first search of a
session does); warm: those grids kept by the searcher (later searches that show the same cases). Uses the quick build
of ``benchmarks/real_anatomy.py`` (pseudo-patients of the real abdominal CT, head CT and brain MR, and phantoms):

    python benchmarks/placement.py --work /tmp/rq_main [--queries 6] [--out docs/benchmarks/placement.json]

``--slab-mm 60``: each query asked on a 60 mm slab of the copy around it (a thin series), whose level in every result is
searched before it is registered (three starts of the whole-volume registration instead of one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_anatomy

from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.retrieval.queries import roi_query
from CBIRSlicerLib.retrieval.search import Searcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="the real_anatomy.py --quick work folder (built if absent)")
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--slab-mm", type=float, default=None, help="ask each query on a slab this thick around it")
    args = parser.parse_args()
    bench = real_anatomy.build(args.work, real_anatomy.CONFIGS["quick"])
    copy = next(c for c in bench.copies if c.volume == "abdomen_ct")
    volume = read_volume(copy.image)
    patient = real_anatomy.pseudo_patients.PseudoPatient.load(copy.transform)
    labels = real_anatomy._LabelMap(copy.labels)
    queries = [q for q in real_anatomy.queries_of(bench, copy, labels, patient, volume) if q["large"]][:args.queries]
    rows = []

    def volume_of(query):
        return volume if not args.slab_mm else real_anatomy.slab_around(volume, query["centre"], args.slab_mm)

    for warm in (False, True):
        searcher = Searcher(Index.open(bench.index_folder))
        if warm:  # the same searcher has seen these cases: their registration grids are kept
            for query in queries[:1]:
                asked = roi_query(volume_of(query), query["roi"], "axial", searcher.index)
                searcher.place(asked, searcher.search(asked, k=args.k))
        for query in queries:
            asked = roi_query(volume_of(query), query["roi"], "axial", searcher.index)
            began = time.perf_counter()
            answer = searcher.search(asked, k=args.k)
            searched, cpu = time.perf_counter(), time.process_time()
            placed = searcher.place(asked, answer)
            done, cpu = time.perf_counter(), time.process_time() - cpu
            rows.append({"warm": warm, "structure": query["structure"], "results": len(placed.results),
                         "search_s": round(searched - began, 3), "place_s": round(done - searched, 3),
                         "place_cpu_s": round(cpu, 3),
                         "placed": sum(r.best_match.placed_ras is not None for r in placed.results)})
            print(rows[-1], flush=True)
    summary = {("warm" if warm else "cold"): {
        "place_s_median": round(float(np.median([r["place_s"] for r in rows if r["warm"] == warm])), 2),
        "place_s_max": round(float(np.max([r["place_s"] for r in rows if r["warm"] == warm])), 2),
        # CPU seconds of all the process's threads: what placing costs whatever else runs (wall on 2 free cores <= this)
        "place_cpu_s_median": round(float(np.median([r["place_cpu_s"] for r in rows if r["warm"] == warm])), 2),
        "place_cpu_s_max": round(float(np.max([r["place_cpu_s"] for r in rows if r["warm"] == warm])), 2),
        "search_s_median": round(float(np.median([r["search_s"] for r in rows if r["warm"] == warm])), 3)} for warm in (False, True)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average_1min_at_end": load, "k": args.k,
              "slab_mm": args.slab_mm,
              "summary": summary, "rows": rows}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
