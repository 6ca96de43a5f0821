"""Where the CPU time of placing 10 results goes: CPU seconds per stage, for organ queries of real head-and-neck patients.

Placing one result (``Searcher.place``, ``imaging/registration.py``) reads the result's volume, brings it to the 4 mm
registration grid, reads its body axis (stored in the index at build time; timed here apart, not paid at search), then
registers the query's point from two starts (``result_registration.register_point``): the body coordinate's level
(``levels.level_transform``) and the whole-volume registration (``registration.global_transform``, similarity then
affine at 8 mm; kept per query volume and result). From each start ``registration.place`` runs the local affine stage
(128 mm, 4 mm), the demons stage (64 mm) and two agreements (the box; the 64 mm neighbourhood). This script runs that
very code (``result_registration.result_grid``'s steps and ``register_point``) for one query patient's organ boxes into the next
``--results`` tuning patients, with every stage's function wrapped to sum its CPU seconds (``time.process_time``: all
the process's threads, so ITK's threads count), plus a cProfile of the same run::

    nice -n 10 python benchmarks/placement_cost.py [--organs 2] [--results 10] [--out docs/benchmarks/placement_cost.json]

Tuning patients only (``benchmarks/patient_split.py``): this measures cost, not quality, and reporting patients stay
unseen. Cold: every result volume read and resampled, as the first search of a session does; the first organ box of a
query volume pays the whole-volume registrations, later boxes on the same volume reuse them (``QueryGrid``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import head_neck

from CBIRSlicerLib.imaging import body_axis, levels, registration
from CBIRSlicerLib.imaging.focal import focality
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.retrieval.result_registration import QueryGrid, ResultGrid, register_point

# The registration module's stages, each timed inclusively (a stage inside another is also counted in the outer one:
# global_transform holds level_starts for slab queries; place holds local_affine .. agreement).
STAGES = ("coarse_image", "body_planes", "level_window", "start_window", "level_transform", "global_transform", "level_starts",
          "local_affine", "deformation", "agreement", "place")
LEVEL_STAGES = ("body_planes", "level_window", "start_window", "level_transform")  # imaging/levels.py; the rest registration.py


def _module(name: str):
    return levels if name in LEVEL_STAGES else registration


def _cpu() -> float:
    return time.process_time()


def _timed(totals: dict, calls: dict, name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        began = _cpu()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += _cpu() - began
            calls[name] += 1
    return wrapper


def measure(organs_asked: int, results: int, query_index: int = 0) -> dict:
    """CPU seconds per stage of placing ``results`` results for each of ``organs_asked`` organ boxes of one patient."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    originals = {name: getattr(_module(name), name) for name in STAGES}
    for name, function in originals.items():
        setattr(_module(name), name, _timed(totals, calls, name, function))
    tuning = head_neck.patients("tuning")
    query_patient, result_patients = tuning[query_index], [p for i, p in enumerate(tuning) if i != query_index][:results]
    rows = []
    try:
        began = _cpu()
        query_volume = read_volume(query_patient.image)
        placing = QueryGrid.of(query_volume, body_axis.body_axis(query_volume))
        query_cpu = _cpu() - began
        boxes = [q for q in head_neck.organ_queries(query_patient) if q.kind == "box"][:organs_asked]
        targets: dict[str, ResultGrid] = {}
        for query in boxes:
            roi = RoiBox(query.centre, query.size)
            row: dict = {"organ": query.organ, "stages": defaultdict(float), "placed_ras": []}
            before = dict(totals)
            began = _cpu()
            cpu = _cpu()
            placing.focal = bool((found := focality(query_volume, roi)) is not None and found.focal)
            row["stages"]["focality"] += _cpu() - cpu
            box_mm = max(round(v, 3) for v in roi.size)
            for patient in result_patients:
                if patient.image not in targets:
                    cpu = _cpu()
                    volume = read_volume(patient.image)
                    row["stages"]["read_volume"] += _cpu() - cpu
                    cpu = _cpu()
                    axis = body_axis.body_axis(volume)  # in the product: read from the index (case metadata), not computed
                    row["stages"]["body_axis (index-time)"] += _cpu() - cpu
                    targets[patient.image] = ResultGrid.of(volume, axis)
                target = targets[patient.image]
                in_view, window = levels.level_window(placing.axis, target.axis, query.centre, query.size[2] / 2)
                if in_view is False:
                    continue
                asked = window.asked_ras if window is not None else query.centre
                where = register_point(placing, target, patient.image, asked, box_mm, window)
                row["placed_ras"].append([round(v, 4) for v in where.ras])
            row["cpu_s"] = round(_cpu() - began, 2)
            row["stages"] = {**{k: round(v, 2) for k, v in row["stages"].items()},
                             **{name: round(totals[name] - before.get(name, 0.0), 2) for name in STAGES
                                if totals[name] - before.get(name, 0.0) > 0}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for name, function in originals.items():
            setattr(_module(name), name, function)
    return {"query_patient": query_patient.name, "result_patients": [p.name for p in result_patients],
            "query_volume_cpu_s": round(query_cpu, 2), "rows": rows, "calls": dict(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organs", type=int, default=2, help="organ boxes of the query patient asked, one after another")
    parser.add_argument("--results", type=int, default=10)
    parser.add_argument("--query", type=int, default=0, help="which tuning patient asks (index in number order)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the run (slower)")
    parser.add_argument("--itk-threads", type=int, default=None, help="ITK's threads (default: ITK's, the cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import SimpleITK as sitk

    if args.itk_threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.itk_threads)

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    outcome = measure(args.organs, args.results, args.query)
    top = None
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        top = text.getvalue()
        print(top)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "itk_threads":
              sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), "load_average_1min_at_end": os.getloadavg()[0],
              **outcome, "cpu_s_median_per_query": round(float(np.median([r["cpu_s"] for r in outcome["rows"]])), 2)}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({**result, "profile_top": top}, handle, indent=1)


if __name__ == "__main__":
    main()
