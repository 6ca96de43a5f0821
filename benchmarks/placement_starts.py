"""Both registration starts, for every (organ box, result patient) pair of tuning head-and-neck patients: which start
to register first, and when is it enough alone?

The product registers the whole-volume start first and keeps it alone when the query's box agrees with the result there
(``result_registration.KEEP_WHOLE_VOLUME_AGREEMENT``); otherwise the level start too, and the better of the two. The
level start first instead (kept alone when it agreed) was tried and not kept: it took the abdominal pseudo-patients of
``real_anatomy.py`` (the test's coarse index) from 81.8 % to 70.5 % inside at 0.7 (76.1 % at 0.9), where the
whole-volume start is the better one.

For each organ box of ``--queries`` tuning patients (from the 21st, so not the patients the starts were first tuned on)
into each of ``--results`` other tuning patients (from the 41st) that contour the organ, the asked point is registered
from the body coordinate's level start and from the whole-volume registration (``registration.place`` from each), and
each placed point is judged against the result's organ mask (inside: within 5 mm). The summary compares the
whole-volume start alone, the level start alone, the better agreeing of the two (``placement.better``), either start
kept alone when its agreement reaches a threshold (the rest: the better of two) with how many registrations that skips,
and the product's rule. Tuning patients only: reporting patients stay unseen::

    nice -n 10 python benchmarks/placement_starts.py [--queries 4] [--results 10] [--out docs/benchmarks/placement_starts_tuning.json]
    python benchmarks/placement_starts.py --summary docs/benchmarks/placement_starts_tuning.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import head_neck

from CBIRSlicerLib.retrieval.result_registration import KEEP_WHOLE_VOLUME_AGREEMENT, SAME_START_MM

REPO = Path(__file__).resolve().parents[1]


def measure(queries: int, results: int, out: str, query_from: int = 20) -> list[dict]:
    """One row per (organ box, result patient): both starts' placed points, agreements and distances to the organ."""
    from CBIRSlicerLib.imaging import body_axis, levels, registration
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.retrieval.result_registration import QueryGrid, ResultGrid

    tuning = head_neck.patients("tuning")
    targets: dict[str, tuple] = {}
    rows: list[dict] = []
    for query_patient in tuning[query_from:query_from + queries]:
        volume = read_volume(query_patient.image)
        grid = QueryGrid.of(volume, body_axis.body_axis(volume))
        for query in (q for q in head_neck.organ_queries(query_patient) if q.kind == "box"):
            box_mm = max(round(v, 3) for v in query.size)
            for patient in tuning[40:40 + results]:
                if patient.image not in targets:
                    other = read_volume(patient.image)
                    targets[patient.image] = (ResultGrid.of(other, body_axis.body_axis(other)),
                                              head_neck.Organs.read(patient.labels))
                target, organs = targets[patient.image]
                if not organs.has(query.label):
                    continue
                row: dict = {"q": query_patient.name, "r": patient.name, "organ": query.organ}
                in_view, window = levels.level_window(grid.axis, target.axis, query.centre, query.size[2] / 2)
                if in_view is False:
                    rows.append({**row, "out_of_view": True})
                    continue
                asked = window.asked_ras if window is not None else query.centre
                level = window if window is not None else levels.start_window(grid.axis, target.axis, asked)
                if patient.image not in grid.global_transforms:
                    grid.global_transforms[patient.image] = registration.global_transform(grid.image, target.image)
                starts = {"level": levels.level_transform(grid.planes, target.planes, level) if level is not None else None,
                          "global": grid.global_transforms[patient.image]}
                row["window"] = window is not None
                for name, start in starts.items():
                    if start is None:
                        continue
                    row[name + "_start_ras"] = registration.carry(start, asked).round(2).tolist()
                    placed = registration.place(grid.volume, asked, None, start, grid.image, target.image, box_mm)
                    row[name] = {"ras": [round(v, 2) for v in placed.ras], "agreement": placed.agreement,
                                 "context": placed.context_agreement,
                                 "in_window": None if window is None else bool(window.holds(placed.ras)),
                                 "distance_mm": round(organs.distance_mm(query.label, placed.ras), 1)}
                rows.append(row)
            print(query_patient.name, query.organ, len(rows), flush=True)
            Path(out).write_text(json.dumps(rows) + "\n")  # after each box: a run stopped by its bound keeps its rows
    return rows


def summary(rows: list[dict]) -> dict:
    """Inside rates of each policy over the pairs where the level is in view."""
    pairs = [r for r in rows if not r.get("out_of_view") and "global" in r]

    def inside(candidate: dict) -> bool:
        return candidate["distance_mm"] <= head_neck.INSIDE_MM

    def better(row: dict) -> dict:  # placement.better on the recorded candidates
        def score(c: dict) -> tuple[bool, float]:
            agreement = c["agreement"] if np.isfinite(c["agreement"]) else c["context"]
            return c["in_window"] is not False, agreement if np.isfinite(agreement) else -np.inf
        return max((row[k] for k in ("level", "global") if k in row), key=score)

    def lazy(row: dict, threshold: float, first_start: str = "level") -> tuple[dict, bool]:
        first = row.get(first_start)
        if first is not None and first["in_window"] is not False and first["agreement"] >= threshold:
            return first, True
        return better(row), False

    out = {"pairs": len(pairs), "out_of_view": sum(bool(r.get("out_of_view")) for r in rows),
           "whole_volume_start_alone": round(float(np.mean([inside(r["global"]) for r in pairs])), 3),
           "level_start_alone": round(float(np.mean([inside(r["level"]) for r in pairs if "level" in r])), 3),
           "better_of_two": round(float(np.mean([inside(better(r)) for r in pairs])), 3), "level_start_kept_when_agreeing": {}}
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.9):
        kept = [lazy(r, threshold) for r in pairs]
        out["level_start_kept_when_agreeing"][str(threshold)] = {
            "inside": round(float(np.mean([inside(c) for c, _ in kept])), 3),
            "whole_volume_registrations_skipped": f"{sum(s for _, s in kept)}/{len(kept)}"}
    for threshold in (0.8, 0.85, 0.9, 0.95):
        kept = [lazy(r, threshold, "global") for r in pairs]
        out.setdefault("whole_volume_start_kept_when_agreeing", {})[str(threshold)] = {
            "inside": round(float(np.mean([inside(c) for c, _ in kept])), 3),
            "level_starts_skipped": f"{sum(s for _, s in kept)}/{len(kept)}"}
    def same_start(row: dict) -> bool:
        return "level" in row and float(np.linalg.norm(np.subtract(row["level_start_ras"], row["global_start_ras"]))) < SAME_START_MM

    product = [(row["global"], True) if same_start(row) else lazy(row, KEEP_WHOLE_VOLUME_AGREEMENT, "global") for row in pairs]
    out["product"] = {"rule": f"whole-volume start kept alone at agreement >= {KEEP_WHOLE_VOLUME_AGREEMENT} or where the "
                              f"level start lies within {SAME_START_MM} mm of it",
                      "inside": round(float(np.mean([inside(c) for c, _ in product])), 3),
                      "level_starts_skipped": f"{sum(s for _, s in product)}/{len(product)}"}
    out["per_organ_better_of_two"] = {organ: round(float(np.mean([inside(better(r)) for r in pairs if r["organ"] == organ])), 3)
                                      for organ in sorted({r["organ"] for r in pairs})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--results", type=int, default=10)
    parser.add_argument("--query-from", type=int, default=20, help="the first query patient (tuning patients in number order)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "placement_starts_tuning.json"))
    parser.add_argument("--summary", nargs="+", help="summarise finished runs' JSONs (as one) instead of running")
    args = parser.parse_args()
    if args.summary:
        rows = [row for path in args.summary for row in json.loads(Path(path).read_text())]
    else:
        rows = measure(args.queries, args.results, args.out, args.query_from)
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
