"""The folder store (FAISS + SQLite) against Milvus (milvus-lite, embedded) on the same vectors: insert, search, RAM, recall.

Synthetic clustered unit vectors (default 1,000,000 x 116, the handcrafted model's size; 5,000 clusters) in cases of
2,000 items, one case in ten 'MR' (the rest 'CT'), go into each store through the product's own writer
(``add_embedded``: catalog rows, thumbnails none, vectors, checkpoints, the whitening fitted at the end), each store
built in a child process and searched in another, so each child's peak RSS is its own. Measured per store:

* insert: wall and CPU seconds of ``add_embedded``, then of the commit (``close``: the folder's save and seal; Milvus
  flushes its segments and builds their HNSW indexes);
* one-image search: top-10 by raw inner product (efSearch 1,024 both), latency p50/p90, recall@10 against brute force;
* filtered search (modality MR: 10 % of the cases, filtered inside each store's search): latency, recall@10 against
  brute force over the allowed items;
* a 16-image ROI query through the product's search steps (first stage with the fitted transform folded in, MaxSim over
  every candidate case's items, ranking): latency, and how many of its top-10 cases agree with the same pipeline run
  exactly in numpy (case recall@10 against exact);
* peak RSS of the build and of the search process; the machine's load average before and after each phase, since the
  machine is shared (timings need a quiet re-run; CPU seconds and recall do not).

    python benchmarks/milvus_scale.py [--n 1000000] [--dim 116] [--stores folder,milvus] [--work DIR]
                                      [--out docs/benchmarks/milvus_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from search_scale import batch_around, clustered  # noqa: E402

MR_EVERY = 10  # every tenth case is 'MR': the filtered queries allow 10 % of the cases


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu() -> float:
    """CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def location(store: str, work: str) -> str:
    return os.path.join(work, "folder") if store == "folder" else f"milvus://{os.path.join(work, 'milvus.db')}"


def embedded_cases(vectors: np.ndarray, per_case: int):
    """The vectors as cases of ``per_case`` items (slices of one axis, 2 mm apart), one in MR_EVERY 'MR'."""
    from CBIRSlicerLib.index.catalog import CaseRecord, ItemRecord
    from CBIRSlicerLib.index.writer import EmbeddedCase

    for case in range(len(vectors) // per_case):
        record = CaseRecord(case_id=f"c{case:06d}", source=f"/synthetic/case{case:06d}.nii.gz", name=f"case{case:06d}",
                            modality="MR" if case % MR_EVERY == 0 else "CT", body_part="ABDOMEN", shape=[64, 64, per_case],
                            spacing=[1.0, 1.0, 2.0], ijk_to_ras=np.eye(4).tolist(), status="pending")
        items = [ItemRecord("slice", "axial", n, n, (0.0, 0.0, 2.0 * n), (0, 0, 64, 64), (-32.0, -32.0, 2.0 * n),
                            (32.0, 32.0, 2.0 * n), 64.0) for n in range(per_case)]
        yield EmbeddedCase(record, items, np.asarray(vectors[case * per_case:(case + 1) * per_case], np.float32))


def child_build(args) -> dict:
    """Build one store from the vectors (in this child process)."""
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.index.location import create_index
    from CBIRSlicerLib.models.registry import create_embedder

    vectors = np.load(os.path.join(args.work, "vectors.npy"), mmap_mode="r")
    where = location(args.child, args.work)
    before, wall, began = load(), time.perf_counter(), cpu()
    index = create_index(where, create_embedder("handcrafted"), IndexSettings(axes=["axial"]), args.index_type)
    report = index.add_embedded(embedded_cases(vectors, args.items_per_case))
    inserted_wall, inserted_cpu = time.perf_counter() - wall, cpu() - began
    index.close()
    return {"store": args.child, "vectors": report.vectors, "insert_s": round(inserted_wall, 1), "insert_cpu_s": round(inserted_cpu, 1),
            "commit_s": round(time.perf_counter() - wall - inserted_wall, 1), "commit_cpu_s": round(cpu() - began - inserted_cpu, 1),
            "inserted_per_s": round(report.vectors / inserted_wall), "build_peak_rss_mb": peak_rss_mb(),
            "load_before": before, "load_after": load()}


def child_search(args) -> dict:
    """Open one store for reading and run every query (in this child process)."""
    from CBIRSlicerLib.index.location import open_index
    from CBIRSlicerLib.retrieval import ranking
    from CBIRSlicerLib.retrieval.search import Searcher, SearchScope

    queries = np.load(os.path.join(args.work, "queries.npy"))
    batches = np.load(os.path.join(args.work, "batches.npy"))
    before, began = load(), time.perf_counter()
    index = open_index(location(args.child, args.work))
    opened = time.perf_counter() - began
    store = index.store
    out = {"store": args.child, "index_type": store.kind, "open_s": round(opened, 2), "load_before": before}

    def timed(call):
        began = time.perf_counter()
        found = call()
        return time.perf_counter() - began, found

    single = [timed(lambda q=q: store.search(q[None], 10, ef_search=1024)[1][0]) for q in queries]
    out["single_ms"] = [round(1000 * t, 2) for t, _ in single]
    out["single_ids"] = [ids.tolist() for _, ids in single]
    allowed = index.allowed_items({"modality": "MR"})
    filtered = [timed(lambda q=q: store.search(q[None], 10, allowed=allowed, ef_search=1024)[1][0]) for q in queries]
    out["filtered_ms"] = [round(1000 * t, 2) for t, _ in filtered]
    out["filtered_ids"] = [ids.tolist() for _, ids in filtered]
    searcher = Searcher(index, model="handcrafted")
    scope = SearchScope(np.zeros(0, np.int64))
    tops, times = [], []
    for batch in batches:
        began = time.perf_counter()
        candidates = searcher.first_stage(batch, scope, 10, transform=index.transform)
        compared = batch if index.transform is None else index.transform.apply(batch)
        scored = searcher.score_cases(compared, candidates, scope, "maxsim", None, index.transform)
        top = [index.catalog.case_by_row(s.case_row).case_id for s in ranking.rank(scored.scores)[:10]]
        times.append(time.perf_counter() - began)
        tops.append(top)
    out["roi16_ms"] = [round(1000 * t, 1) for t in times]
    out["roi16_top10"] = tops
    out["transform"] = {k: v for k, v in (index.manifest.get("transform") or {}).items() if k in ("kind", "checksum", "fitted_on")}
    out["search_peak_rss_mb"] = peak_rss_mb()
    out["load_after"] = load()
    index.close()
    return out


def exact_answers(vectors: np.ndarray, queries: np.ndarray, batches: np.ndarray, per_case: int, transform) -> dict:
    """Brute force: each query's top-10 ids (raw inner product, all and MR only) and each ROI query's top-10 cases
    (the product's pipeline with an exact first stage)."""
    from CBIRSlicerLib.retrieval import ranking

    n = len(vectors)
    ids = np.arange(1, n + 1, dtype=np.int64)  # the stores' item ids: 1, 2, ... in case order
    case_of = (ids - 1) // per_case
    mr = (case_of % MR_EVERY) == 0
    single, filtered = [], []
    for q in queries:
        scores = np.empty(n, np.float32)
        for start in range(0, n, 200_000):
            scores[start:start + 200_000] = np.asarray(vectors[start:start + 200_000], np.float32) @ q
        single.append(ids[np.argsort(-scores)[:10]].tolist())
        masked = np.where(mr, scores, -np.inf)
        filtered.append(ids[np.argsort(-masked)[:10]].tolist())
    transformed = np.empty((n, vectors.shape[1]), np.float32)
    for start in range(0, n, 200_000):
        block = np.asarray(vectors[start:start + 200_000], np.float32)
        transformed[start:start + 200_000] = transform.apply(block) if transform is not None else block
    tops = []
    for batch in batches:
        compared = transform.apply(batch) if transform is not None else batch
        similarity = compared @ transformed.T
        hits = np.argsort(-similarity, axis=1)[:, :100]
        candidates = ranking.candidate_cases(ids[hits], np.take_along_axis(similarity, hits, 1),
                                             {int(i): int((i - 1) // per_case) for i in np.unique(ids[hits])}, limit=30)
        blocks = [transformed[case * per_case:(case + 1) * per_case] for case in candidates]
        scored = []
        for (case, votes), sim in zip(candidates.items(), ranking.similarities(compared, blocks)):
            score = ranking.score_case(sim, "maxsim", votes)
            score.case_row = case
            scored.append(score)
        tops.append([f"c{s.case_row:06d}" for s in ranking.rank(scored)[:10]])
    return {"single": single, "filtered": filtered, "roi16": tops}


def summary(result: dict, exact: dict) -> dict:
    """Latency percentiles and agreement with the exact answers."""
    def recall(found, truth):
        return round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])), 4)

    return {"store": result["store"], "index_type": result["index_type"], "open_s": result["open_s"],
            "single_p50_ms": round(float(np.median(result["single_ms"])), 2),
            "single_p90_ms": round(float(np.percentile(result["single_ms"], 90)), 2),
            "single_recall@10": recall(result["single_ids"], exact["single"]),
            "filtered_p50_ms": round(float(np.median(result["filtered_ms"])), 2),
            "filtered_recall@10": recall(result["filtered_ids"], exact["filtered"]),
            "roi16_p50_ms": round(float(np.median(result["roi16_ms"])), 1),
            "roi16_p90_ms": round(float(np.percentile(result["roi16_ms"], 90)), 1),
            "roi16_case_recall@10": recall(result["roi16_top10"], exact["roi16"]),
            "search_peak_rss_mb": result["search_peak_rss_mb"], "transform": result["transform"],
            "load_before": result["load_before"], "load_after": result["load_after"]}


def run_child(store: str, phase: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", store, "--phase", phase, "--work", args.work,
               "--items-per-case", str(args.items_per_case), "--index-type", args.index_type]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{store} {phase} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result[f"{phase}_process_wall_s"] = round(time.perf_counter() - began, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=116)
    parser.add_argument("--clusters", type=int, default=5_000)
    parser.add_argument("--items-per-case", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--roi-queries", type=int, default=20)
    parser.add_argument("--stores", default="folder,milvus")
    parser.add_argument("--index-type", default="hnsw")
    parser.add_argument("--work", help="a folder for the vectors and the stores (default: a temporary one, removed)")
    parser.add_argument("--out", default="docs/benchmarks/milvus_scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_build(args) if args.phase == "build" else child_search(args)))
        return
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="cbir-milvus-scale-")
    os.makedirs(args.work, exist_ok=True)
    n = args.n - args.n % args.items_per_case
    vectors = clustered(n, args.dim, args.clusters, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(n, args.queries, replace=False)] + 0.1 * rng.standard_normal((args.queries, args.dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    batches = np.stack([batch_around(queries[s], args.dim, seed=s) for s in range(args.roi_queries)])
    np.save(os.path.join(args.work, "vectors.npy"), vectors)
    np.save(os.path.join(args.work, "queries.npy"), queries)
    np.save(os.path.join(args.work, "batches.npy"), batches)
    del vectors
    report = {"vectors": n, "dim": args.dim, "clusters": args.clusters, "items_per_case": args.items_per_case,
              "queries": args.queries, "roi_queries": args.roi_queries, "index_type": args.index_type, "cpus": os.cpu_count(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stores": {}}
    for store in args.stores.split(","):
        shutil.rmtree(os.path.join(args.work, "folder" if store == "folder" else "milvus.db"), ignore_errors=True)
        built = run_child(store, "build", args)
        print(json.dumps(built), flush=True)
        searched = run_child(store, "search", args)
        report["stores"][store] = {"build": built, "search": searched}
    from CBIRSlicerLib.index import vector_transform
    from CBIRSlicerLib.index.location import open_index

    first = next(iter(report["stores"]))
    index = open_index(location(first, args.work))
    transform = index.transform
    index.close()
    exact = exact_answers(np.load(os.path.join(args.work, "vectors.npy"), mmap_mode="r"), queries, batches,
                          args.items_per_case, transform)
    for store, measured in report["stores"].items():
        measured["search"] = summary(measured["search"], exact)
        print(json.dumps({store: measured}), flush=True)
    report["same_transform"] = len({m["search"]["transform"].get("checksum") for m in report["stores"].values()}) == 1
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    del vector_transform
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    if not keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
