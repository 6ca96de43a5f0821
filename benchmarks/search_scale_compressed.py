"""The compressed store at 1 M and 10 M region vectors: IVF-PQ (and OPQ + IVF-PQ) codes in RAM, float16 rows on disk.

Synthetic clustered unit vectors as in ``search_scale.py`` (512-d, one cluster per 200 vectors unless told, noise 0.6;
500 consecutive vectors form one case), generated a chunk at a time from per-chunk seeds so nothing needs them all
in memory. Phases, each its own process so its memory is its own (run them in order, or ``all``):

    build   train the codes on the first chunks, add every chunk (rows written to the rows file), save
    truth   exact search over the stored rows, a chunk at a time: top 100 of every query image (single and ROI)
    query   load the saved store as a search process would, then single-image and 16-image ROI queries with MaxSim case
            ranking, at each nprobe x re-rank factor; recall@10 of single queries and of the top-10 cases against the same
            pipeline on the exact first stage

Memory is reported as RssAnon (process memory; the memory-mapped rows are page cache, RssFile) sampled every 0.1 s:
peak and after loading. Disk: the FAISS file and the rows file per vector.

    nice -n 10 python benchmarks/search_scale_compressed.py all --n 1000000 --work /tmp/scale1m --out docs/benchmarks/search_scale_1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from CBIRSlicerLib.index import compressed
from CBIRSlicerLib.index.compressed import list_count, rows_path_of, train_size
from CBIRSlicerLib.index.faiss_store import VectorStore
from CBIRSlicerLib.retrieval import ranking

CHUNK = 100_000
TOP = 100  # hits per query image, as Searcher asks (max(100, 10 k))


class MemoryWatch:
    """Peak RssAnon of this process, sampled on a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> dict:
        """RssAnon, RssFile and VmHWM in bytes, from /proc/self/status."""
        values = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now()["RssAnon"])
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now()["RssAnon"])
        return self.peak


def centres(args) -> np.ndarray:
    return np.random.default_rng(args.seed).standard_normal((args.clusters, args.dim)).astype(np.float32)


def chunk_vectors(args, middle: np.ndarray, number: int) -> np.ndarray:
    """The ``number``-th chunk of the synthetic vectors (the same on every call)."""
    rng = np.random.default_rng([args.seed, number])
    count = min(CHUNK, args.n - number * CHUNK)
    out = middle[rng.integers(0, len(middle), count)] + 0.6 * rng.standard_normal((count, args.dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def paths(args) -> dict:
    noise = "" if args.noise == "per-dim" else f"-{args.noise}"
    tag = f"{args.variant}-{args.n}x{args.dim}" + (f"-pq{args.pq_dims}" if args.pq_dims else "")
    return {"faiss": os.path.join(args.work, f"{tag}.faiss"), "rows": rows_path_of(os.path.join(args.work, f"{tag}.faiss")),
            "build": os.path.join(args.work, f"{tag}.build.json"), "queries": os.path.join(args.work, f"queries-{args.n}{noise}.npz"),
            "truth": os.path.join(args.work, f"truth-{args.n}{noise}.npz"), "query": os.path.join(args.work, f"{tag}{noise}.query.json")}


def build(args) -> None:
    watch = MemoryWatch()
    where = paths(args)
    middle = centres(args)
    began = time.perf_counter()
    chunks = (args.n + CHUNK - 1) // CHUNK
    wanted = train_size(args.n)
    sample = np.concatenate([chunk_vectors(args, middle, c) for c in range(min(chunks, (wanted + CHUNK - 1) // CHUNK))])
    sample = sample[:wanted]  # the chunks are random draws, so their first vectors are an even sample
    store = VectorStore.create(args.dim, "ivfpq", where["rows"] + ".building", sample, opq=args.variant == "opq-ivfpq",
                               lists=list_count(args.n))
    del sample
    trained = time.perf_counter() - began
    for number in range(chunks):
        vectors = chunk_vectors(args, middle, number)
        store.add(vectors, np.arange(number * CHUNK, number * CHUNK + len(vectors), dtype=np.int64))
        if number % 10 == 0:
            print(f"  {args.variant}: {number + 1}/{chunks} chunks, {time.perf_counter() - began:.0f} s", flush=True)
    store.save(where["faiss"])
    seconds = time.perf_counter() - began
    peak = watch.stop()
    result = {"variant": args.variant, "pq_dims": compressed.PQ_DIMS_PER_CODE, "pq_bits": compressed.PQ_BITS,
              "vectors": args.n, "dim": args.dim, "clusters": args.clusters, "lists": list_count(args.n),
              "train_s": round(trained, 1), "build_s": round(seconds, 1), "build_peak_rss_anon_mb": round(peak / 2**20),
              "faiss_bytes": os.path.getsize(where["faiss"]), "rows_bytes": os.path.getsize(where["rows"]),
              "disk_bytes_per_vector": round((os.path.getsize(where["faiss"]) + os.path.getsize(where["rows"])) / args.n, 1)}
    print(json.dumps(result), flush=True)
    with open(where["build"], "w") as handle:
        json.dump(result, handle)


# Query noise. 'per-dim' (the first runs, as search_scale.py): 0.1 and 0.05 per dimension, noise vectors of norm 2.3 and
# 1.1 against a unit vector, so an ROI image lies at cosine ~0.27 from its stored vector and, at 10 M, about 40 % of its
# exact top-100 are unrelated vectors its noise happens to align with. 'relative': noise of norm 0.5 (a single query at
# cosine ~0.89 from its stored vector, as another patient's region) and 0.25 (an ROI's images at ~0.97 from each other,
# as neighbouring slices), so the exact neighbours are the query's cluster, as for a real ROI.
NOISE = {"per-dim": (0.1, 0.05), "relative": (0.5 / np.sqrt(512), 0.25 / np.sqrt(512))}


def make_queries(args, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single queries (stored vectors plus noise) and 16-image ROI batches around the first ``roi_queries`` of them."""
    single_noise, image_noise = NOISE[args.noise]
    scale = np.sqrt(512 / args.dim)  # the same norms for another dimension
    rng = np.random.default_rng(1)
    picked = np.sort(rng.choice(args.n, args.queries, replace=False))
    singles = np.asarray(rows[picked], np.float32) + single_noise * scale * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    singles = (singles / np.linalg.norm(singles, axis=1, keepdims=True)).astype(np.float32)
    batches = []
    for s in range(args.roi_queries):
        near = np.random.default_rng(1000 + s)
        batch = singles[s][None, :] + image_noise * scale * near.standard_normal((16, args.dim)).astype(np.float32)
        batches.append(batch / np.linalg.norm(batch, axis=1, keepdims=True))
    return singles, np.stack(batches).astype(np.float32)


def truth(args) -> None:
    """Exact top-100 of every query image over the stored (float16) rows, a chunk at a time."""
    watch = MemoryWatch()
    where = paths(args)
    rows = np.memmap(where["rows"], dtype="<f2", mode="r").reshape(-1, args.dim)[:args.n]
    singles, batches = make_queries(args, rows)
    every = np.concatenate([singles, batches.reshape(-1, args.dim)])
    best_scores = np.full((len(every), TOP), -np.inf, np.float32)
    best_ids = np.full((len(every), TOP), -1, np.int64)
    began = time.perf_counter()
    for start in range(0, args.n, 4 * CHUNK):
        block = np.asarray(rows[start:start + 4 * CHUNK], np.float32)
        scores = every @ block.T
        top = np.argpartition(-scores, TOP, axis=1)[:, :TOP]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :TOP]
        best_scores, best_ids = np.take_along_axis(merged_scores, keep, axis=1), np.take_along_axis(merged_ids, keep, axis=1)
    seconds = time.perf_counter() - began
    np.savez(where["truth"], scores=best_scores, ids=best_ids)
    np.savez(where["queries"], singles=singles, batches=batches)
    peak = watch.stop()
    print(json.dumps({"truth_s": round(seconds, 1), "exact_ms_per_query_image": round(1000 * seconds / len(every), 1),
                      "truth_peak_rss_anon_mb": round(peak / 2**20)}), flush=True)


def rank_cases(batch: np.ndarray, ids: np.ndarray, scores: np.ndarray, vectors_of, items_per_case: int, k: int = 10) -> list[int]:
    """What Searcher does after the first stage (minus SQLite): vote, MaxSim over the candidate cases' items, top k."""
    case_of = lambda hit: np.where(hit >= 0, hit // items_per_case, -1)
    candidates = ranking.candidate_cases(case_of(ids), scores, np.arange(int(ids.max()) // items_per_case + 2), limit=max(3 * k, 30))
    blocks = [vectors_of(np.arange(case * items_per_case, (case + 1) * items_per_case, dtype=np.int64)) for case in candidates]
    results = []
    for (case, votes), similarity in zip(candidates.items(), ranking.similarities(batch, blocks)):
        scored = ranking.score_case(similarity, "maxsim", votes)
        scored.case_row = case
        results.append(scored)
    return [r.case_row for r in ranking.rank(results)[:k]]


def query(args) -> None:
    import faiss

    where = paths(args)
    before = MemoryWatch.now()
    watch = MemoryWatch()
    began = time.perf_counter()
    store = VectorStore.load(where["faiss"], "ivfpq", args.dim)
    load_s = time.perf_counter() - began
    loaded = MemoryWatch.now()
    saved = np.load(where["queries"])
    singles, batches = saved["singles"], saved["batches"]
    exact = np.load(where["truth"])
    exact_ids, exact_scores = exact["ids"], exact["scores"]
    per_case = args.items_per_case
    exact_tops = []
    for s, batch in enumerate(batches):
        rows = slice(args.queries + 16 * s, args.queries + 16 * (s + 1))
        exact_tops.append(rank_cases(batch, exact_ids[rows], exact_scores[rows], store.vectors_of, per_case))
    store.vectors_of(np.arange(0, per_case))  # warm the map's first page table
    rows_out = []
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        for factor in [int(v) for v in args.rerank.split(",")]:
            store.nprobe, store.rerank_factor = nprobe, factor
            single_times, recall = [], []
            for n, vector in enumerate(singles):
                t = time.perf_counter()
                _, hit = store.search(vector[None], 10)
                single_times.append(time.perf_counter() - t)
                recall.append(len(set(hit[0]) & set(exact_ids[n, :10])) / 10)
            roi_times, agree, walks = [], [], []
            for _ in range(args.repeats):
                for s, batch in enumerate(batches):
                    t = time.perf_counter()
                    scores, ids = store.search(batch, TOP)
                    walked = time.perf_counter()
                    top = rank_cases(batch, ids, scores, store.vectors_of, per_case)
                    roi_times.append(time.perf_counter() - t)
                    walks.append(walked - t)
                    agree.append(len(set(top) & set(exact_tops[s])) / len(exact_tops[s]))
            row = {"variant": args.variant, "vectors": args.n, "nprobe": nprobe, "rerank_factor": factor,
                   "single_recall@10": round(float(np.mean(recall)), 4),
                   "single_p50_ms": round(1000 * float(np.percentile(single_times, 50)), 2),
                   "single_p95_ms": round(1000 * float(np.percentile(single_times, 95)), 2),
                   "roi16_with_ranking_p50_ms": round(1000 * float(np.percentile(roi_times, 50)), 1),
                   "roi16_with_ranking_p95_ms": round(1000 * float(np.percentile(roi_times, 95)), 1),
                   "roi16_first_stage_p50_ms": round(1000 * float(np.percentile(walks, 50)), 1),
                   "case_recall@10": round(float(np.mean(agree)), 3), "faiss_threads": faiss.omp_get_max_threads()}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    peak = watch.stop()
    after = MemoryWatch.now()
    result = {"load_s": round(load_s, 2), "rss_anon_before_load_mb": round(before["RssAnon"] / 2**20),
              "rss_anon_after_load_mb": round(loaded["RssAnon"] / 2**20),
              "ram_bytes_per_vector": round((loaded["RssAnon"] - before["RssAnon"]) / args.n, 1),
              "query_peak_rss_anon_mb": round(peak / 2**20), "rss_file_after_queries_mb": round(after["RssFile"] / 2**20),
              "vm_hwm_mb": round(after["VmHWM"] / 2**20), "rows": rows_out}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    with open(where["query"], "w") as handle:
        json.dump(result, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["build", "truth", "query", "all"])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, help="default: one per 200 vectors (5,000 at 1 M, as search_scale.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items-per-case", type=int, default=500)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--roi-queries", type=int, default=30)
    parser.add_argument("--noise", choices=sorted(NOISE), default="relative", help="query noise model (NOISE above)")
    parser.add_argument("--repeats", type=int, default=2, help="times each 16-image query is timed")
    parser.add_argument("--variants", default="ivfpq,opq-ivfpq")
    parser.add_argument("--variant", default="ivfpq", help=argparse.SUPPRESS)
    parser.add_argument("--nprobe", default="16,32,64")
    parser.add_argument("--rerank", default="2,4")
    parser.add_argument("--work", default="/tmp/scale10m")
    parser.add_argument("--pq-dims", type=int, default=0, help="dimensions per 8-bit code (default: the library's, 8)")
    parser.add_argument("--out", help="JSON of every phase's results")
    args = parser.parse_args()
    args.clusters = args.clusters or max(1, args.n // 200)
    if args.pq_dims:
        compressed.PQ_DIMS_PER_CODE = args.pq_dims  # finer codes: dim / pq_dims bytes a vector
    os.makedirs(args.work, exist_ok=True)
    if args.phase != "all":
        {"build": build, "truth": truth, "query": query}[args.phase](args)
        return
    summary = {"vectors": args.n, "dim": args.dim, "clusters": args.clusters, "items_per_case": args.items_per_case, "noise": args.noise,
               "queries": args.queries, "roi_queries": args.roi_queries, "repeats": args.repeats, "variants": []}
    base = [sys.executable, os.path.abspath(__file__)]
    common = ["--n", str(args.n), "--dim", str(args.dim), "--clusters", str(args.clusters), "--seed", str(args.seed),
              "--items-per-case", str(args.items_per_case), "--queries", str(args.queries), "--roi-queries",
              str(args.roi_queries), "--repeats", str(args.repeats), "--nprobe", args.nprobe, "--rerank", args.rerank,
              "--noise", args.noise, "--work", args.work, "--pq-dims", str(args.pq_dims)]
    for n, variant in enumerate(args.variants.split(",")):
        subprocess.run(base + ["build", "--variant", variant] + common, check=True)
        if n == 0:
            subprocess.run(base + ["truth", "--variant", variant] + common, check=True)
        subprocess.run(base + ["query", "--variant", variant] + common, check=True)
        args.variant = variant
        where = paths(args)
        with open(where["build"]) as handle:
            built = json.load(handle)
        with open(where["query"]) as handle:
            summary["variants"].append({**built, **json.load(handle)})
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as handle:
                json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
