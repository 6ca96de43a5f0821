"""The reading room: suggested findings from the neighbours, and relevance feedback, measured.

Phantoms: ``cbir demo`` cohorts (``make_cohort``, one lesion a case, 4 kinds balanced) of seeds 0 and 1,
indexed with their lesion kinds as labels (demo settings, ``handcrafted``); one ROI query per lesion (a cube
of 2.5 radii), its own case left out. Real images: ``benchmarks/real_anatomy.py``'s pseudo-patients of the
real abdominal CT and brain MR (6 copies each, 4 phantoms), ROI queries of labelled structures (up to
``REAL_PER_COPY`` large ones per copy); a neighbour's label is the structure at its match spot in its own
label map (the answer placed, as ``cbir search`` does), since every copy of one volume shares its case labels.

* Suggestion: leave-one-case-out k-NN vote over the top 10 (``retrieval.suggestion``): accuracy, balanced
  accuracy and expected calibration error, beside chance (the majority class; 1 / classes), with the
  calibration fitted on demand from the index's pooled case vectors and cross-fitted on the queries of the
  other cases; and accuracy against labelled cases per class (random subsets, phantoms) for "too few".
* Feedback: simulated from the ground truth (relevant: another case holding the query's lesion kind; real:
  another copy of the same real volume). Each round the top 5 of the current list are judged; every judged
  case is removed before scoring (residual ranking); modified precision@5 of the next list after 1 and 2
  rounds, for no feedback (the first answer's list read on), Rocchio and the linear re-scoring.

    python benchmarks/reading_room.py --work DIR        # builds (or reuses) the cohorts, copies and indexes in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = Path(__file__).resolve().parents[1]
PHANTOM_CASES = 24
SEEDS = (0, 1)
JUDGED_PER_ROUND = 5
ROUNDS = 2
REAL_PER_COPY = 3
REAL_CONFIG = {"copies": 6, "phantoms": 4, "inplane_mm": {"abdomen_ct": None, "brain_mr": 1.5}, "brain_regions": 8,
               "abdomen_structures": 0, "volumes": ["abdomen_ct", "brain_mr"], "model": "handcrafted"}


def build_phantoms(work: str, seed: int, cases: int = PHANTOM_CASES):
    """The cohort (written once) and its index with the lesion kinds as labels; returns truth, paths, index folder."""
    from CBIRSlicerLib.demo import demo_settings
    from CBIRSlicerLib.imaging import synthetic
    from CBIRSlicerLib.index.files import MANIFEST
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.models.registry import create_embedder

    folder = os.path.join(work, f"phantom_s{seed}")
    cohort = synthetic.make_cohort(cases, seed=seed)
    csv_path = os.path.join(folder, "cohort", synthetic.COHORT_CSV)
    paths = synthetic.write_cohort(cohort, os.path.join(folder, "cohort")) if not os.path.exists(csv_path) else \
        [os.path.join(folder, "cohort", f"{c.name}.nii.gz") for c in cohort]
    labels = {os.path.abspath(p): [lesion.kind for lesion in c.lesions] for p, c in zip(paths, cohort)}
    embedder = create_embedder("handcrafted")
    index_folder = os.path.join(folder, "index")
    if os.path.exists(os.path.join(index_folder, MANIFEST)):
        index = Index.open(index_folder, writable=True)
    else:
        index = Index.create(index_folder, embedder, demo_settings())
    with index:
        index.add_sources(paths, embedder, labels=labels)
    truth = synthetic.read_cohort(csv_path)
    return truth, {c.name: p for c, p in zip(cohort, paths)}, index_folder


def residual_precision(ranked: list[bool], relevant_left: int, k: int = 5) -> float | None:
    from CBIRSlicerLib.retrieval.evaluation import modified_precision_at_k

    return modified_precision_at_k(ranked, k, relevant_left)


def feedback_rounds(searcher, query, first, is_relevant, total_relevant: int, strategies=("rocchio", "linear")) -> dict:
    """mP@5 of the residual list after 0..ROUNDS rounds of simulated feedback, per strategy (and 'none')."""
    from CBIRSlicerLib.retrieval.feedback import Feedback, search_again

    depth = len(first.results)
    out = {}
    # none: the first answer read on past what was judged
    ids = [r.case_id for r in first.results]
    out["none"] = []
    for rounds in range(ROUNDS + 1):
        judged = ids[:rounds * JUDGED_PER_ROUND]
        left = total_relevant - sum(is_relevant(c) for c in judged)
        out["none"].append(residual_precision([is_relevant(c) for c in ids[len(judged):]], left))
    for strategy in strategies:
        marks, current, values = Feedback(), first, []
        values.append(out["none"][0])
        for _ in range(ROUNDS):
            for result in current.results[:JUDGED_PER_ROUND]:
                marks.mark(result.case_id, result.best_match.item_id, bool(is_relevant(result.case_id)))
            current = search_again(searcher, query, marks, k=depth, strategy=strategy)
            left = total_relevant - sum(is_relevant(c) for c in marks.judged)
            values.append(residual_precision([is_relevant(r.case_id) for r in current.results], left))
        out[strategy] = values
    return out


def summarise_feedback(rows: list[dict]) -> dict:
    """Mean mP@5 per strategy after 0..ROUNDS rounds, each round over the queries with something relevant left in every strategy."""
    strategies = list(rows[0]) if rows else []
    out = {"queries": len(rows), "scored_per_round": []}
    for s in strategies:
        out[s] = []
    for n in range(ROUNDS + 1):
        scored = [r for r in rows if all(r[s][n] is not None for s in strategies)]
        out["scored_per_round"].append(len(scored))
        for s in strategies:
            out[s].append(round(float(np.mean([r[s][n] for r in scored])), 3) if scored else None)
    return out


def suggestion_metrics(votes: list[dict], index_calibration) -> dict:
    """Accuracy, balanced accuracy, ECE (on-demand and cross-fitted calibration), coverage and chance of LOCO votes."""
    from CBIRSlicerLib.retrieval.suggestion import balanced_accuracy, expected_calibration_error, fit_calibration

    answered = [v for v in votes if v["winner"] is not None]
    truth = [v["truth"] for v in votes]
    right = [v["winner"] == v["truth"] for v in answered]
    crossed = []
    for v in answered:  # fitted on the other cases' queries only
        others = [o for o in answered if o["case"] != v["case"]]
        fitted = fit_calibration([o["share"] for o in others], [o["winner"] == o["truth"] for o in others], "cross")
        crossed.append(fitted.confidence(v["share"]))
    counts = {label: truth.count(label) for label in set(truth)}
    return {"queries": len(votes), "answered": len(answered),
            "accuracy": round(float(np.mean(right)), 3) if right else None,
            "accuracy_over_all_queries": round(float(np.sum(right) / max(1, len(votes))), 3),
            "balanced_accuracy": round(balanced_accuracy(truth, [v["winner"] for v in votes]), 3) if votes else None,
            "chance_majority": round(max(counts.values()) / len(truth), 3) if truth else None,
            "chance_uniform": round(1 / len(counts), 3) if counts else None,
            "mean_share": round(float(np.mean([v["share"] for v in answered])), 3) if answered else None,
            "ece_raw_share": _round(expected_calibration_error([v["share"] for v in answered], right)),
            "ece_pooled_calibration": _round(expected_calibration_error([index_calibration.confidence(v["share"]) for v in answered],
                                                                       right)),
            "ece_cross_fitted": _round(expected_calibration_error(crossed, right)),
            "pooled_calibration": index_calibration.to_json()}


def _round(value):
    return None if value is None else round(float(value), 3)


def vote_of(results, labels_of, k: int = 10) -> tuple[str | None, float]:
    from CBIRSlicerLib.retrieval.suggestion import vote

    top = list(results)[:k]
    shares = vote([labels_of(r) for r in top], [r.score for r in top])
    return next(iter(shares.items())) if shares else (None, 0.0)


def pooled_calibration(index, column: str, k: int = 10):
    """Platt scaling fitted on the index's own leave-one-case-out votes of pooled case vectors: the alternative measured
    against the raw share here, and not used by the library (it made region queries' confidences worse)."""
    from CBIRSlicerLib.retrieval.suggestion import class_counts, fit_calibration, loco_case_votes

    votes = loco_case_votes(index, column, k)
    shares, right = [], []
    for names, shares_of in zip(votes.labels, votes.votes):
        if names and shares_of:
            winner, share = next(iter(shares_of.items()))
            shares.append(share)
            right.append(winner in names)
    return fit_calibration(shares, right, "index cases (pooled vectors, leave-one-case-out)", class_counts(index, column))


def phantom_run(work: str, seed: int) -> dict:
    """Suggestion and feedback on one phantom cohort."""
    from CBIRSlicerLib.imaging.readers import read_volume
    from CBIRSlicerLib.imaging.roi import RoiBox
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.retrieval.queries import roi_query
    from CBIRSlicerLib.retrieval.search import Searcher

    began = time.monotonic()
    truth, paths, index_folder = build_phantoms(work, seed)
    built = time.monotonic() - began
    index = Index.open(index_folder)
    searcher = Searcher(index)
    t = time.monotonic()
    calibration = pooled_calibration(index, "label")
    calibration_seconds = time.monotonic() - t
    kinds_of = {os.path.abspath(paths[name]): lesions[0].kind for name, lesions in truth.items()}
    case_kind = {c.case_id: kinds_of.get(os.path.abspath(c.source)) for c in index.catalog.cases()}
    names_of = {os.path.abspath(p): name for name, p in paths.items()}
    case_name = {c.case_id: names_of.get(os.path.abspath(c.source)) for c in index.catalog.cases()}
    votes, feedback, answers = [], [], []
    for name, lesions in truth.items():
        volume = read_volume(paths[name])
        for lesion in lesions:
            side = 2.5 * lesion.radius_mm
            query = roi_query(volume, RoiBox(lesion.center, (side,) * 3), "axial", index)
            first = searcher.search(query, k=len(truth))
            winner, share = vote_of(first.results, lambda r: [case_kind[r.case_id]])
            votes.append({"case": name, "truth": lesion.kind, "winner": winner, "share": share})
            answers.append((name, lesion.kind, [case_name[r.case_id] for r in first.results],
                            [case_kind[r.case_id] for r in first.results], [r.score for r in first.results]))
            total = sum(1 for other, ls in truth.items() if other != name and ls[0].kind == lesion.kind)
            feedback.append(feedback_rounds(searcher, query, first, lambda c, kind=lesion.kind: case_kind[c] == kind, total))
    return {"seed": seed, "cases": len(truth), "build_seconds": round(built, 1), "calibration_seconds": round(calibration_seconds, 2),
            "suggestion": suggestion_metrics(votes, calibration), "too_few": too_few_curve(answers),
            "feedback": summarise_feedback(feedback), "seconds": round(time.monotonic() - began, 1)}


def too_few_curve(answers, per_class=(1, 2, 3, 4, 5), draws: int = 20, seed: int = 0) -> dict:
    """LOCO accuracy when only m labelled cases per class exist (random subsets; unlabelled neighbours do not vote)."""
    from CBIRSlicerLib.retrieval.suggestion import vote

    rng = np.random.default_rng(seed)
    kind_of = {name: kind for name, kind, *_ in answers}
    out = {}
    for m in per_class:
        right, answered = [], 0
        for _ in range(draws):
            chosen = set()
            for kind in sorted(set(kind_of.values())):
                pool = sorted(n for n in kind_of if kind_of[n] == kind)
                chosen |= set(rng.choice(pool, min(m, len(pool)), replace=False).tolist())
            for _name, kind, ranked, kinds, scores in answers:
                top = [(k, s) for case, k, s in zip(ranked[:10], kinds[:10], scores[:10]) if case in chosen]
                shares = vote([[k] for k, _ in top], [s for _, s in top])
                winner = next(iter(shares), None)
                answered += winner is not None
                right.append(winner == kind)
        out[str(m)] = {"accuracy_over_all_queries": round(float(np.mean(right)), 3), "answered": round(answered / len(right), 3)}
    return out


class RealBench:
    """The real-image benchmark's build (real_anatomy's quick configuration), its index and searcher, which copy each
    indexed case is, the copies' label maps, and the sampled organ queries both real runs ask."""

    def __init__(self, work: str):
        import real_anatomy

        from CBIRSlicerLib.index.folder import Index
        from CBIRSlicerLib.retrieval.search import Searcher

        began = time.monotonic()
        self.bench = real_anatomy.build(os.path.join(work, "real"), REAL_CONFIG)
        self.built_seconds = time.monotonic() - began
        self.index = Index.open(self.bench.index_folder)
        self.searcher = Searcher(self.index)
        by_source = {os.path.abspath(c.image): c for c in self.bench.copies}
        self.maps = {(c.volume, c.number): real_anatomy._LabelMap(c.labels) for c in self.bench.copies if c.labels}
        self.copy_of = {c.case_id: by_source.get(os.path.abspath(c.source)) for c in self.index.catalog.cases()}

    def sampled_queries(self):
        """(copy, its volume, up to REAL_PER_COPY large labelled structure queries inside it) for each copy, the same
        sample on every call (one generator seeded 0 across the copies)."""
        import real_anatomy

        from CBIRSlicerLib.imaging.readers import read_volume

        rng = np.random.default_rng(0)
        for copy in self.bench.copies:
            volume = read_volume(copy.image)
            key = (copy.volume, copy.number)
            patient = real_anatomy.pseudo_patients.PseudoPatient.load(copy.transform)
            queries = [q for q in real_anatomy.queries_of(self.bench, copy, self.maps.get(key), patient, volume)
                       if q["large"] and q["label"] is not None and real_anatomy._contains(volume, q["centre"])]
            picked = sorted(rng.choice(len(queries), min(REAL_PER_COPY, len(queries)), replace=False))
            yield copy, volume, [queries[n] for n in picked]


def real_run(work: str) -> dict:
    """Suggestion (structure labels at the neighbours' placed match spots) and feedback on the real-image benchmark."""

    from CBIRSlicerLib.retrieval.queries import roi_query
    from CBIRSlicerLib.retrieval.suggestion import Calibration

    began = time.monotonic()
    real = RealBench(work)
    bench, searcher, copy_of, maps = real.bench, real.searcher, real.copy_of, real.maps
    votes, feedback = [], []
    for copy, volume, queries in real.sampled_queries():
        names = bench.structures[copy.volume]
        for q in queries:
            asked = roi_query(volume, q["roi"], "axial", real.index)
            first = searcher.search(asked, k=len(copy_of))
            placed = searcher.place(asked, first, limit=10)

            def region(result):
                other = copy_of.get(result.case_id)
                if other is None or (other.volume, other.number) not in maps:
                    return []
                found = maps[(other.volume, other.number)].at(result.best_match.spot)
                table = bench.structures[other.volume]
                return [f"{other.volume}:{table[found]['name']}"] if found in table else [f"{other.volume}:outside"]

            truth = f"{copy.volume}:{names[q['label']]['name']}"
            winner, share = vote_of(placed.results, region)
            votes.append({"case": f"{copy.volume}{copy.number}", "truth": truth, "winner": winner, "share": share})
            mine = {c for c, other in copy_of.items() if other is not None and other.volume == copy.volume and other.number != copy.number}
            feedback.append(feedback_rounds(searcher, asked, first, lambda c, mine=mine: c in mine, len(mine)))
    return {"copies": len(bench.copies), "phantoms": len(bench.phantoms), "build_seconds": round(real.built_seconds, 1),
            "suggestion": suggestion_metrics(votes, Calibration(source="identity (region labels: no index calibration)")),
            "feedback": summarise_feedback(feedback), "seconds": round(time.monotonic() - began, 1)}


def markdown(result: dict) -> str:
    """The suggestion and feedback tables of a result JSON, for docs/benchmarks.md."""
    runs = [(f"phantoms, seed {r['seed']} ({r['cases']} cases)", r) for r in result.get("phantoms", [])]
    if "real" in result:
        runs.append((f"real images ({result['real']['copies']} copies + {result['real']['phantoms']} phantoms)", result["real"]))
    lines = ["| data | queries (answered) | accuracy | balanced accuracy | chance (majority / uniform) | ECE: raw share / "
             "pooled-vector calibration / cross-fitted |", "|---|---|---|---|---|---|"]
    for name, r in runs:
        s = r["suggestion"]
        lines.append(f"| {name} | {s['queries']} ({s['answered']}) | {s['accuracy']} | {s['balanced_accuracy']} | "
                     f"{s['chance_majority']} / {s['chance_uniform']} | {s['ece_raw_share']} / {s['ece_pooled_calibration']} / "
                     f"{s['ece_cross_fitted']} |")
    lines += ["", "| data | strategy | mP@5, no feedback | after 1 round | after 2 rounds | queries scored per round |",
              "|---|---|---|---|---|---|"]
    for name, r in runs:
        f = r["feedback"]
        for strategy in ("none", "rocchio", "linear"):
            values = " | ".join("-" if v is None else f"{v:.3f}" for v in f[strategy])
            lines.append(f"| {name} | {strategy} | {values} | {'/'.join(str(n) for n in f['scored_per_round'])} |")
    if "real_regions" in result:
        f = result["real_regions"]["feedback"]
        lines += ["", "| real images, relevance of the match (inside the query's structure) | precision@5, no feedback | after 1 round "
                  "| after 2 rounds | queries |", "|---|---|---|---|---|"]
        for strategy in ("none", "rocchio", "linear"):
            values = " | ".join("-" if v is None else f"{v:.3f}" for v in f[strategy])
            lines.append(f"| {strategy} | {values} | {'/'.join(str(n) for n in f['scored_per_round'])} |")
    too_few = [(r["seed"], r["too_few"]) for r in result.get("phantoms", [])]
    if too_few:
        lines += ["", "| labelled cases per class | " + " | ".join(f"seed {seed}: accuracy (answered)" for seed, _ in too_few) + " |",
                  "|---|" + "---|" * len(too_few)]
        for m in too_few[0][1]:
            lines.append(f"| {m} | " + " | ".join(f"{t[m]['accuracy_over_all_queries']} ({t[m]['answered']})" for _, t in too_few) + " |")
    return "\n".join(lines)


def region_feedback_rounds(searcher, query, first, relevant_of, strategies=("rocchio", "linear")) -> dict:
    """Precision@5 of the residual list after 0..ROUNDS rounds when relevance is of the match (its region), not the case."""
    from CBIRSlicerLib.retrieval.feedback import Feedback, search_again

    def p5(results):
        top = list(results)[:5]
        return float(np.mean([relevant_of(r) for r in top])) if top else None

    out = {"none": [p5(first.results[n * JUDGED_PER_ROUND:]) for n in range(ROUNDS + 1)]}
    for strategy in strategies:
        marks, current, values = Feedback(), first, [out["none"][0]]
        for _ in range(ROUNDS):
            for result in current.results[:JUDGED_PER_ROUND]:
                marks.mark(result.case_id, result.best_match.item_id, bool(relevant_of(result)))
            current = search_again(searcher, query, marks, k=len(first.results), strategy=strategy)
            values.append(p5(current.results))
        out[strategy] = values
    return out


def real_region_run(work: str) -> dict:
    """Feedback on the real images with region relevance: a result is relevant when its (unplaced) match lies in the
    query's structure in that copy; the marks stand for those matches. Plain precision@5 of the residual list."""

    from CBIRSlicerLib.retrieval.queries import roi_query

    began = time.monotonic()
    real = RealBench(work)
    searcher, copy_of, maps = real.searcher, real.copy_of, real.maps
    rows = []
    for copy, volume, queries in real.sampled_queries():
        for q in queries:
            asked = roi_query(volume, q["roi"], "axial", real.index)
            first = searcher.search(asked, k=len(copy_of))

            def inside(result, volume_name=copy.volume, label=q["label"]):
                other = copy_of.get(result.case_id)
                if other is None or other.volume != volume_name:
                    return False
                return maps[(other.volume, other.number)].at(result.best_match.spot) == label

            rows.append(region_feedback_rounds(searcher, asked, first, inside))
    return {"relevance": "match inside the query's structure (unplaced look-alike match)", "feedback": summarise_feedback(rows),
            "seconds": round(time.monotonic() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the cohorts, copies and indexes (kept; reused when present)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "reading_room.json"))
    parser.add_argument("--part", default="all", choices=["all", "phantoms", "real", "real-regions"],
                        help="run one part; the JSON keeps the others")
    parser.add_argument("--markdown", action="store_true", help="print the tables of --out as Markdown, then stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() and args.part != "all" else {}
    result.update({"machine": "2 shared cores, other work running", "model": "handcrafted", "judged_per_round": JUDGED_PER_ROUND})
    if args.part in ("all", "phantoms"):
        result["phantoms"] = [phantom_run(args.work, seed) for seed in SEEDS]
        print(json.dumps(result["phantoms"], indent=1), flush=True)
    if args.part in ("all", "real"):
        result["real"] = real_run(args.work)
        print(json.dumps(result["real"], indent=1), flush=True)
    if args.part in ("all", "real-regions"):
        result["real_regions"] = real_region_run(args.work)
        print(json.dumps(result["real_regions"], indent=1), flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
