"""Nearest-neighbour search at scale: the automatically chosen index against exact search, same run.

Synthetic clustered unit vectors (default 1,000,000 x 512, 5,000 clusters) stand for slice
embeddings; every 500 consecutive vectors form one "case". Measured for exact (flat) and the
structure ``auto`` picks at that size: build time, bytes per vector on disk, recall@10 against
exact search, single-query latency p50 / p99, and a 16-image ROI-style query including MaxSim
case ranking (first stage + exact re-scoring of the candidate cases' vectors).

    python benchmarks/search_scale.py [--n 1000000] [--queries 200] [--out docs/benchmarks/search_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from CBIRSlicerLib import ranking
from CBIRSlicerLib.vectors import VectorStore, choose_kind


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


def roi_query(store: VectorStore, queries: np.ndarray, case_of: np.ndarray, items_per_case: int, k: int = 10) -> float:
    """Seconds for a 16-image query: first stage, candidate cases, MaxSim over their vectors."""
    began = time.perf_counter()
    scores, ids = store.search(queries, 100)
    lookup = {int(i): int(case_of[i]) for i in np.unique(ids[ids >= 0])}
    candidates = ranking.candidate_cases(ids, scores, lookup, limit=max(3 * k, 30))
    results = []
    for case, votes in candidates.items():
        item_ids = np.arange(case * items_per_case, (case + 1) * items_per_case, dtype=np.int64)
        results.append(ranking.score_case(queries, store.reconstruct(item_ids), item_ids, "maxsim", votes))
    ranking.rank(results)[:k]
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=5_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--items-per-case", type=int, default=500)
    parser.add_argument("--ef", default="128,256,512", help="HNSW efSearch values to measure")
    parser.add_argument("--out", default="docs/benchmarks/search_scale.json")
    args = parser.parse_args()
    import faiss

    vectors = clustered(args.n, args.dim, args.clusters, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(args.n, args.queries, replace=False)] + 0.1 * rng.standard_normal((args.queries, args.dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(args.n, dtype=np.int64)
    case_of = ids // args.items_per_case
    rows, truth = [], None
    work = tempfile.mkdtemp(prefix="cbir-scale-")
    for kind in ("flat", choose_kind(args.n)):
        began = time.perf_counter()
        store = VectorStore.create(args.dim, kind)
        for start in range(0, args.n, 100_000):
            store.add(vectors[start:start + 100_000], ids[start:start + 100_000])
        build = time.perf_counter() - began
        path = os.path.join(work, f"{kind}.faiss")
        store.save(path)
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
            batches = [queries[(np.arange(16) + 16 * s) % len(queries)] for s in range(10)]
            roi_times = [roi_query(store, batch, case_of, args.items_per_case) for batch in batches]
            row = {"index": kind, "ef_search": ef, "vectors": args.n, "dim": args.dim, "build_s": round(build, 1),
                   "bytes_per_vector": round(size / args.n, 1),
                   "recall@10": round(recall, 4), "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 3),
                   "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3),
                   "roi16_with_ranking_p50_ms": round(1000 * float(np.median(roi_times)), 1),
                   "faiss_threads": faiss.omp_get_max_threads()}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del store
    for row in rows[1:]:
        row["speedup_vs_exact"] = round(rows[0]["p50_ms"] / row["p50_ms"], 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        summary = {"clusters": args.clusters, "queries": args.queries, "items_per_case": args.items_per_case, "rows": rows}
        json.dump(summary, handle, indent=1)
    print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
