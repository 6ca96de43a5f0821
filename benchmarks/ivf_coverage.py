"""How well an IVF partition keeps a query's neighbours together: the share of a query's exact top-10 / top-100 that lie
in the inverted lists it scans, for the coarse quantizer alone (no codes), on the clustered vectors of
``search_scale_compressed.py`` at 10 M (50,000 clusters of ~200).

The quantizer is trained as the store trains it (spherical k-means, FAISS) on the first ``--train`` vectors of the
benchmark's own chunks; 100 query clusters get 200 fresh members each and one query near a member. A cluster whose
members fall in one list is found by scanning one list; one that k-means split is spread over dozens, and only a large
share of the lists finds it (docs/benchmarks.md, "10 M again").

    python benchmarks/ivf_coverage.py --train 524288 --lists 8192
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200_000)
    parser.add_argument("--lists", type=int, default=4096)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    chunk = 100_000
    middle = np.random.default_rng(0).standard_normal((args.clusters, args.dim)).astype(np.float32)

    def vectors(number: int) -> np.ndarray:  # chunk ``number`` of search_scale_compressed.py's vectors (seed 0)
        rng = np.random.default_rng([0, number])
        out = middle[rng.integers(0, args.clusters, chunk)] + 0.6 * rng.standard_normal((chunk, args.dim), dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    sample = np.concatenate([vectors(c) for c in range((args.train + chunk - 1) // chunk)])[:args.train]
    began = time.perf_counter()
    clustering = faiss.Clustering(args.dim, args.lists)
    clustering.spherical, clustering.niter = True, args.niter
    clustering.max_points_per_centroid, clustering.min_points_per_centroid = 10**6, 1
    quantizer = faiss.IndexFlatIP(args.dim)
    clustering.train(sample, quantizer)
    trained = time.perf_counter() - began
    rng = np.random.default_rng(7)
    scanned = [n for n in (64, 128, 256, 512, 1024) if n <= args.lists]
    found = {n: ([], []) for n in scanned}
    for cluster in rng.choice(args.clusters, 100, replace=False):
        members = middle[cluster] + 0.6 * rng.standard_normal((200, args.dim), dtype=np.float32)
        members /= np.linalg.norm(members, axis=1, keepdims=True)
        query = members[0] + 0.1 * rng.standard_normal(args.dim, dtype=np.float32)
        query /= np.linalg.norm(query)
        order = np.argsort(-(members @ query))
        _, home = quantizer.search(members, 1)
        _, probed = quantizer.search(query[None], max(scanned))
        for n in scanned:
            inside = np.isin(home[:, 0], probed[0, :n])
            found[n][0].append(inside[order[:10]].mean())
            found[n][1].append(inside[order[:100]].mean())
    print(json.dumps({"train": args.train, "lists": args.lists, "niter": args.niter, "train_s": round(trained, 1),
                      "top10_in_scanned_lists": {n: round(float(np.mean(a)), 3) for n, (a, _) in found.items()},
                      "top100_in_scanned_lists": {n: round(float(np.mean(b)), 3) for n, (_, b) in found.items()}}))


if __name__ == "__main__":
    main()
