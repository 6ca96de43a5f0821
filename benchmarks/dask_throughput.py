"""Build throughput: the single-process build against Dask builds with 1 and 2 workers, on real head-and-neck CT.

The real patients of ``real/head-neck-ct`` (128^3 CT each; default the first 24 by id, ``--cases 0`` for all 170) are
indexed with the ``handcrafted`` model and the default slicing (5 mm slices, 32 mm tiles, blob crops) into a fresh
index folder, once per configuration, each in its own process:

* ``single``: ``Index.add_sources`` (the read-ahead thread reads the next case while this one is embedded);
* ``dask1`` / ``dask2``: ``dask_build.add_sources_on_dask`` on a LocalCluster of 1 or 2 single-threaded worker
  processes on 127.0.0.1 (the cluster started before the clock starts: a department's cluster is up already).

Measured: wall seconds and CPU seconds of every process of the build (the writer, and each worker as it reports its own
``getrusage``), cases and vectors per wall minute and per CPU minute, and the load average around it. The machine is
shared by several agents, so wall-clock figures need a quiet re-run; CPU seconds do not. From the CPU split the script
also states a lower bound of each build's wall time on idle cores: the Dask build's writer (storing) runs beside its
workers (embedding), so max(writer CPU, worker CPU / workers, all CPU / cores); the single-process build's read-ahead
thread (``read``: checksum and read each case, timed on its own) runs beside its main thread, so max(read CPU, the
rest). ``idle_cores_speedup_vs_single`` is the ratio of those bounds.

    python benchmarks/dask_throughput.py [--cases 24] [--configs single,dask1,dask2] [--out docs/benchmarks/dask_throughput.json]
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def patients(count: int) -> list[str]:
    """The first ``count`` head-and-neck CT files by patient number (all with 0)."""
    import real_data

    folder = real_data.shared_data_dir() / "real" / "head-neck-ct"
    found = sorted((p for p in folder.glob("train_pt_*_ct.nii.gz")), key=lambda p: int(p.name.split("_")[2]))
    return [str(p) for p in (found[:count] if count else found)]


def child(config: str, files: list[str], work: str) -> dict:
    """One build (in this process): its wall time and the CPU time of the writer and of each worker."""
    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.models.registry import create_embedder

    folder = os.path.join(work, config)
    shutil.rmtree(folder, ignore_errors=True)
    embedder = create_embedder("handcrafted")
    index = Index.create(folder, embedder, IndexSettings(axes=["axial"]))
    out = {"config": config, "cases": len(files), "load_before": load()}
    if config == "read":  # what the single-process build's read-ahead thread does: checksum and read each case
        from CBIRSlicerLib.imaging.readers import discover
        from CBIRSlicerLib.index.writer import _load

        cpu0, wall0 = own_cpu(), time.perf_counter()
        for source in discover(files).cases:
            _load(source, {})
        out.update(wall_s=time.perf_counter() - wall0, writer_cpu_s=own_cpu() - cpu0, worker_cpu_s=0.0, added=len(files),
                   skipped=0, vectors=0, load_after=load())
        return out
    if config == "single":
        cpu0, wall0 = own_cpu(), time.perf_counter()
        report = index.add_sources(files, embedder)
        index.close()
        out.update(wall_s=time.perf_counter() - wall0, writer_cpu_s=own_cpu() - cpu0, worker_cpu_s=0.0)
    else:
        from distributed import Client

        from CBIRSlicerLib.index import dask_build

        workers = int(config[len("dask"):])
        cluster = dask_build.local_cluster(workers)  # as --dask local:N makes it
        client = Client(cluster)

        def worker_cpu() -> float:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return usage.ru_utime + usage.ru_stime

        before = client.run(worker_cpu)
        cpu0, wall0 = own_cpu(), time.perf_counter()
        report = dask_build.add_sources_on_dask(index, files, cluster.scheduler_address)
        index.close()
        wall, writer = time.perf_counter() - wall0, own_cpu() - cpu0
        after = client.run(worker_cpu)
        out.update(wall_s=wall, writer_cpu_s=writer, worker_cpu_s=sum(after[w] - before.get(w, 0.0) for w in after),
                   workers=workers, models_loaded=sum(client.run(dask_build.models_loaded).values()))
        client.close()
        cluster.close()
    out["added"], out["skipped"], out["vectors"] = len(report.added), len(report.skipped), report.vectors
    out["load_after"] = load()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="patients to index (0: all 170)")
    parser.add_argument("--configs", default="read,single,dask1,dask2")
    parser.add_argument("--work", help="a folder for the indexes (default: a temporary one, removed)")
    parser.add_argument("--out", default="docs/benchmarks/dask_throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = patients(args.cases)
    if args.child:
        print(json.dumps(child(args.child, files, args.work)))
        return
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="cbir-dask-")
    runs = {}
    for config in args.configs.split(","):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, "--cases", str(args.cases),
                               "--work", args.work], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        cpu = run["writer_cpu_s"] + run["worker_cpu_s"]
        run.update(cpu_s=round(cpu, 1), wall_s=round(run["wall_s"], 1), writer_cpu_s=round(run["writer_cpu_s"], 1),
                   worker_cpu_s=round(run["worker_cpu_s"], 1), cases_per_wall_min=round(60 * run["added"] / run["wall_s"], 2),
                   cases_per_cpu_min=round(60 * run["added"] / cpu, 2))
        # On idle cores: the writer stores while the workers embed, so the build takes at least the larger of the two.
        if run["config"] not in ("single", "read"):
            run["idle_cores_wall_s"] = round(max(run["writer_cpu_s"], run["worker_cpu_s"] / run["workers"]), 1)
        runs[config] = run
        print(json.dumps(run), flush=True)
    report = {"data": "real/head-neck-ct", "cases": len(files), "model": "handcrafted", "settings": "defaults (axial, 5 mm, "
              "32 mm tiles, 12 blobs x 16/24/32 mm)", "cpus": os.cpu_count(), "runs": runs}
    if "single" in runs:
        single = runs["single"]
        # On 2 idle cores the single-process build's two threads overlap: reading (its read-ahead thread) beside the rest
        # (embedding and storing, the main thread), so it takes at least the larger of the two.
        reading = runs["read"]["cpu_s"] if "read" in runs else 0.0
        single["idle_cores_wall_s"] = round(max(reading, single["cpu_s"] - reading), 1)
        for name, run in runs.items():
            if name in ("single", "read"):
                continue
            run["wall_speedup_measured"] = round(single["wall_s"] / run["wall_s"], 2)
            run["cpu_per_case_vs_single"] = round((run["cpu_s"] / run["added"]) / (single["cpu_s"] / single["added"]), 2)
            # On 2 idle cores the workers and the writer share them: at least their CPU over 2 cores.
            run["idle_cores_wall_s"] = round(max(run["idle_cores_wall_s"], run["cpu_s"] / os.cpu_count()), 1)
            run["idle_cores_speedup_vs_single"] = round(single["idle_cores_wall_s"] / run["idle_cores_wall_s"], 2)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    if not keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
