"""Embedding throughput: images per second per model and batch size, model-only and full pipeline.

Models available offline: ``handcrafted``; a tiny random open_clip ViT; a full-size random-weight
open_clip ViT-B/16 at 224 px (the BiomedCLIP image tower's shape, so the same compute). All
torch models load through ``local-dir:``, the path a real checkpoint takes.

    python benchmarks/embed_throughput.py [--quick] [--out docs/benchmarks/embed_throughput.json]

"Model-only" times ``embed_images`` on ready uint8 RGB slices (the model's own preprocessing
included, as it always runs); "pipeline" times read volume -> axial slices -> window -> embed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Testing"))
import random_checkpoints

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.intensity import choose_window, to_uint8_rgb
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.slicing import extract_slices
from CBIRSlicerLib.models.base import available_cores
from CBIRSlicerLib.models.registry import create_embedder


def machine() -> dict:
    """CPU, cores, memory, library versions and GPU, as far as this process can tell."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": available_cores(), "memory_gib": round(memory, 1) if memory else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version()}


def slices_of(volume, count: int) -> list[np.ndarray]:
    """``count`` uint8 RGB axial slices (repeated if the volume has fewer)."""
    window = choose_window(volume)
    images = [to_uint8_rgb(s.pixels, window) for s in extract_slices(volume, "axial")]
    return [images[n % len(images)] for n in range(count)]


def time_embedding(embedder, images, batch: int) -> float:
    """Images per second for ``embed_images`` at a batch size, after one warm-up batch."""
    embedder.embed_images(images[:batch], batch_size=batch)
    began = time.perf_counter()
    embedder.embed_images(images, batch_size=batch)
    return len(images) / (time.perf_counter() - began)


def time_pipeline(embedder, path: str, batch: int, stride: int) -> tuple[float, int]:
    """Images per second for read -> slice -> window -> embed of one volume file."""
    began = time.perf_counter()
    volume = read_volume(path)
    window = choose_window(volume)
    images = [to_uint8_rgb(s.pixels, window) for s in extract_slices(volume, "axial", stride=stride)]
    embedder.embed_images(images, batch_size=batch)
    return len(images) / (time.perf_counter() - began), len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--out", default="docs/benchmarks/embed_throughput.json")
    parser.add_argument("--devices", default=None, help="comma-separated, default cpu plus cuda when present")
    args = parser.parse_args()
    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    work = tempfile.mkdtemp(prefix="cbir-bench-")
    shape = (256, 256, 64)  # a CT-like slice size that the 224 px models resize, like real slices
    volume = synthetic.render(synthetic.centered_matrix(shape, (0.8, 0.8, 2.5)), shape, body_radii=(90.0, 70.0, 200.0))
    path = synthetic.write_volume(volume, os.path.join(work, "phantom.nii.gz"))
    models = {
        "handcrafted": "handcrafted",
        "tiny ViT (random, 32 px)": f"local-dir:{random_checkpoints.write_open_clip_folder(os.path.join(work, 'tiny'))}",
        "ViT-B/16 (random, 224 px)": "local-dir:" + random_checkpoints.write_open_clip_folder(
            os.path.join(work, "vitb16"), random_checkpoints.VIT_B16_CLIP),
    }
    results = {"machine": machine(), "image_size": list(shape[:2]), "rows": []}
    for device in devices:
        for label, name in models.items():
            embedder = create_embedder(name, device=device)
            heavy = "ViT-B" in label and device == "cpu"
            batches = (1, 8, 32) if device == "cpu" else (1, 8, 32, 128)
            for batch in batches:
                count = batch * (1 if heavy or args.quick else 4) if batch > 1 else (4 if heavy else 16)
                count = max(count, batch)
                rate = time_embedding(embedder, slices_of(volume, count), batch)
                row = {"model": label, "device": device, "batch": batch, "images": count, "model_only_per_s": round(rate, 2),
                       "precision": getattr(embedder, "precision", None) or "n/a"}
                if batch == max(b for b in batches if b <= 32):
                    stride = 8 if heavy else 1
                    pipeline, n = time_pipeline(embedder, path, batch, stride)
                    row.update(pipeline_per_s=round(pipeline, 2), pipeline_images=n, pipeline_ratio=round(pipeline / rate, 3))
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"machine: {json.dumps(results['machine'])}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
