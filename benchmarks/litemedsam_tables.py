"""Issue 26's side-by-side tables (handcrafted, litemedsam, astra-ct) from the raw JSON of the runs, as Markdown.

* Cross-patient organ retrieval (``cross_patient.py`` JSON, one a model): for every (query, result) pair where the result
  is another head-and-neck patient contouring the organ, inside (within 5 mm of the organ's mask) and the median
  distance, placement off ("unplaced": the embedding's own best-matching region) and on; and the organ P@k of the
  region queries (Khun Jush et al.'s region-retrieval protocol): of a query's first k results, the share whose
  best-matching region lies inside the same organ, a distractor or a patient without that organ's contour counting
  as a miss, averaged over the queries.
* Whole-volume ranking by modality and body region (``case_ranking.py`` JSON).
* The phantom demo cohorts (``phantom_models.py`` JSON).

    python benchmarks/litemedsam_tables.py --cross docs/benchmarks/cross_patient_reporting_quick9_*.json \
        [--cases docs/benchmarks/case_ranking.json] [--phantoms docs/benchmarks/phantom_models.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

KS = (1, 3, 5, 10)


def organ_precision(result: dict, way: str, ks=KS) -> dict[int, float]:
    """Organ P@k of a cross-patient run's queries, placement ``way`` ('unplaced' or 'placed')."""
    ranked: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for record in result["records"]:
        hit = bool(record["head_neck"] and record["organ_present"] and record["result"] != record["patient"]
                   and record[way].get("inside"))
        ranked[record["query"]].append((record["rank"], hit))
    out = {}
    for k in ks:
        per_query = [sum(hit for rank, hit in pairs if rank <= k) / k for pairs in ranked.values()]
        out[k] = round(sum(per_query) / len(per_query), 3) if per_query else float("nan")
    return out


def _cell(figure: dict | None) -> str:
    if not figure or figure.get("inside") is None:
        return "-"
    return f"{100 * figure['inside']:.1f} % / {figure['median_mm']:g} mm"


def cross_tables(results: list[dict]) -> str:
    """Headline and per-organ inside / median, then organ P@k, one column a model and placement."""
    ways = ("unplaced", "placed")
    columns = [(r, w) for w in ways for r in results if w in r["summary"]["all"]]
    names = [f"{r['model']}, {'off' if w == 'unplaced' else 'on'}" for r, w in columns]
    lines = ["| pairs judged | " + " | ".join(f"{n}: inside / median" for n in names) + " |", "|---|" + "---:|" * len(columns)]
    organs = list(results[0]["summary"]["per_organ"])
    for name in ["all"] + organs:
        rows = [r["summary"]["all"] if name == "all" else r["summary"]["per_organ"].get(name) for r, _ in columns]
        pairs = sorted({row["pairs"] for row in rows if row})
        label = f"{name} ({'/'.join(str(p) for p in pairs)})"
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(w) if row else None) for row, (_, w) in zip(rows, columns)) + " |")
    lines += ["", "| organ P@k (queries) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(columns)]
    for k in KS:
        values = [organ_precision(r, w)[k] for r, w in columns]
        queries = sorted({r["summary"]["queries"] for r, _ in columns})
        lines.append(f"| P@{k} ({'/'.join(map(str, queries))}) | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "| run | patients indexed | queries | build CPU s | queries CPU s | search CPU s / query (median) | "
                  "place CPU s / query (median) | load at end |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['model']} | {len(r['patients_indexed'])} | {s['queries']} | {r['build_cpu_s']} | {r['cpu_s']} | "
                     f"{s['search_cpu_s_per_query_median']} | {s['place_cpu_s_per_query_median']} | "
                     f"{r['load_average_1min_at_end']:.1f} |")
    return "\n".join(lines)


def case_table(result: dict) -> str:
    """Whole-volume ranking: same modality and body region at 1, same real volume at 1, per model."""
    lines = ["| model | copies asked | same kind at 1 | same real volume at 1 | build CPU s | queries CPU s | load |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(f"| {r['model']} | {r['copies']} | {r['same_kind_at_1']}/{r['copies']} | "
                     f"{r['same_volume_at_1']}/{r['copies']} | {r['build_cpu_s']} | {r['query_cpu_s']} | {r['load']} |")
    return "\n".join(lines)


def phantom_table(result: dict) -> str:
    """The demo cohorts: mP@1 and localised per model, seed and placement."""
    lines = ["| model | seed | placement | queries | mP@1 | localised | chance mP@1 | build CPU s | queries CPU s | load |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['seed']} | {r['placement']} | {r['queries']} | {r['mP@1']:.2f} | "
                     f"{100 * r['localised']:.0f} % | {r['chance_mP@1']:.2f} | {r['build_cpu_s']} | {r['query_cpu_s']} | "
                     f"{r['load']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cross", nargs="*", default=[], help="cross_patient.py result JSONs (one a model)")
    parser.add_argument("--cases", default=None, help="case_ranking.py result JSON")
    parser.add_argument("--phantoms", default=None, help="phantom_models.py result JSON")
    args = parser.parse_args()
    if args.cross:
        print(cross_tables([json.loads(Path(p).read_text()) for p in args.cross]) + "\n")
    if args.cases:
        print(case_table(json.loads(Path(args.cases).read_text())) + "\n")
    if args.phantoms:
        print(phantom_table(json.loads(Path(args.phantoms).read_text())))


if __name__ == "__main__":
    main()
