"""A Milvus-backed index on a server (milvus-lite's gRPC server in a child process, 127.0.0.1): readers search while a
writer adds, a second writer is refused, the server is killed and restarted mid-build, and a writer is killed mid-build.

Each time the index ends with every case once (the items the server holds are exactly the committed cases' items,
``verify`` is clean) and answers as a clean build of the same cases.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from milvus_server import MilvusServer
from test_milvus_index import SLICING, SMALL, answer, cbir

from CBIRSlicerLib.errors import IndexLockedError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index.location import open_index

pytest.importorskip("pymilvus")

CASES = 4


class Writer:
    """``cbir index build|add`` in a child process, its progress lines collected as they come."""

    def __init__(self, action: str, cohort: str, location: str, **environment: str):
        env = {**os.environ, "CBIR_CHECKPOINT_SECONDS": "0", **environment}
        self.process = subprocess.Popen([sys.executable, "-m", "CBIRSlicerLib.cli", "index", action, cohort, "--index", location,
                                         *SLICING, "--index-type", "flat"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip())

    def done_cases(self) -> int:
        """Cases the writer has finished (its progress line counts those begun)."""
        found = [line for line in self.lines if line.startswith("indexing [")]
        return max((int(line.split("] ")[1].split("/")[0]) for line in found), default=0)

    def wait_for(self, cases: int, timeout: float = 600) -> None:
        began = time.monotonic()
        while self.done_cases() < cases:
            assert self.process.poll() is None, "\n".join(self.lines)
            assert time.monotonic() - began < timeout, "\n".join(self.lines)
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 synthetic cases, and the answers of a clean folder build of them (exact, as the server's flat index)."""
    work = tmp_path_factory.mktemp("server")
    paths = synthetic.write_cohort(synthetic.make_cohort(CASES, seed=5, **SMALL), str(work / "cohort"))
    code, _, err = cbir("index", "build", str(work / "cohort"), "--index", str(work / "folder"), *SLICING, "--index-type", "flat")
    assert code == 0, err
    return {"work": work, "folder": str(work / "cohort"), "paths": paths, "clean": str(work / "folder")}


@pytest.fixture
def server(tmp_path):
    running = MilvusServer(tmp_path / "server.db").start()
    yield running
    running.stop()


def _whole(location: str, clean: str, paths: list[str], answers: bool = True) -> None:
    """Every case once, verify clean, the items stored are the committed ones, and (``answers``: built in one go, so with
    the same fitted transform) a query answers as the clean build."""
    index = open_index(location)
    try:
        assert index.verify(check_sources=False) == []
        stored = index.collections.count(index.collections.names.items)
        assert len(index.catalog.cases()) == CASES and stored == index.manifest["counts"]["items"]
        assert stored == len(index.catalog.item_ids()) == len(np.unique(index.store.ids()))
    finally:
        index.close()
    reference = open_index(clean)
    try:
        assert stored == reference.info()["counts"]["items"]
    finally:
        reference.close()
    if not answers:
        return
    from test_cli_answers import differences

    query = ["--volume", paths[0], "-k", "5"]
    found = differences(answer(location, *query), answer(clean, *query))
    assert not found, found[:5]


def test_readers_search_while_a_writer_adds_and_a_second_writer_is_refused(cohort, server):
    location = f"milvus://{server.address}/cases"
    code, _, err = cbir("index", "build", *cohort["paths"][:2], "--index", location, *SLICING, "--index-type", "flat")
    assert code == 0, err
    writer = Writer("add", cohort["folder"], location)
    reader = open_index(location)
    seen, searches = set(), 0
    try:
        writer.wait_for(1)
        with pytest.raises(IndexLockedError, match="being written by process"):
            open_index(location, writable=True)
        from CBIRSlicerLib.retrieval.queries import text_query  # noqa: F401  (the searcher's import path, warmed)
        from CBIRSlicerLib.retrieval.search import Searcher

        searcher = Searcher(reader, model="handcrafted")
        vectors = reader.store.vectors_of(reader.catalog.item_ids([reader.catalog.cases()[0].row])[:4])
        while writer.process.poll() is None or searches == 0:
            scores, ids = reader.store.search(vectors, 50)
            rows = reader.catalog.case_rows_of_items(ids[ids >= 0])
            for row in set(rows.values()):
                case = reader.catalog.case_by_row(row)
                assert case.status == "complete", case  # a reader never sees a case whose items are half written
                seen.add(case.case_id)
            searches += 1
        assert searcher.index is reader
    finally:
        code = writer.finish()
        reader.close()
    assert code == 0, "\n".join(writer.lines)
    assert searches >= 1 and len(seen) >= 2
    _whole(location, cohort["clean"], cohort["paths"], answers=False)  # fitted on 2 cases, then on 4 if they doubled the items


def test_a_server_killed_and_restarted_mid_build_leaves_each_case_once(cohort, server):
    location = f"milvus://{server.address}/cases"
    writer = Writer("build", cohort["folder"], location, CBIR_MILVUS_RETRY_SECONDS="120")
    writer.wait_for(2)  # one case committed, the second under way
    server.kill()
    time.sleep(2)
    server.start()
    code = writer.finish()
    assert code == 0, "\n".join(writer.lines)
    _whole(location, cohort["clean"], cohort["paths"])
    code, out, err = cbir("index", "add", cohort["folder"], "--index", location, *SLICING)
    assert code == 0 and f"0 case(s) added, 0 refreshed, {CASES} unchanged" in out, err


def test_a_killed_writer_is_followed_by_the_next_once_its_lease_lapses(cohort, server):
    location = f"milvus://{server.address}/cases"
    writer = Writer("build", cohort["folder"], location, CBIR_MILVUS_LEASE_SECONDS="4")
    writer.wait_for(2)
    writer.process.send_signal(signal.SIGKILL)
    writer.finish()
    os.environ["CBIR_MILVUS_LEASE_SECONDS"] = "4"
    try:
        with pytest.raises(IndexLockedError, match="being written by process"):
            open_index(location, writable=True)
        time.sleep(4.5)  # the dead writer's lease lapses
        again = Writer("build", cohort["folder"], location, CBIR_MILVUS_LEASE_SECONDS="4")
        assert again.finish() == 0, "\n".join(again.lines)
    finally:
        del os.environ["CBIR_MILVUS_LEASE_SECONDS"]
    # The next writer fits the transform on the cases the dead one committed, as a folder's would; a clean build fits
    # on all four, so only the cases and items are compared, not the scores.
    _whole(location, cohort["clean"], cohort["paths"], answers=False)
