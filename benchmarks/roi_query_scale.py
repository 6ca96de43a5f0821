"""A 30-mm ROI query on the real head CT, end to end through ``Searcher``, against an index of >= 1 M region vectors.

    python benchmarks/roi_query_scale.py --work /tmp/cbir-roi1m [--phase build|query|all] [--vectors 1000000]
                                         [--queries 6] [--repeats 2] [--out docs/benchmarks/roi_query_scale.json]

Build (once into ``--work``, resumable: rerun the same command after a kill): a random-weight open_clip ViT-B/16
(BiomedCLIP's image tower's shape; written to ``WORK/vit`` and loaded through ``local-dir:`` as a real checkpoint is)
indexes the real head CT of ``../shared/data`` densely (``Index.add_sources``, region strategy ``dense``), then synthetic
distractor cases are added through the index's own writer (``Index.add_embedded``) until the index holds ``--vectors``:
500 region vectors a case, 512-d unit vectors around random centres as in ``search_scale.py`` (noise 0.6, one centre per
200 vectors), with item rows laid out as a dense index's (20 axial slices a case, each a whole-slice item and 24 tiles
of 32 mm, RAS centres from the case's geometry) and case rows of CT of four body regions, so the scope, the catalog
look-ups, the modality / body-region prior and MaxSim do the work they do on a real index. Then ``--head-like`` cases
of each of two noise levels: 500 of the head CT's own items (rows and vectors) each, the vectors moved by noise of RMS
0.25-0.5 ('headlike') or 0.05-0.2 ('headnear') of their length. Without them a noisy copy's query finds only the head
CT's own items in its first stage (its top 100 hits per image), so the ranking had one case to score; with them it
scores 30, as on an index of similar patients, and the real case has near rivals. The store is whatever the index
chooses at that size (``auto``: HNSW at 1.2 M x 512); the whitening transform is refitted as the index grows.

Query: a pseudo-patient copy of the head CT (``pseudo_patients.py``: rotated, deformed, cropped, resampled, noisy), so the
query volume is not the indexed case; ``--queries`` 30-mm ROIs around known head points (mapped into the copy), each
searched ``--repeats`` times after one warm-up through ``roi_query`` + ``Searcher.search`` (k=10), timed in steps: query
preparation (slices, window, own-case look-ups), query embedding (the dense path, windows over the box only, at most
``search.DENSE_QUERY_PASSES`` forward passes), scope, first stage (store + catalog), ranking (the candidates' items
and vectors, MaxSim, prior, locating and packaging). Wall and CPU seconds / 2 (the process's CPU time over 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("CBIR_CHECKPOINT_SECONDS", "100000")  # add_embedded checkpoints at the end of each chunk instead

import numpy as np

from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index.catalog import CaseRecord, ItemRecord
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.index.writer import EmbeddedCase
from CBIRSlicerLib.models.base import available_cores
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval import search

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "Testing"))
sys.path.insert(0, HERE)
import pseudo_patients  # noqa: E402
import random_checkpoints  # noqa: E402
import real_data  # noqa: E402

ITEMS_PER_CASE = 500  # 20 slices x (1 whole slice + 24 tiles)
CASES_PER_CHUNK = 200  # 100,000 vectors generated, stored and checkpointed at a time
NOISE = 0.6
VECTORS_PER_CENTRE = 200
REGIONS = ("HEAD", "CHEST", "ABDOMEN", "PELVIS")
# Head points (RAS mm from the head CT's centre) the ROIs are centred on, in the copy where they moved to.
OFFSETS = [(0.0, 0.0, 0.0), (25.0, 15.0, 5.0), (-30.0, -20.0, -5.0), (40.0, -35.0, 0.0), (-15.0, 45.0, 10.0),
           (10.0, -50.0, -10.0), (-45.0, 5.0, 5.0), (30.0, 40.0, -5.0)]


def model_folder(work: str) -> str:
    """The random-weight ViT-B/16 checkpoint (seeded, so a resumed build loads the same model)."""
    folder = os.path.join(work, "vit")
    if not os.path.isfile(os.path.join(folder, "open_clip_pytorch_model.bin")):
        random_checkpoints.write_open_clip_folder(folder, random_checkpoints.VIT_B16_CLIP)
    return folder


def distractor_case(number: int, vectors: np.ndarray) -> EmbeddedCase:
    """One synthetic CT case: its catalog row and 500 item rows laid out as a dense index lays out its items."""
    rng = np.random.default_rng(10_000 + number)
    pixel = float(rng.uniform(0.6, 0.9))
    thickness = float(rng.choice([1.0, 1.25, 2.5, 5.0]))
    slices = int(rng.integers(80, 400))
    shape = [512, 512, slices]
    origin = -np.array([256 * pixel, 256 * pixel, slices * thickness / 2])
    matrix = np.diag([pixel, pixel, thickness, 1.0])
    matrix[:3, 3] = origin
    record = CaseRecord(case_id=f"synthetic{number:07d}", source=f"/synthetic/case{number:07d}.nii.gz", name=f"case{number:07d}",
                        modality="CT", body_part=REGIONS[number % len(REGIONS)], shape=shape,
                        spacing=[pixel, pixel, thickness], ijk_to_ras=matrix.tolist(),
                        metadata={"synthetic": True, "window": {"centre": 40.0, "width": 400.0}})
    items = []
    tile = 32.0 / pixel
    for k in np.linspace(0, slices - 1, 20).round().astype(int):
        z = float(origin[2] + k * thickness)
        side = 512 * pixel
        items.append(ItemRecord("slice", "axial", int(k), int(k), (0.0, 0.0, z), (0, 0, 512, 512),
                                (float(origin[0]), float(origin[1]), z), (float(origin[0] + side), float(origin[1] + side), z), side))
        for t in range(24):
            row, col = divmod(t, 6)
            r0, c0 = int(64 + row * tile), int(32 + col * tile)
            box = (r0, c0, int(r0 + tile), int(c0 + tile))
            low = (float(origin[0] + c0 * pixel), float(origin[1] + r0 * pixel), z)
            high = (low[0] + 32.0, low[1] + 32.0, z)
            items.append(ItemRecord("tile", "axial", int(k), int(k), ((low[0] + high[0]) / 2, (low[1] + high[1]) / 2, z),
                                    box, low, high, 32.0))
    return EmbeddedCase(record, items, vectors)


def chunk_vectors(chunk: int, count: int, dim: int) -> np.ndarray:
    """``count`` clustered unit vectors of one chunk (its own seed; the centres are shared by all chunks)."""
    centres = np.random.default_rng(0).standard_normal((5_000, dim)).astype(np.float32)
    rng = np.random.default_rng(1_000 + chunk)
    out = centres[rng.integers(0, len(centres), count)] + NOISE * rng.standard_normal((count, dim)).astype(np.float32)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def build(work: str, target: int, head_path: str, head_like: int) -> dict:
    """The index: the real head CT embedded densely, then distractor cases until it holds ``target`` vectors (resumable)."""
    folder = os.path.join(work, "index")
    model = "local-dir:" + model_folder(work)
    embedder = create_embedder(model, device="cpu")
    log = {}
    began = time.perf_counter()
    if not os.path.isfile(os.path.join(folder, "manifest.json")):
        index = Index.create(folder, embedder, IndexSettings(region_strategy="dense"))
    else:
        index = Index.open(folder, writable=True)
    with index:
        cpu = time.process_time()
        report = index.add_sources([head_path], embedder)
        if report.skipped:
            raise RuntimeError(f"{head_path} was not indexed: {report.skipped}")
        if report.added:
            log["head_ct"] = {"seconds": round(time.perf_counter() - began, 1), "vectors": report.vectors,
                              "cpu_s_per_core": round((time.process_time() - cpu) / available_cores(), 1)}
            print("head CT indexed", json.dumps(log["head_ct"]), flush=True)
        head_vectors = len(index.catalog.item_ids([index.catalog.cases()[0].row]))
        cases = math.ceil(max(0, target - head_vectors) / ITEMS_PER_CASE)
        chunks = math.ceil(cases / CASES_PER_CHUNK)
        for chunk in range(chunks):
            numbers = range(chunk * CASES_PER_CHUNK, min(cases, (chunk + 1) * CASES_PER_CHUNK))
            if index.catalog.case_by_id(f"synthetic{numbers[-1]:07d}") is not None:
                continue  # stored by an earlier run (each chunk is committed whole)
            t0, c0 = time.perf_counter(), time.process_time()
            vectors = chunk_vectors(chunk, len(numbers) * ITEMS_PER_CASE, embedder.dim)
            added = index.add_embedded(distractor_case(n, vectors[i * ITEMS_PER_CASE:(i + 1) * ITEMS_PER_CASE])
                                       for i, n in enumerate(numbers))
            print(f"chunk {chunk + 1}/{chunks}: {len(added.added)} cases, store {index.store.kind} {index.store.count} vectors, "
                  f"{time.perf_counter() - t0:.1f} s wall, {(time.process_time() - c0) / available_cores():.1f} CPU s / 2",
                  flush=True)
        add_head_like(index, head_like, "headlike", (0.25, 0.5), 50_000)  # cosine 0.89-0.97 to the items they come from
        add_head_like(index, head_like, "headnear", (0.05, 0.2), 60_000)  # cosine 0.98-0.999: they compete with the real case
    log["build_seconds_this_run"] = round(time.perf_counter() - began, 1)
    return log


def add_head_like(index: Index, count: int, prefix: str, noise_rms: tuple[float, float], seed: int) -> None:
    """``count`` head-like distractor cases: each 500 of the head CT's own items (rows and vectors), the vectors moved by
    noise (RMS ``noise_rms`` of their length, drawn per case), so the first stage finds many cases and the ranking scores
    each of them exactly, as on an index of similar patients; the real case should still come first."""
    if not count or index.catalog.case_by_id(f"{prefix}{count - 1:07d}") is not None:
        return
    head = index.catalog.cases()[0]
    items = index.catalog.items_of_cases([head.row])[head.row]
    vectors = index.store.reconstruct(np.array([i.id for i in items]))
    cases = []
    for number in range(count):
        rng = np.random.default_rng(seed + number)
        chosen = np.sort(rng.choice(len(items), ITEMS_PER_CASE, replace=False))
        noise = rng.uniform(*noise_rms) * rng.standard_normal((ITEMS_PER_CASE, vectors.shape[1])) / np.sqrt(vectors.shape[1])
        moved = vectors[chosen] + noise.astype(np.float32)
        record = CaseRecord(case_id=f"{prefix}{number:07d}", source=f"/synthetic/{prefix}{number:07d}.nii.gz",
                            name=f"{prefix}{number:07d}", modality="CT", body_part=head.body_part, shape=head.shape,
                            spacing=head.spacing, ijk_to_ras=head.ijk_to_ras, metadata={"synthetic": True})
        cases.append(EmbeddedCase(record, [items[n] for n in chosen], moved / np.linalg.norm(moved, axis=1, keepdims=True)))
    t0 = time.perf_counter()
    index.add_embedded(cases)
    print(f"{count} {prefix} cases: store {index.store.kind} {index.store.count} vectors, {time.perf_counter() - t0:.1f} s", flush=True)


def query_copy(work: str, head_path: str) -> tuple[str, object]:
    """A pseudo-patient copy of the head CT (written once) and its transform."""
    folder = os.path.join(work, "query")
    stem = os.path.join(folder, "head_copy_00")
    if not os.path.isfile(stem + ".nii.gz"):
        pseudo_patients.write_copies(head_path, None, "CT", folder, 1, seed=7, name="head_copy")
    return stem + ".nii.gz", pseudo_patients.PseudoPatient.load(stem)


class Timed:
    """Wraps a Searcher's steps with timers (the steps run as they are)."""

    STEPS = ("query_vectors", "scope", "first_stage", "score_cases", "same_kind_first", "locate", "package")

    def __init__(self, searcher):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # the process's CPU seconds over the cores, per step
        for name in self.STEPS:
            setattr(searcher, name, self._wrap(name, getattr(searcher, name)))

    def _wrap(self, name, method):
        def timed(*args, **kwargs):
            began, cpu = time.perf_counter(), time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
                self.cpu[name] = self.cpu.get(name, 0.0) + (time.process_time() - cpu) / available_cores()
        return timed


def stat(runs: list[dict], key: str) -> dict:
    """p50 and max of one figure over timed runs."""
    values = [r[key] for r in runs]
    return {"p50": round(float(np.median(values)), 3), "max": round(float(np.max(values)), 3)}


def run_queries(work: str, head_path: str, queries: int, repeats: int, budgets: list[int]) -> dict:
    """Time ROI queries on the copy end to end, at each budget of forward passes; check the head CT comes first."""
    default = search.DENSE_QUERY_PASSES
    folder = os.path.join(work, "index")
    embedder = create_embedder("local-dir:" + model_folder(work), device="cpu")
    passes = []
    original = embedder.embed_dense

    def counting(*args, **kwargs):
        grids = original(*args, **kwargs)
        passes.append(sum(g.passes for g in grids))
        return grids

    embedder.embed_dense = counting
    copy_path, patient = query_copy(work, head_path)
    volume = read_volume(copy_path)
    head = read_volume(head_path)
    t0 = time.perf_counter()
    index = Index.open(folder)
    opened = time.perf_counter() - t0
    info = index.info()
    head_case = index.catalog.cases()[0]  # the real head CT: indexed first
    searcher = search.Searcher(index, embedder=embedder)
    by_budget = {}
    for budget in budgets:
        search.DENSE_QUERY_PASSES = budget  # read at each query (embedding_request)
        rows = []
        for offset in OFFSETS[:queries]:
            centre = patient.source_to_copy(np.asarray(head.center_ras) + np.array(offset))
            roi = RoiBox(tuple(float(v) for v in centre), (30.0, 30.0, 30.0))
            runs = []
            for _ in range(repeats + 1):
                timer = Timed(searcher)
                passes.clear()
                began, cpu = time.perf_counter(), time.process_time()
                query = queries.roi_query(volume, roi, "axial", index)
                prepared, prepared_cpu = time.perf_counter(), time.process_time()
                roi_slices = len(query.images)
                answer = searcher.search(query, k=10)
                wall = time.perf_counter() - began
                cpu_total = (time.process_time() - cpu) / available_cores()
                for name in Timed.STEPS:  # the instance's wrappers off again
                    del searcher.__dict__[name]
                steps, steps_cpu = timer.seconds, timer.cpu
                early = ("query_vectors", "scope", "first_stage")
                ranking = wall - (prepared - began) - sum(steps[n] for n in early)
                ranking_cpu = cpu_total - (prepared_cpu - cpu) / available_cores() - sum(steps_cpu[n] for n in early)
                ids = [r.case_id for r in answer.results]
                runs.append({"wall_s": round(wall, 3), "cpu_s_per_core": round(cpu_total, 3),
                             "prepare_s": round(prepared - began, 3), "prepare_cpu": round((prepared_cpu - cpu) / available_cores(), 3),
                             "embed_s": round(steps["query_vectors"], 3), "embed_cpu": round(steps_cpu["query_vectors"], 3),
                             "scope_s": round(steps["scope"], 3), "scope_cpu": round(steps_cpu["scope"], 3),
                             "first_stage_s": round(steps["first_stage"], 3), "first_stage_cpu": round(steps_cpu["first_stage"], 3),
                             "ranking_s": round(ranking, 3), "ranking_cpu": round(ranking_cpu, 3),
                             "score_cases_s": round(steps["score_cases"], 3), "score_cases_cpu": round(steps_cpu["score_cases"], 3),
                             "forward_passes": int(sum(passes)), "query_slices": len(query.images), "roi_slices": roi_slices,
                             "head_ct_rank": ids.index(head_case.case_id) + 1 if head_case.case_id in ids else None,
                             "scores_top3": [round(float(r.score), 4) for r in answer.results[:3]],
                             "results": len(answer.results)})
            row = {"roi_centre_ras": [round(float(v), 1) for v in centre], "head_offset_mm": list(offset), "runs": runs[1:],
                   "warm_up": runs[0]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "warm_up"}), flush=True)
        timed = [r for row in rows for r in row["runs"]]
        summary = {key: stat(timed, key) for key in ("wall_s", "cpu_s_per_core", "prepare_s", "prepare_cpu", "embed_s", "embed_cpu",
                                              "scope_s", "scope_cpu", "first_stage_s", "first_stage_cpu", "ranking_s", "ranking_cpu",
                                              "score_cases_s", "score_cases_cpu")}
        summary["forward_passes"] = sorted({r["forward_passes"] for r in timed})
        summary["query_slices"] = sorted({r["query_slices"] for r in timed})
        summary["head_ct_first"] = f"{sum(r['head_ct_rank'] == 1 for r in timed)}/{len(timed)}"
        by_budget[str(budget)] = {"summary": summary, "queries": rows}
        print(budget, json.dumps(summary), flush=True)
    search.DENSE_QUERY_PASSES = default
    return {"index": {"vectors": info["counts"]["vectors"], "cases": info["counts"]["cases"], "items": info["counts"]["items"],
                      "store": info["index_type"], "bytes": info["bytes"], "open_s": round(opened, 1),
                      "transform": (info.get("transform") or {}).get("kind")},
            "query_volume": {"path": copy_path, "shape": list(volume.shape_ijk),
                             "spacing_mm": [round(float(s), 3) for s in volume.spacing]},
            "dense_query_passes_default": default, "by_query_passes": by_budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the model, the index and the query copy (kept, reused)")
    parser.add_argument("--phase", choices=("build", "query", "all"), default="all")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="region vectors the index holds at least")
    parser.add_argument("--head-like", type=int, default=200,
                        help="head-like distractor cases of each of two noise levels (noisy copies of the head CT's items)")
    parser.add_argument("--queries", type=int, default=6, help=f"ROIs to query (at most {len(OFFSETS)})")
    parser.add_argument("--repeats", type=int, default=2, help="timed searches per ROI after one warm-up")
    parser.add_argument("--passes", default="6", help="forward-pass budgets of a query to time (search.DENSE_QUERY_PASSES: 6)")
    parser.add_argument("--out", default="docs/benchmarks/roi_query_scale.json")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    head_path = real_data.prepare(names=["head_ct"])["head_ct"].image
    results = {"command": "python " + " ".join(sys.argv), "cores": available_cores(),
               "model": "random-weight open_clip ViT-B/16 (224 px), local-dir:",
               "load_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    if args.phase in ("build", "all"):
        results["build"] = build(args.work, args.vectors, head_path, args.head_like)
    if args.phase in ("query", "all"):
        results.update(run_queries(args.work, head_path, args.queries, args.repeats, [int(v) for v in args.passes.split(",")]))
        results["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
