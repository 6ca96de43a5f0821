"""Both registration starts, for every (organ box, result patient) pair of tuning head-and-neck patients: does the level
start alone do as well as the better of two when its box already agrees with the query?

Measured, and not kept in the product: the same rule took the abdominal pseudo-patients of ``real_anatomy.py`` (the
test's coarse index) from 81.8 % to 70.5 % inside at 0.7 (76.1 % at 0.9), where the whole-volume start is the better
one; both starts run again (``result_registration.register_point``).

For each organ box of ``--queries`` tuning patients (from the 21st, so not the patients the starts were first tuned on)
into each of ``--results`` other tuning patients (from the 41st) that contour the organ, the asked point is registered
from the body coordinate's level start and from the whole-volume registration (``registration.place`` from each, as
``result_registration.register_point`` does), and each placed point is judged against the result's organ mask (inside:
within 5 mm). The summary compares the whole-volume start alone, the level start alone, the better agreeing of the two
(``placement.better``), and the level start kept alone when its agreement reaches a threshold (the rest: the better of
two), with how many whole-volume registrations that skips. Tuning patients only: reporting patients stay unseen::

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

REPO = Path(__file__).resolve().parents[1]


def measure(queries: int, results: int, out: str) -> list[dict]:
    """One row per (organ box, result patient): both starts' placed points, agreements and distances to the organ."""
    from CBIRSlicerLib.imaging import body_axis, registration
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.retrieval.result_registration import QueryGrid, ResultGrid

    tuning = head_neck.patients("tuning")
    targets: dict[str, tuple] = {}
    rows: list[dict] = []
    for query_patient in tuning[20:20 + queries]:
        volume = read_volume(query_patient.image)
        grid = QueryGrid(volume, registration.coarse_image(volume), body_axis.body_axis(volume))
        for query in (q for q in head_neck.organ_queries(query_patient) if q.kind == "box"):
            box_mm = max(round(v, 3) for v in query.size)
            for patient in tuning[40:40 + results]:
                if patient.image not in targets:
                    other = read_volume(patient.image)
                    targets[patient.image] = (ResultGrid(registration.coarse_image(other), other.ijk_to_ras, other.shape_ijk,
                                                         body_axis.body_axis(other)), head_neck.Organs.read(patient.labels))
                target, organs = targets[patient.image]
                if not organs.has(query.label):
                    continue
                row: dict = {"q": query_patient.name, "r": patient.name, "organ": query.organ}
                in_view, window = registration.level_window(grid.axis, target.axis, query.centre, query.size[2] / 2)
                if in_view is False:
                    rows.append({**row, "out_of_view": True})
                    continue
                asked = window.asked_ras if window is not None else query.centre
                level = window if window is not None else registration.start_window(grid.axis, target.axis, asked)
                if patient.image not in grid.global_transforms:
                    grid.global_transforms[patient.image] = registration.global_transform(grid.image, target.image)
                starts = {"level": registration.level_transform(grid.image, target.image, level) if level is not None else None,
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

    def lazy(row: dict, threshold: float) -> tuple[dict, bool]:
        first = row.get("level")
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
    out["per_organ_better_of_two"] = {organ: round(float(np.mean([inside(better(r)) for r in pairs if r["organ"] == organ])), 3)
                                      for organ in sorted({r["organ"] for r in pairs})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--results", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "placement_starts_tuning.json"))
    parser.add_argument("--summary", help="summarise a finished run's JSON instead of running")
    args = parser.parse_args()
    rows = json.loads(Path(args.summary).read_text()) if args.summary else measure(args.queries, args.results, args.out)
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
