"""Bulk embedding on Dask: a LocalCluster of worker processes on 127.0.0.1 started by the test itself.

A build whose cases are embedded on the workers gives the index a single-process build gives (the same cases, items
and answers; item ids may differ, since cases are stored in the order they finish), each worker loads the model once
however many cases it embeds, the vectors go to a Milvus-backed index as well as to a folder, and a worker killed in the
middle of the build costs nothing: its case is embedded again elsewhere and each case is stored once.
"""

from __future__ import annotations

import os
import signal

import pytest
from test_cli_answers import differences
from test_milvus_index import SLICING, SMALL, answer, cbir

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index import dask_build
from CBIRSlicerLib.index.location import open_index

distributed = pytest.importorskip("distributed")
CASES = 5


def _without_item_ids(found: dict) -> dict:
    """An answer with its item ids left out (a Dask build stores cases in the order they finish, so their ids differ)."""
    for result in found.get("results", []):
        result["best_match"].pop("item_id", None)
    return found


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """5 synthetic cases and a single-process folder build of them (the reference)."""
    work = tmp_path_factory.mktemp("dask")
    paths = synthetic.write_cohort(synthetic.make_cohort(CASES, seed=7, **SMALL), str(work / "cohort"))
    code, _, err = cbir("index", "build", str(work / "cohort"), "--index", str(work / "single"), *SLICING, "--index-type", "flat")
    assert code == 0, err
    return {"work": work, "folder": str(work / "cohort"), "paths": paths, "single": str(work / "single")}


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1 (each its own model), kept for the module's tests."""
    local = dask_build.local_cluster(2)
    client = distributed.Client(local)
    yield local, client
    client.close()
    local.close()


def _same_as_single(location: str, cohort: dict) -> None:
    built, single = open_index(location), open_index(cohort["single"])
    try:
        assert built.info()["counts"] == single.info()["counts"]
        assert sorted(c.case_id for c in built.catalog.cases()) == sorted(c.case_id for c in single.catalog.cases())
        assert built.verify(check_sources=False) == []
    finally:
        built.close()
        single.close()
    for path in cohort["paths"][:2]:
        query = ["--volume", path, "-k", "4"]
        found = differences(_without_item_ids(answer(location, *query)), _without_item_ids(answer(cohort["single"], *query)))
        assert not found, found[:5]


def test_a_dask_build_into_milvus_is_the_single_process_build(cohort, cluster, tmp_path):
    local, client = cluster
    location = f"milvus://{tmp_path / 'dask.db'}"
    code, out, err = cbir("index", "build", cohort["folder"], "--index", location, *SLICING, "--index-type", "flat",
                          "--dask", local.scheduler_address)
    assert code == 0, err
    assert f"{CASES} case(s) added" in out and err.count("indexing [") >= CASES  # a progress line per case, as today
    _same_as_single(location, cohort)
    loads = client.run(lambda: dask_build.models_loaded())
    assert len(loads) == 2 and sum(loads.values()) >= 1 and max(loads.values()) == 1, loads  # once per worker, not per case


def test_a_worker_killed_mid_build_loses_nothing(cohort, cluster, tmp_path):
    local, client = cluster
    location = str(tmp_path / "folder")
    pids = client.run(os.getpid)
    killed = []

    def progress(done: int, total: int, label: str) -> None:
        if done == 1 and not killed:  # one case stored, the others in flight on both workers
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    from CBIRSlicerLib.index.folder import Index
    from CBIRSlicerLib.index.items import IndexSettings
    from CBIRSlicerLib.models.registry import create_embedder

    settings = IndexSettings(axes=["axial"], stride_mm=12.0, blobs_per_slice=3, blob_sizes_mm=[24.0], tile_sizes_mm=[48.0])
    with Index.create(location, create_embedder("handcrafted"), settings, "flat") as index:
        report = dask_build.add_sources_on_dask(index, [cohort["folder"]], local.scheduler_address, progress=progress)
    assert killed and len(report.added) == CASES and not report.skipped, report.summary()
    _same_as_single(location, cohort)
