"""Bulk embedding on a Dask cluster: cases read and embedded on the workers, stored by the one writer as they come.

``cbir index build SOURCES --index LOCATION --dask SCHEDULER`` (``tcp://HOST:8786``, or ``local:N`` for N worker
processes on this machine, on 127.0.0.1). Each task is one case: the worker checksums it (an unchanged case stops
there), reads it, checks it and embeds its items with the index's model (:func:`writer.prepare_case`, the same code the
single-process build runs), and sends back its items, vectors and thumbnails. Each worker process loads the model once
(a per-process cache; a GPU worker puts it on its GPU with ``--device``). The writer (this process, holding the index's
lock or lease) stores each case as its result arrives (:meth:`writer.IndexWriter.add_prepared`): checkpoints, progress,
the final transform fit and the resumable 'pending' logic are the single-process build's.

Why cases and not slices as tasks: a case's items are stored together (their ids consecutive, which the search's
per-case reads rely on) and its volume is read once. At most ``2 x workers + 2`` cases are in flight, so the writer's
memory holds a few cases' vectors, not the whole build's. A worker that dies (killed, out of memory) loses its
case: Dask gives it to another worker (``retries``), and the build goes on; a case that fails everywhere is skipped
with its reason, as a single-process build skips an unreadable file. If the writer itself dies, the next build purges
its pending cases and redoes only what was not committed.

Patient identifiers: workers return the header as read; the writer applies the index's privacy policy with its own site
key (:mod:`privacy`), so the key never leaves the writer's machine. Workers must see the sources at the same paths
(a shared file system), as they would for any cluster build.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import CBIRError, ParameterError
from ..imaging.readers import CaseSource, discover
from .items import IndexSettings
from .writer import BuildReport, CaseProgress, IndexWriter, PreparedCase, case_id_for, prepare_case

LOCAL = "local:"
RETRIES = 2  # a case whose worker dies is given to another worker this many times
_models: dict[tuple[str, str | None], Any] = {}  # the embedders this worker process loaded (once each)


def worker_embedder(model: str, device: str | None) -> Any:
    """The model of this worker process, loaded on its first case and kept."""
    key = (model, device)
    if key not in _models:
        from ..models.registry import create_embedder

        _models[key] = create_embedder(model, device=device)
    return _models[key]


def models_loaded() -> int:
    """How many models this process loaded (a test asks each worker: one)."""
    return len(_models)


def embed_case(source: CaseSource, model: str, device: str | None, settings: dict[str, Any], labels: list[str],
               known_checksum: str | None) -> PreparedCase:
    """A worker's task: one case prepared with the worker's model (see :func:`writer.prepare_case`)."""
    import threadpoolctl

    # One thread per worker process: the cluster's parallelism is its workers; numpy's BLAS threads on top only contend.
    with threadpoolctl.threadpool_limits(1):
        embedder = worker_embedder(model, device)
        return prepare_case(source, embedder, IndexSettings.from_stored(settings), labels, known_checksum)


def local_cluster(workers: int) -> Any:
    """A LocalCluster of ``workers`` single-threaded worker processes on 127.0.0.1, no dashboard.

    Dask's nannies set ``MALLOC_TRIM_THRESHOLD_=65536`` in their workers to give memory back to the OS; glibc then stops
    adapting its mmap threshold, so every large numpy array of a volume's slices is mapped and unmapped afresh: on one
    head-and-neck CT a worker spent 10.6 CPU s (6 of them in the kernel) where this process spends 3.7. Left unset here,
    as a cluster for bulk embedding should leave it (``distributed.nanny.pre-spawn-environ``)."""
    import dask
    from distributed import LocalCluster

    # Worker processes (not threads): numpy, SimpleITK and torch hold the GIL often; each process loads its own model.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                            silence_logs=50)


@contextmanager
def dask_client(scheduler: str) -> Iterator[Any]:
    """A client of the named scheduler, or of a local cluster of N single-threaded worker processes on 127.0.0.1."""
    try:
        from distributed import Client
    except ImportError:
        raise ParameterError("--dask needs dask[distributed] (pip install 'dask[distributed]')") from None
    if scheduler.startswith(LOCAL):
        try:
            workers = int(scheduler[len(LOCAL):])
        except ValueError:
            raise ParameterError(f"--dask {scheduler}: write local:N with N the number of worker processes") from None
        if workers < 1:
            raise ParameterError(f"--dask {scheduler}: at least one worker")
        cluster = local_cluster(workers)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout=30)
    except OSError as error:
        raise CBIRError(f"--dask {scheduler}: the Dask scheduler does not answer ({error}); start it, or check the address") from None
    try:
        yield client
    finally:
        client.close()


def prepared_on_cluster(client: Any, cases: list[CaseSource], model: str, device: str | None, settings: IndexSettings,
                        labels_of: Callable[[CaseSource], list[str]], known: dict[str, str | None],
                        should_stop: Callable[[], bool] | None = None) -> Iterator[PreparedCase]:
    """Each case prepared on a worker, yielded as it finishes (a bounded number in flight)."""
    from distributed import as_completed

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    in_flight = 2 * workers + 2
    stored = settings.as_dict()

    sources: dict[str, str] = {}  # task key -> the case's label, for a case that fails everywhere

    def submit(source: CaseSource) -> Any:
        # pure=False: a case asked for again (a rerun) is embedded again, not taken from another build's memory.
        future = client.submit(embed_case, source, model, device, stored, labels_of(source), known.get(case_id_for(source)),
                               retries=RETRIES, pure=False)
        sources[future.key] = source.label
        return future

    waiting = list(cases)
    running = as_completed([submit(waiting.pop(0)) for _ in range(min(in_flight, len(waiting)))])
    for future in running:
        try:
            prepared = future.result()
        except Exception as error:  # the case failed on every worker it was given to (KilledWorker, a crash)
            label = sources.get(future.key, "a case")
            prepared = PreparedCase("", label, skipped=f"failed on the Dask workers ({type(error).__name__}: {error})")
        yield prepared
        if waiting and not (should_stop is not None and should_stop()):
            running.add(submit(waiting.pop(0)))


def add_sources_on_dask(index: IndexWriter, paths: list[str], scheduler: str, model: str | None = None, device: str | None = None,
                        progress: CaseProgress | None = None, labels: dict[str, list[str]] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> BuildReport:
    """Index files and folders with the cases embedded on a Dask cluster (see the module); the writer is ``index``."""
    from .dicom_sources import is_dicom_source

    remote = [p for p in paths if is_dicom_source(p)]
    if remote:
        raise ParameterError(f"{remote[0]}: --dask indexes files and folders; index a DICOM database or PACS without --dask")
    began = time.monotonic()
    found = discover(paths)
    cases = list(found.cases)
    known = index.known_checksums(cases)
    labels = labels or {}
    model = model or index.model_name()
    with dask_client(scheduler) as client:
        report = index.add_prepared(prepared_on_cluster(client, cases, model, device, index.settings,
                                                        lambda source: list(labels.get(os.path.abspath(source.path), [])),
                                                        known, should_stop), len(cases), progress, should_stop)
    report.skipped[:0] = found.skipped
    report.seconds = time.monotonic() - began
    return report
