"""Crops vs dense region vectors: forward passes per indexed slice, seconds per case, ROI query latency, on real CTs.

    python benchmarks/dense_regions.py [--model MODEL] [--volumes head_ct,abdomen_ct] [--quick] [--parts ...]
                                       [--model-batches N] [--out docs/benchmarks/dense_regions.json]

MODEL defaults to a random-weight open_clip ViT-B/16 at 224 px (the BiomedCLIP image tower's shape: same compute,
vectors that mean nothing), written to a local folder and loaded through ``local-dir:``, the path real weights take;
``--model biomedclip``, ``--model local-dir:/path`` or ``--model hf-vit:/path`` time real checkpoints the same way.
Retrieval *quality* of crops against dense needs real weights (none reachable here): ``benchmarks/roi_retrieval.py``
and ``benchmarks/real_anatomy.py`` measure it once a checkpoint is present.

Per volume: ``crops`` cuts the default items (slices, 32 mm tiles, blob crops) and embeds a sample of them to get the
model's rate, so its seconds per case are an estimate (a full run takes 20-70 minutes); ``dense`` indexes the case for
real (``Index.add_sources``: read, slice, window, embed, pool, store) with the same items pooled from one grid per
slice, and measures the throughput of that pipeline against the model alone in two ways: its CPU time against the
model's on ready windows (``pipeline_ratio_cpu``); the CPU spent while forward passes ran against the whole build's
(``pipeline_ratio_cpu_in_run``, one run, so no load change between two runs enters it); and the model's CPU against
the model's plus that of the same build with the forward pass replaced by ready tokens (``pipeline_ratio_cpu_parts``).
Then the cost of the two ways to reach 10-mm cells (windows of 224 px against one pass at a larger input with
interpolated position embeddings, timed at that input size), bf16 against fp32, and a 30-mm ROI query end to end
(embed + search + ranking) against the dense index of the head CT (the query volume is a noisy copy, so its own case
is not left out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings, volume_items
from CBIRSlicerLib.models.base import available_cores
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval.queries import roi_query
from CBIRSlicerLib.retrieval.search import Searcher

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "Testing"))
sys.path.insert(0, HERE)
import random_checkpoints  # noqa: E402
import real_data  # noqa: E402


def crops_estimate(embedder, volume, settings: IndexSettings, sample: int) -> dict:
    """Items and forward passes of the crops strategy, and its seconds per case from a timed sample of the crops."""
    began = time.perf_counter()
    made = volume_items(volume, settings)
    cut = time.perf_counter() - began
    slices = sum(item.kind == "slice" for item in made.items)
    counts = {"slices": slices, "items": len(made.items), "forward_passes": len(made.images),
              "passes_per_slice": round(len(made.images) / slices, 1), "cut_seconds": round(cut, 1)}
    if sample <= 0:
        return counts
    rng = np.random.default_rng(0)
    chosen = [made.images[n] for n in rng.choice(len(made.images), min(sample, len(made.images)), replace=False)]
    embedder.embed_images(chosen[:4], batch_size=4)  # warm-up
    began, cpu = time.perf_counter(), time.process_time()
    embedder.embed_images(chosen, batch_size=16)
    rate = len(chosen) / (time.perf_counter() - began)
    cpu_rate = len(chosen) / ((time.process_time() - cpu) / available_cores())
    return {**counts, "images_per_s": round(rate, 2),
            "images_per_cpu_s_per_core": round(cpu_rate, 2),
            "seconds_per_case_estimated": round(cut + len(made.images) / rate, 1),
            "cpu_seconds_per_core_estimated": round(cut + len(made.images) / cpu_rate, 1), "sampled_images": len(chosen)}


def dense_build(embedder, path: str, settings: IndexSettings, folder: str, model_batches: int = 2) -> dict:
    """Index one case with dense vectors for real; forward passes counted from the embedder's grids; against the model
    alone (``model_batches`` batches of 16 timed, scaled to the passes) and the rest alone (:func:`non_model_seconds`)."""
    passes, forward_cpu = [], [0.0]
    original, tokens = embedder.embed_dense, embedder._tokens

    def counting(*args, **kwargs):
        grids = original(*args, **kwargs)
        passes.extend(g.passes for g in grids)
        return grids

    def timed_tokens(pixels):  # the process's CPU while the network runs: the model's share of this very build
        began = time.process_time()
        try:
            return tokens(pixels)
        finally:
            forward_cpu[0] += time.process_time() - began

    embedder.embed_dense, embedder._tokens = counting, timed_tokens
    try:
        began, cpu = time.perf_counter(), time.process_time()
        with Index.create(folder, embedder, settings) as index:
            report = index.add_sources([path], embedder)
            items = index.info()["counts"]["items"]
        seconds = time.perf_counter() - began
        cpu = (time.process_time() - cpu) / available_cores()
    finally:
        del embedder.embed_dense, embedder._tokens
    forward = forward_cpu[0] / available_cores()
    if report.skipped:
        raise RuntimeError(f"{path} was not indexed: {report.skipped}")
    model_only = model_only_seconds(embedder, sum(passes), batches=model_batches)
    rest = non_model_seconds(embedder, path, settings, folder + "-stand-in")
    return {"slices": len(passes), "items": items, "forward_passes": int(sum(passes)),
            "passes_per_slice": round(sum(passes) / max(1, len(passes)), 2), "seconds_per_case": round(seconds, 1),
            "cpu_seconds_per_core": round(cpu, 1), "model_only_seconds": round(model_only[0], 1),
            "model_only_cpu_seconds_per_core": round(model_only[1], 1), "pipeline_ratio": round(model_only[0] / seconds, 3),
            "pipeline_ratio_cpu": round(model_only[1] / cpu, 3),
            # Within this build: CPU while forward passes ran (also counts other threads' work meanwhile, e.g. blob
            # detection, so it errs high) against the whole build's; no second run in another load is compared.
            "forward_cpu_seconds_per_core": round(forward, 1), "pipeline_ratio_cpu_in_run": round(forward / cpu, 3),
            "non_model_cpu_seconds_per_core": round(rest[1], 2), "non_model_seconds": round(rest[0], 2),
            "non_model_share_of_model_cpu": round(rest[1] / model_only[1], 3),
            "pipeline_ratio_cpu_parts": round(model_only[1] / (model_only[1] + rest[1]), 3)}


def non_model_seconds(embedder, path: str, settings: IndexSettings, folder: str) -> tuple[float, float]:
    """(wall, CPU per core) seconds of everything but the network: the same dense build with the forward pass replaced.

    The stand-in hands back ready-made tokens of the right shape, so reading, slicing, windowing, item boxes (blob
    detection), pooling, checks, catalog and store are all that run. Unlike a pipeline-minus-model difference of two
    CPU times taken minutes apart, this does not carry the model's timing noise on a shared machine.
    """
    import torch

    window, patch = embedder._dense_geometry()
    ready = torch.randn(256, window // patch, window // patch, embedder.dim, generator=torch.Generator().manual_seed(0))
    embedder._tokens = lambda pixels: ready[:pixels.shape[0]]
    try:
        began, cpu = time.perf_counter(), time.process_time()
        with Index.create(folder, embedder, settings) as index:
            report = index.add_sources([path], embedder)
        seconds, cpu = time.perf_counter() - began, (time.process_time() - cpu) / available_cores()
    finally:
        del embedder._tokens
    if report.skipped:
        raise RuntimeError(f"{path} was not indexed with the stand-in model: {report.skipped}")
    return seconds, cpu


def model_only_seconds(embedder, passes: int, batch: int = 16, batches: int = 2) -> tuple[float, float]:
    """(wall, CPU per core) seconds the model alone needs for ``passes`` ready windows (timed on a few batches, scaled)."""
    import torch

    window = embedder._dense_geometry()[0]
    pixels = torch.randn(batch, 3, window, window)
    with torch.inference_mode(), embedder._autocast(embedder.precision or "fp32"):
        embedder._tokens(pixels[:2])
        began, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            embedder._tokens(pixels)
        wall = (time.perf_counter() - began) / (batch * batches)
        cpu = (time.process_time() - cpu) / available_cores() / (batch * batches)
    return wall * passes, cpu * passes


def resolution_options(embedder, volume, settings: IndexSettings) -> dict:
    """Seconds per slice for 10-mm cells: windows of the model's input size against one pass at a larger input."""
    import torch

    from CBIRSlicerLib.models.dense import plan_windows

    visual = embedder.model.visual
    if not hasattr(visual, "positional_embedding"):
        return {"note": "interpolated position embeddings timed for open_clip ViTs only"}
    from CBIRSlicerLib.imaging.slicing import extract_slices

    image = extract_slices(volume, "axial", stride_mm=1000.0)[0]
    window, patch = embedder._dense_geometry()
    plan = plan_windows(image.pixels.shape, image.pixel_mm, settings.dense_cell_mm, window, patch)
    windows = len(plan.windows(window))
    pixels = torch.randn(windows, 3, window, window)
    with torch.inference_mode():
        embedder._tokens(pixels[:1])
        began = time.perf_counter()
        embedder._tokens(pixels)
        windowed = time.perf_counter() - began
    # One pass at the whole canvas: the same network at that input size (interpolating the position embeddings
    # costs nothing next to it), built at that size so its position embeddings fit.
    import open_clip

    config = json.loads(json.dumps(random_checkpoints.VIT_B16_CLIP))
    config["vision_cfg"]["image_size"] = list(plan.canvas)
    big = open_clip.CLIP(**config).visual.eval()
    canvas = torch.randn(1, 3, *plan.canvas)
    with torch.inference_mode():
        big(canvas)
        began = time.perf_counter()
        big(canvas)
        interpolated = time.perf_counter() - began
    tokens = plan.canvas[0] * plan.canvas[1] // patch ** 2
    return {"slice_px": list(image.pixels.shape), "pixel_mm": round(image.pixel_mm, 3), "canvas_px": list(plan.canvas),
            "windows": windows, "windows_seconds": round(windowed, 2), "interpolated_tokens": tokens,
            "interpolated_seconds": round(interpolated, 2), "vitb16_shape_only": True}


def precision_options(embedder, batch: int = 8) -> dict:
    """Seconds per forward pass in fp32 and bf16 (autocast) on this CPU, and their smallest token cosine."""
    import torch

    window = embedder._dense_geometry()[0]
    pixels = torch.randn(batch, 3, window, window)
    out, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        with torch.inference_mode(), embedder._autocast(precision):
            embedder._tokens(pixels[:1])
            began = time.perf_counter()
            out[precision] = embedder._tokens(pixels).float().reshape(-1, embedder.dim).numpy()
            seconds[precision] = (time.perf_counter() - began) / batch
    a, b = (o / np.linalg.norm(o, axis=1, keepdims=True) for o in (out["fp32"], out["bf16"]))
    return {"fp32_s_per_pass": round(seconds["fp32"], 3), "bf16_s_per_pass": round(seconds["bf16"], 3),
            "min_token_cosine": round(float(np.min(np.sum(a * b, axis=1))), 4)}


def roi_query_latency(embedder, index_folder: str, path: str, work: str, repeats: int) -> dict:
    """A 30-mm ROI query end to end (query slices, embed, search, ranking) against a dense index of the case."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array += np.random.default_rng(0).normal(0, 5, array.shape).astype(np.float32)  # another 'patient': not left out
    noisy = sitk.GetImageFromArray(array)
    noisy.CopyInformation(image)
    query_path = os.path.join(work, "query.nii.gz")
    sitk.WriteImage(noisy, query_path)
    volume = read_volume(query_path)
    centre = volume.center_ras + np.array([20.0, 10.0, 0.0])
    roi = RoiBox(tuple(centre), (30.0, 30.0, 30.0))
    timings = []
    with Index.open(index_folder) as index:
        searcher = Searcher(index, embedder=embedder)
        cpu_timings = []
        for _ in range(repeats + 1):
            began, cpu = time.perf_counter(), time.process_time()
            query = roi_query(volume, roi, "axial", index)
            answer = searcher.search(query, k=10)
            timings.append(time.perf_counter() - began)
            cpu_timings.append((time.process_time() - cpu) / available_cores())
        passes = sum(embedder.dense_passes(im.shape[:2], mm, index.settings.dense_cell_mm, box)
                     for im, mm, box in zip(query.images, query.pixel_mm, query.boxes))
        vectors = int(index.info()["counts"]["vectors"])
    return {"roi_mm": 30, "query_slices": len(query.images), "forward_passes": passes,
            "seconds": [round(t, 2) for t in timings[1:]], "median_s": round(float(np.median(timings[1:])), 2),
            "median_cpu_s_per_core": round(float(np.median(cpu_timings[1:])), 2),
            "results": len(answer.results), "index_vectors": vectors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: random-weight ViT-B/16 (open_clip, local-dir:)")
    parser.add_argument("--volumes", default="head_ct,abdomen_ct")
    parser.add_argument("--sample", type=int, default=32, help="crops embedded to time the crops strategy")
    parser.add_argument("--repeats", type=int, default=3, help="timed ROI queries (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny random ViT, few samples")
    parser.add_argument("--model-batches", type=int, default=2, help="batches of 16 timed for the model-only rate")
    parser.add_argument("--parts", default="crops,dense,resolution,query,precision", help="what to measure (comma-separated)")
    parser.add_argument("--out", default="docs/benchmarks/dense_regions.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="cbir-dense-")
    model = args.model
    if model is None:
        shape = random_checkpoints.TINY_CLIP if args.quick else random_checkpoints.VIT_B16_CLIP
        model = "local-dir:" + random_checkpoints.write_open_clip_folder(os.path.join(work, "vit"), shape)
    embedder = create_embedder(model, device="cpu")
    volumes = real_data.prepare(names=args.volumes.split(","))
    settings = IndexSettings(region_strategy="dense")
    results = {"command": "python " + " ".join(sys.argv), "model": args.model or "random ViT-B/16 (open_clip, 224 px)",
               "cores": available_cores(), "settings": settings.as_dict(),
               "note": "2 shared cores with other work running: figures are inflated", "volumes": {}}
    for name in args.volumes.split(","):
        real = volumes[name]
        volume = read_volume(real.image)
        row = {"source": real.source, "shape": list(volume.shape_ijk), "spacing_mm": [round(float(s), 3) for s in volume.spacing]}
        parts = args.parts.split(",")
        if "crops" in parts:
            row["crops"] = crops_estimate(embedder, volume, IndexSettings(region_strategy="crops"), 8 if args.quick else args.sample)
            print(name, "crops", json.dumps(row["crops"]), flush=True)
        folder = os.path.join(work, f"index_{name}")
        if "dense" in parts or "query" in parts:
            row["dense"] = dense_build(embedder, real.image, settings, folder, args.model_batches)
            print(name, "dense", json.dumps(row["dense"]), flush=True)
        if "resolution" in parts:
            row["resolution"] = resolution_options(embedder, volume, settings)
            print(name, "resolution", json.dumps(row["resolution"]), flush=True)
        if name == "head_ct" and "query" in parts:
            row["roi_query"] = roi_query_latency(embedder, folder, real.image, work, 1 if args.quick else args.repeats)
            print(name, "roi query", json.dumps(row["roi_query"]), flush=True)
        results["volumes"][name] = row
        save(results, args.out)
    if "precision" in args.parts.split(","):
        results["precision"] = precision_options(embedder)
        print("precision", json.dumps(results["precision"]), flush=True)
    save(results, args.out)
    print(f"written to {args.out}")


def save(results: dict, path: str) -> None:
    """Write what is measured so far (a long run stopped early keeps its finished volumes)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
