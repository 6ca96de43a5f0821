"""Cross-patient anatomy: an organ boxed in one real patient, judged in every other real patient among the results.

The main figure of issue 29 (``python benchmarks/real_anatomy.py --cross-patient ...`` runs this). The index holds real
head-and-neck CT patients of one part of the split (:mod:`patient_split`: 66 report, 104 tune) and three
real distractors (the shared abdominal CT, the Debian head CT ``Cranium.inv3`` and brain MR ``ch2``; :mod:`real_data`),
built through the product path (``Index`` with the default settings of the model asked). Each query is an organ box
(or, when the box's centre lies off the organ, the organ as a segment) in one patient, asked with the product's search
(``roi_query``/``segment_query`` + ``Searcher.search``, its own case left out) and placed (``Searcher.place``); every
result that is another head-and-neck patient contouring that organ is judged: the distance in mm from the shown point
(``best_match.spot``) to that patient's organ mask, and whether it is within 5 mm ("inside"). Placement off and on are
judged from the same search. Every result, distractors too, is checked for a shown point inside its own volume.

Modes (``--slabs``):

* ``none``: whole series asked into whole series.
* ``from``: each query asked on a 40-60 mm slab of its patient's series around the organ (shifted by up to 10 mm), into
  the whole series of the others.
* ``into``: the index holds one 40-60 mm slab of each patient (cut around one of its organs, cycling) instead of its
  whole series; whole-series queries are asked into them. A slab without the organ is judged by whether the answer says
  the organ's place is not in its field of view.

    python benchmarks/real_anatomy.py --cross-patient --quick               # minutes: 12 patients, queries in 4
    python benchmarks/real_anatomy.py --cross-patient                       # 36 patients, queries in 12
    python benchmarks/real_anatomy.py --cross-patient --slabs from|into [--part tuning] [--model astra-ct] [--work DIR]
    python benchmarks/real_anatomy.py --cross-patient --quick --query-skip 2 --query-patients 2   # the next 2 patients
    python benchmarks/cross_patient.py --join A.json B.json --out joined.json    # runs over one index, as one

The run exits non-zero (after writing its JSON) when any shown point lies outside its result's volume.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import head_neck
import numpy as np
import real_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    # patients indexed (the first of the part, in number order), patients queried (the first of those), results asked
    "quick": {"index_patients": 12, "query_patients": 4, "k": 10},
    "full": {"index_patients": 36, "query_patients": 12, "k": 10},
}
DISTRACTORS = ("abdomen_ct", "head_ct", "brain_mr")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (threads included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build(work: str, part: str, config: dict, slabs: str, model: str, cache: str | None = None) -> dict:
    """The index of one part's first patients (whole series, or their slabs for ``slabs='into'``) and the distractors."""
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.models.registry import create_embedder

    began, cpu = time.monotonic(), _cpu()
    chosen = head_neck.patients(part)[:config["index_patients"]]
    distractors = real_data.prepare(cache, DISTRACTORS)
    cases = {}  # source path -> {"patient", "labels", "slab"?} or {"distractor"}
    if slabs == "into":
        for position, patient in enumerate(chosen):
            slab = head_neck.write_slab(patient, Path(work, "slabs"), position)
            cases[slab.image] = {"patient": patient.name, "labels": slab.labels, "slab": asdict(slab)}
    else:
        for patient in chosen:
            cases[patient.image] = {"patient": patient.name, "labels": patient.labels}
    for name, volume in distractors.items():
        cases[volume.image] = {"distractor": name}
    folder = os.path.join(work, f"index-{part}-{config['index_patients']}-{'slabs' if slabs == 'into' else 'whole'}-{model}")
    sources = sorted(cases)
    listing = Path(folder, "sources.json")
    if not (listing.exists() and json.loads(listing.read_text()) == sources):
        import shutil

        embedder = create_embedder(model)
        if _resumable(folder, sources):  # a build stopped half-way: add_sources skips the cases already in (checksums);
            index = Index.open(folder, writable=True, trust=True)  # trusted: this benchmark's own work folder, unsealed
        else:
            shutil.rmtree(folder, ignore_errors=True)
            index = Index.create(folder, embedder, IndexSettings())
        with index:
            report = index.add_sources(sources, embedder)
        if report.indexed != len(sources):
            raise RuntimeError(f"indexed {report.indexed} of {len(sources)} cases: {report.summary()}")
        listing.write_text(json.dumps(sources))
    return {"folder": folder, "cases": cases, "patients": [p.name for p in chosen],
            "build_s": round(time.monotonic() - began, 1), "build_cpu_s": round(_cpu() - cpu, 1)}


def _resumable(folder: str, sources: list[str]) -> bool:
    """Whether ``folder`` holds an index whose cases are all among ``sources`` (a build stopped before its end)."""
    from CBIRSlicerLib.index.folder import Index

    if not Path(folder, "manifest.json").exists():
        return False
    try:
        with Index.open(folder) as index:
            held = {os.path.abspath(case.source) for case in index.catalog.cases()}
    except Exception:  # an unreadable index is rebuilt from scratch
        return False
    return held <= {os.path.abspath(source) for source in sources}


def _inside_volume(volume, ras, tolerance_voxels: float = 0.5) -> bool:
    """Whether a RAS point lies on a volume's voxel grid (half a voxel of margin)."""
    ijk = volume.ras_to_ijk_points(np.asarray(ras, float)[None])[0]
    return bool(np.all(ijk >= -tolerance_voxels) and np.all(ijk <= np.array(volume.shape_ijk) - 1 + tolerance_voxels))


def _shown(result) -> dict:
    """What a result's best match shows, read generically (fields that older answers lack are None)."""
    match = result.best_match
    return {"spot": [round(float(v), 2) for v in match.spot], "shown": getattr(match, "shown", None),
            "in_view": getattr(match, "in_view", None), "note": getattr(match, "note", None),
            "carries_both": getattr(match, "look_alike_ras", None) is not None}


def run(built: dict, part: str, config: dict, slabs: str, place: bool = True) -> dict:
    """Every query of the part's first ``query_patients`` patients; one record per (query, result)."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.imaging.roi import RoiBox
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import roi_query, segment_query
    from CBIRSlicerLib.retrieval.search import Searcher

    searcher = Searcher(Index.open(built["folder"]))
    cases = built["cases"]
    by_patient = {info["patient"]: source for source, info in cases.items() if "patient" in info}
    organs_of = {source: head_neck.Organs.read(info["labels"]) for source, info in cases.items() if "labels" in info}
    volumes = {}

    def volume_of(source):
        if source not in volumes:
            volumes[source] = read_volume(source)
        return volumes[source]

    skip = config.get("query_skip", 0)  # a run continued: the first patients' queries were asked by an earlier run
    queried = [p for p in head_neck.patients(part) if p.name in built["patients"]][skip:skip + config["query_patients"]]
    records, queries = [], []
    began, cpu_began = time.monotonic(), _cpu()
    for patient in queried:
        whole = read_volume(patient.image)
        organs = head_neck.Organs.read(patient.labels)
        for query in head_neck.organ_queries(patient, organs):
            asked_volume = whole
            slab = None
            if slabs == "from":
                thickness, shift = head_neck.slab_draw(patient.number * 10 + query.label)
                asked_volume = head_neck.cut(whole, query.centre[2] + shift, thickness)
                slab = {"thickness_mm": round(thickness, 1), "shift_mm": round(shift, 1)}
            box = RoiBox(query.centre, query.size)
            if query.kind == "segment":
                asked = segment_query(asked_volume, head_neck.segment_of(organs, query.label), "axial", searcher.index)
            else:
                asked = roi_query(asked_volume, box, "axial", searcher.index)
            if slabs == "into":  # the query patient's own slab is its case too
                asked.exclude_sources.append(by_patient.get(patient.name, ""))
            cpu = _cpu()
            answer = searcher.search(asked, k=config["k"])
            search_cpu = _cpu() - cpu
            cpu, wall = _cpu(), time.monotonic()
            placed = searcher.place(asked, answer) if place else None
            place_cpu, place_wall = _cpu() - cpu, time.monotonic() - wall
            asked_at = np.asarray(asked.centre_ras, float)
            queries.append({"patient": patient.name, "organ": query.organ, "kind": query.kind, "slab": slab,
                            "centre_ras": [round(v, 2) for v in asked_at], "size_mm": [round(v, 1) for v in query.size],
                            "centre_off_organ_mm": query.centre_off_organ_mm, "results": len(answer.results),
                            "search_cpu_s": round(search_cpu, 3), "place_cpu_s": round(place_cpu, 3),
                            "place_s": round(place_wall, 3)})
            for number, result in enumerate(answer.results):
                info = cases.get(result.source, {})
                volume = volume_of(result.source)
                record = {"query": len(queries) - 1, "patient": patient.name, "organ": query.organ, "label": query.label,
                          "kind": query.kind, "rank": result.rank,
                          "result": info.get("patient") or info.get("distractor") or os.path.basename(result.source),
                          "head_neck": "patient" in info}
                answers = {"unplaced": result}
                if placed is not None:
                    answers["placed"] = placed.results[number]
                truth = organs_of.get(result.source)
                record["organ_present"] = bool(truth is not None and truth.has(query.label))
                for name, shown in answers.items():
                    out = _shown(shown)
                    out["inside_volume"] = _inside_volume(volume, out["spot"])
                    if record["organ_present"]:
                        distance = truth.distance_mm(query.label, out["spot"])
                        out["distance_mm"] = round(distance, 1)
                        out["inside"] = distance <= head_neck.INSIDE_MM
                    record[name] = out
                records.append(record)
        print(f"{patient.name}: {len(queries)} queries, {len(records)} results, {time.monotonic() - began:.0f} s", flush=True)
    return {"records": records, "queries": queries, "seconds": round(time.monotonic() - began, 1),
            "cpu_s": round(_cpu() - cpu_began, 1)}


def _rate(values) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 3) if values else None


def _median(values) -> float | None:
    values = list(values)
    return round(float(np.median(values)), 1) if values else None


def summarise(outcome: dict, slabs: str) -> dict:
    """Headline, per organ and per query kind, placed and unplaced; field-of-view answers on slabs without the organ."""
    records, queries = outcome["records"], outcome["queries"]
    judged = [r for r in records if r["head_neck"] and r["organ_present"] and r["result"] != r["patient"]]
    ways = [w for w in ("unplaced", "placed") if any(w in r for r in records)]

    def figures(rows):
        out = {"pairs": len(rows)}
        for way in ways:
            out[way] = {"inside": _rate(r[way]["inside"] for r in rows),
                        "median_mm": _median(r[way]["distance_mm"] for r in rows),
                        "inside_at_1": _rate(r[way]["inside"] for r in rows if r["rank"] == 1)}
        return out

    summary = {"all": figures(judged)}
    for kind in ("box", "segment"):
        summary[f"{kind} queries"] = figures([r for r in judged if r["kind"] == kind])
    summary["per_organ"] = {organ: figures([r for r in judged if r["organ"] == organ])
                            for organ in head_neck.ORGANS.values() if any(r["organ"] == organ for r in judged)}
    summary["per_organ_box"] = {organ: figures([r for r in judged if r["organ"] == organ and r["kind"] == "box"])
                                for organ in head_neck.ORGANS.values()
                                if any(r["organ"] == organ and r["kind"] == "box" for r in judged)}
    summary["shown_outside_volume"] = {way: sum(not r[way]["inside_volume"] for r in records) for way in ways}
    summary["results"] = len(records)
    summary["queries"] = len(queries)
    summary["head_neck_share_of_results"] = _rate(r["head_neck"] for r in records)
    summary["top_result_head_neck"] = _rate(r["head_neck"] for r in records if r["rank"] == 1)
    if "placed" in ways:  # the organ in the result, but the query's level said to lie outside its field of view
        said_out = [r for r in judged if r["placed"]["in_view"] is False]
        summary["organ_present_said_not_in_view"] = {"pairs": len(said_out), "inside": _rate(r["placed"]["inside"] for r in said_out)}
        summary["placed_shown"] = {shown: sum(r["placed"]["shown"] == shown for r in judged) for shown in ("anatomy", "look-alike")}
    if slabs == "into":
        absent = [r for r in records if r["head_neck"] and not r["organ_present"]]
        summary["organ_not_in_slab"] = {"pairs": len(absent), **{way: {"said_not_in_view": sum(r[way]["in_view"] is False
                                                                                                 for r in absent)}
                                                                  for way in ways}}
    summary["place_cpu_s_per_query_median"] = _median(q["place_cpu_s"] for q in queries)
    summary["place_s_per_query_median"] = _median(q["place_s"] for q in queries if "place_s" in q)
    summary["search_cpu_s_per_query_median"] = _median(q["search_cpu_s"] for q in queries)
    return summary


def markdown(result: dict) -> str:
    """A result JSON's headline and per-organ tables as Markdown (docs/benchmarks.md)."""
    summary = result["summary"]
    ways = [w for w in ("unplaced", "placed") if w in summary["all"]]

    def cell(figure):
        if figure is None or figure.get("inside") is None:
            return "-"
        return f"{100 * figure['inside']:.1f} % / {figure['median_mm']:g} mm"

    head = "| queries | (query, result) pairs | " + " | ".join(f"{w}: inside / median" for w in ways) + " |"
    lines = [head, "|" + "---|" * (2 + len(ways))]
    for name in ("all", "box queries", "segment queries"):
        row = summary[name]
        lines.append(f"| {name} | {row['pairs']} | " + " | ".join(cell(row.get(w)) for w in ways) + " |")
    lines += ["", "| organ | pairs | " + " | ".join(f"{w}: inside / median" for w in ways) + " |", "|" + "---|" * (2 + len(ways))]
    for organ, row in summary["per_organ"].items():
        lines.append(f"| {organ} | {row['pairs']} | " + " | ".join(cell(row.get(w)) for w in ways) + " |")
    outside = ", ".join(f"{w} {n}" for w, n in summary["shown_outside_volume"].items())
    lines += ["", f"Shown points outside their result's volume, of {summary['results']} results: {outside}. "
                  f"Top result another head-and-neck patient: {100 * (summary['top_result_head_neck'] or 0):.0f} %."]
    if "organ_not_in_slab" in summary:
        absent = summary["organ_not_in_slab"]
        lines.append(f"Slabs without the organ: {absent['pairs']} pairs; said 'not in this series' field of view': "
                     + ", ".join(f"{w} {absent[w]['said_not_in_view']}" for w in ways) + ".")
    return "\n".join(lines)


def join(paths: list[str], out: str | None = None) -> dict:
    """Several runs over the same index (different query patients) as one result; written to ``out`` if given."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len({(tuple(r["patients_indexed"]), r["slabs"], r["model"]) for r in runs}) != 1:
        raise SystemExit("cannot join: the runs differ in index, slabs or model")
    records, queries = [], []
    for run_ in runs:
        for record in run_["records"]:
            records.append(dict(record, query=record["query"] + len(queries)))
        queries += run_["queries"]
    joined = dict(runs[0], joined_from=[str(p) for p in paths], records=records, queries=queries,
                  seconds=sum(r["seconds"] for r in runs), cpu_s=sum(r["cpu_s"] for r in runs),
                  summary=summarise({"records": records, "queries": queries}, runs[0]["slabs"]))
    if out:
        Path(out).write_text(json.dumps(joined, indent=1, default=str))
    return joined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 patients indexed, queries in 4 (minutes)")
    parser.add_argument("--part", choices=("reporting", "tuning"), default="reporting")
    parser.add_argument("--slabs", choices=("none", "from", "into"), default="none")
    parser.add_argument("--model", default="handcrafted", help="the index's model (any the registry knows)")
    parser.add_argument("--no-place", action="store_true", help="judge the unplaced answers only")
    parser.add_argument("--index-patients", type=int, default=None)
    parser.add_argument("--query-patients", type=int, default=None)
    parser.add_argument("--query-skip", type=int, default=0, help="leave out the first N query patients (continue a run)")
    parser.add_argument("--join", nargs="+", metavar="JSON", help="summarise several result JSONs of one index as one, then stop")
    parser.add_argument("--work", default=None, help="folder for slabs and indexes (kept; reused when present)")
    parser.add_argument("--cache", default=None, help="folder of the Debian packages (real_data.py)")
    parser.add_argument("--out", default=None, help="JSON file (default docs/benchmarks/cross_patient_*.json)")
    parser.add_argument("--markdown", metavar="JSON", help="print a result JSON's tables as Markdown, then stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.join:
        print(markdown(join(args.join, args.out)))
        return
    config = dict(CONFIGS["quick" if args.quick else "full"], query_skip=args.query_skip)
    for key in ("index_patients", "query_patients"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    work = args.work or tempfile.mkdtemp(prefix="cbir-cross-")
    built = build(work, args.part, config, args.slabs, args.model, args.cache)
    print(f"index {built['folder']}: {len(built['cases'])} cases, built in {built['build_s']} s", flush=True)
    outcome = run(built, args.part, config, args.slabs, place=not args.no_place)
    summary = summarise(outcome, args.slabs)
    result = {"note": "real different patients (OpenKBP head-and-neck CT); split: benchmarks/patient_split.py",
              "part": args.part, "patients_indexed": built["patients"], "slabs": args.slabs, "model": args.model,
              "config": config, "placed": not args.no_place, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average_1min_at_end": os.getloadavg()[0], "build_s": built["build_s"], "build_cpu_s": built["build_cpu_s"],
              "seconds": outcome["seconds"], "cpu_s": outcome["cpu_s"], "summary": summary,
              "queries": outcome["queries"], "records": outcome["records"]}
    stem = f"cross_patient_{args.part}" + ("_quick" if args.quick else "") + ("" if args.slabs == "none" else f"_{args.slabs}_slabs")
    stem += "" if args.model == "handcrafted" else f"_{args.model}"
    out = args.out or str(REPO / "docs" / "benchmarks" / f"{stem}.json")
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(markdown(result))
    print(f"wrote {out}")
    outside = {way: n for way, n in summary["shown_outside_volume"].items() if n}
    if outside:  # issue 29: no answer may ever show a point outside its result's volume
        raise SystemExit(f"FAILED: shown points outside their result's volume ({outside}); see {out}")


if __name__ == "__main__":
    main()
