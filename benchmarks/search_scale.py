"""Nearest-neighbour search at scale: the automatically chosen index against exact search, same run.

Synthetic clustered unit vectors (default 1,000,000 x 512, 5,000 clusters) stand for slice
embeddings; every 500 consecutive vectors form one "case". Measured for exact (flat) and the
structure ``auto`` picks at that size: build time, bytes per vector on disk, recall@10 against
exact search, single-query latency p50 / p99, and a 16-image ROI-style query including MaxSim
case ranking (first stage + exact re-scoring of the candidate cases' vectors), with how many of its
top-10 cases agree with the same query on an exact first stage.

    python benchmarks/search_scale.py [--n 1000000] [--queries 200] [--cache DIR] [--out docs/benchmarks/search_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from CBIRSlicerLib.index.faiss_store import VectorStore, choose_kind
from CBIRSlicerLib.retrieval import ranking


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random cluster centres (spread like embeddings of similar images)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)] + 0.6 * rng.standard_normal((stop - start, dim))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def roi_query(store: VectorStore, queries: np.ndarray, case_of: np.ndarray, items_per_case: int, k: int = 10,
              ef_search: int | None = None) -> tuple[float, list[int], float]:
    """Seconds for a 16-image query (first stage, candidate cases, MaxSim over their vectors), the top-k cases, and the
    seconds of its first stage alone."""
    began = time.perf_counter()
    scores, ids = store.search(queries, 100, ef_search=ef_search)
    walked = time.perf_counter()
    candidates = ranking.candidate_cases(ids, scores, case_of, limit=max(3 * k, 30))
    results = []
    ids_of = [np.arange(case * items_per_case, (case + 1) * items_per_case, dtype=np.int64) for case in candidates]
    blocks = [store.vectors_of(item_ids) for item_ids in ids_of]
    for (case, votes), similarity in zip(candidates.items(), ranking.similarities(queries, blocks)):
        scored = ranking.score_case(similarity, "maxsim", votes)
        scored.case_row = case
        results.append(scored)
    top = [r.case_row for r in ranking.rank(results)[:k]]
    return time.perf_counter() - began, top, walked - began


def batch_around(centre: np.ndarray, dim: int, seed: int, count: int = 16) -> np.ndarray:
    """``count`` unit vectors near one query, standing for the neighbouring slices of an ROI."""
    rng = np.random.default_rng(1000 + seed)
    batch = centre[None, :] + 0.05 * rng.standard_normal((count, dim)).astype(np.float32)
    return (batch / np.linalg.norm(batch, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=5_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--items-per-case", type=int, default=500)
    parser.add_argument("--ef", default="128,512,1024,2048", help="HNSW efSearch values to measure for single queries")
    parser.add_argument("--roi-ef", default="128,256,512,1024", help="HNSW efSearch values per image for 16-image queries")
    parser.add_argument("--roi-queries", type=int, default=30, help="16-image queries to time")
    parser.add_argument("--out", default="docs/benchmarks/search_scale.json")
    parser.add_argument("--cache", help="keep the built indexes in this folder and reuse them on the next run (build time kept)")
    args = parser.parse_args()
    import faiss

    vectors = clustered(args.n, args.dim, args.clusters, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(args.n, args.queries, replace=False)] + 0.1 * rng.standard_normal((args.queries, args.dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(args.n, dtype=np.int64)
    case_of = ids // args.items_per_case
    rows, roi_rows, truth, exact_tops = [], [], None, None
    work = args.cache or tempfile.mkdtemp(prefix="cbir-scale-")
    os.makedirs(work, exist_ok=True)
    for kind in ("flat", choose_kind(args.n, dim=args.dim)):
        path = os.path.join(work, f"{kind}-{args.n}x{args.dim}.faiss")
        if args.cache and os.path.exists(path) and os.path.exists(path + ".json"):
            store = VectorStore.load(path, kind, args.dim)  # same vectors (fixed seed); build time from the run that built it
            with open(path + ".json") as handle:
                build = json.load(handle)["build_s"]
        else:
            began = time.perf_counter()
            store = VectorStore.create(args.dim, kind)
            for start in range(0, args.n, 100_000):
                store.add(vectors[start:start + 100_000], ids[start:start + 100_000])
            build = time.perf_counter() - began
            store.save(path)
            with open(path + ".json", "w") as handle:
                json.dump({"build_s": build}, handle)
        size = os.path.getsize(path)
        for ef in [int(e) for e in args.ef.split(",")] if kind == "hnsw" else [None]:
            if ef is not None:
                store.ef_search = ef
            latencies = []
            found = np.zeros((args.queries, 10), np.int64)
            for n, query in enumerate(queries):
                t = time.perf_counter()
                _, hit = store.search(query[None], 10)
                latencies.append(time.perf_counter() - t)
                found[n] = hit[0]
            if truth is None:
                truth = found
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            row = {"index": kind, "ef_search": ef, "vectors": args.n, "dim": args.dim, "build_s": round(build, 1),
                   "bytes_per_vector": round(size / args.n, 1),
                   "recall@10": round(recall, 4), "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 3),
                   "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3),
                   "faiss_threads": faiss.omp_get_max_threads()}
            rows.append(row)
            print(json.dumps(row), flush=True)
        # A 16-image ROI-style query: 16 neighbouring queries, 100 hits each, MaxSim over the 30 most-voted cases.
        # Its quality measure is the top-10 cases agreeing with the same pipeline on an exact first stage.
        batches = [batch_around(queries[s], args.dim, seed=s) for s in range(args.roi_queries)]
        for ef in [int(e) for e in args.roi_ef.split(",")] if kind == "hnsw" else [None]:
            timed = [roi_query(store, batch, case_of, args.items_per_case, ef_search=ef) for batch in batches]
            if exact_tops is None:
                exact_tops = [top for _, top, _ in timed]
            agree = float(np.mean([len(set(top) & set(ref)) / len(ref) for (_, top, _), ref in zip(timed, exact_tops)]))
            times = [t for t, _, _ in timed]
            row = {"index": kind, "roi_ef_search": ef, "roi16_with_ranking_p50_ms": round(1000 * float(np.median(times)), 1),
                   "roi16_p90_ms": round(1000 * float(np.percentile(times, 90)), 1),
                   "roi16_first_stage_p50_ms": round(1000 * float(np.median([w for _, _, w in timed])), 1),
                   "roi16_top10_cases_agree_with_exact": round(agree, 3)}
            roi_rows.append(row)
            print(json.dumps(row), flush=True)
        del store
    for row in rows[1:]:
        row["speedup_vs_exact"] = round(rows[0]["p50_ms"] / row["p50_ms"], 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        summary = {"clusters": args.clusters, "queries": args.queries, "items_per_case": args.items_per_case, "rows": rows,
                   "roi_rows": roi_rows}
        json.dump(summary, handle, indent=1)
    print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
