"""A background embedding service: a persistent worker process that loads a model once and runs jobs.

Why a process and not a thread: torch and numpy code still takes the GIL between operations,
which makes a GUI thread stutter; a process also survives (and reports) a crash or an
out-of-memory error without taking Slicer down, gives GPU memory back when stopped, and can
be killed when a cancel must happen *now*. The caller's side only runs two small threads
(one writes requests, one reads events) and never blocks: it polls ``Job.poll()`` (Slicer:
from a QTimer), so nothing the GUI owns is touched from another thread.

Protocol over the child's stdin / stdout (stdout is moved away from print()): messages are an
8-byte little-endian length plus a JSON header, followed by the header's ``arrays`` count of
arrays in .npy format (``allow_pickle=False``; no pickle anywhere).
"""

from __future__ import annotations

import io
import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

from ..errors import JobCancelled, ModelError, WorkerError
from ..processes import in_thread, start_module, wait_or_kill
from ..progress import Progress, State
from .requests import EmbeddingKind, EmbeddingRequest

HARD_CANCEL_S = 0.8  # a cancel not acknowledged by then kills the worker, so every cancel ends within 1 s
TARGET_BATCH_S = 0.25  # batches are sized to take about this long, so cancels are seen promptly
MAX_BATCH = 256
_LENGTH = struct.Struct("<Q")


def _write_message(stream, header: dict, arrays: list[np.ndarray] = ()) -> None:
    """Write one framed message: JSON header, then each array as .npy."""
    header = {**header, "arrays": len(arrays)}
    body = json.dumps(header).encode()
    stream.write(_LENGTH.pack(len(body)) + body)
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        data = buffer.getvalue()
        stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("stream closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_message(stream) -> tuple[dict, list[np.ndarray]]:
    """Read one framed message; EOFError when the other side has gone."""
    (size,) = _LENGTH.unpack(_read_exact(stream, _LENGTH.size))
    header = json.loads(_read_exact(stream, size))
    arrays = []
    for _ in range(header.get("arrays", 0)):
        (size,) = _LENGTH.unpack(_read_exact(stream, _LENGTH.size))
        arrays.append(np.load(io.BytesIO(_read_exact(stream, size)), allow_pickle=False))
    return header, arrays


class Job:
    """One embedding request; ``poll()`` it, ``cancel()`` it, or wait for ``result()``."""

    FINAL = ("done", "failed", "cancelled")
    # The job's own states (the worker's messages) as the one progress protocol says them.
    STATES = {"queued": State.QUEUED, "running": State.RUNNING, "cancelling": State.STOPPING, "done": State.DONE,
              "failed": State.FAILED, "cancelled": State.CANCELLED}

    def __init__(self, service: EmbeddingService, job_id: int, kind: str, total: int):
        self._service = service
        self.id = job_id
        self.kind = kind
        self.total = total
        self.done = 0
        self.state = "queued"
        self.started: float | None = None
        self.finished: float | None = None
        self._result: np.ndarray | None = None
        self._error: Exception | None = None
        self._event = threading.Event()

    def poll(self) -> Progress:
        """Where the job stands now (safe to call from any thread, e.g. a GUI timer): images done of total, rate, time left."""
        return Progress.timed(self.STATES[self.state], self.done, self.total, self.started, self.finished)

    def cancel(self) -> None:
        """Ask the worker to stop this job; it ends (state 'cancelled') within about one second."""
        self._service._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it did within the timeout."""
        return self._event.wait(timeout)

    def result(self, timeout: float | None = None) -> np.ndarray:
        """The vectors, or the job's error (WorkerError, JobCancelled) raised here."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, state: str, result: np.ndarray | None = None, error: Exception | None = None) -> None:
        if self.state in self.FINAL:
            return
        self.state, self._result, self._error = state, result, error
        self.finished = time.monotonic()
        self._event.set()


class EmbeddingService:
    """Runs embedding jobs in a persistent worker process that loads the model once."""

    def __init__(self, model: str = "handcrafted", device: str | None = None, precision: str = "auto",
                 threads: int | None = None, python: str | None = None, log=None):
        self.spec = {"model": model, "device": device, "precision": precision, "threads": threads}
        self.python = python or sys.executable
        self.model_info: dict | None = None
        self.model_loads = 0
        self._log = log if log is not None else sys.stderr
        self._process: subprocess.Popen | None = None
        self._outbox: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._load_error: Exception | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddingService:
        """Start the worker (if not running) and begin loading the model; returns at once."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return self
            self._ready.clear()
            self._load_error = None
            self._process = start_module(self.python, "models.worker", self.spec, stderr=None)
            self._outbox = queue.Queue()
            process, outbox = self._process, self._outbox
        in_thread(self._writer, process, outbox, name="cbir-worker-writer")
        in_thread(self._reader, process, name="cbir-worker-reader")
        return self

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Block until the model is loaded; returns its description or raises the load error."""
        self.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"model '{self.spec['model']}' not loaded after {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        return self.model_info

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and jobs run without waiting for it."""
        return self._ready.is_set() and self._load_error is None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker: pending jobs are cancelled, the process exits (killed if it does not)."""
        with self._lock:
            process, outbox = self._process, self._outbox
            self._process = None
        if process is None:
            return
        outbox.put(({"op": "shutdown"}, []))
        wait_or_kill(process, timeout)
        self._fail_pending(JobCancelled("the embedding service was shut down"), state="cancelled")

    def __enter__(self) -> EmbeddingService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ----- jobs --------------------------------------------------------------------------------
    def submit_images(self, images) -> Job:
        """Queue images (uint8 RGB / grey arrays) for embedding; returns a Job at once."""
        arrays = [np.asarray(image) for image in images]
        return self._submit("images", len(arrays), {}, arrays)

    def submit_text(self, texts) -> Job:
        """Queue phrases for text embedding (CLIP-family models); returns a Job at once."""
        texts = [str(t) for t in texts]
        return self._submit("text", len(texts), {"texts": texts}, [])

    def submit_regions(self, images, boxes, pixel_mm, cell_mm: float, pooling: str, passes: int | None = None) -> Job:
        """Queue whole slices whose boxes' vectors are pooled from their dense grids (a dense index's query); returns a Job."""
        arrays = [np.asarray(image) for image in images]
        fields = {"boxes": [list(map(float, b)) for b in boxes], "pixel_mm": [float(v) for v in pixel_mm],
                  "cell_mm": float(cell_mm), "pooling": pooling, "passes": passes}
        return self._submit("regions", len(arrays), fields, arrays)

    def submit_volume(self, volume, roi=None) -> Job:
        """Queue a volume for a 3D model: the vector of an ROI of it (RoiBox), or of the whole volume; returns a Job."""
        fields = {"ijk_to_ras": np.asarray(volume.ijk_to_ras, float).tolist(), "roi": roi.as_list() if roi is not None else None}
        return self._submit("volume", 1, fields, [np.ascontiguousarray(volume.array)])

    def submit(self, request: EmbeddingRequest) -> Job:
        """Queue what a query needs embedded (:class:`requests.EmbeddingRequest`); returns a Job at once."""
        if request.kind is EmbeddingKind.TEXT:
            return self.submit_text(request.texts)
        if request.kind is EmbeddingKind.VOLUME:
            return self.submit_volume(request.volume, request.roi)
        if request.kind is EmbeddingKind.REGIONS:
            return self.submit_regions(request.images, request.boxes, request.pixel_mm, request.cell_mm, request.pooling,
                                       request.passes)
        return self.submit_images(request.images)

    def _submit(self, kind: str, total: int, fields: dict, arrays: list[np.ndarray]) -> Job:
        self.start()
        with self._lock:
            job = Job(self, self._next_id, kind, total)
            self._next_id += 1
            self._jobs[job.id] = job
            outbox = self._outbox
        outbox.put(({"op": "embed", "job": job.id, "kind": kind, **fields}, arrays))
        return job

    def _cancel(self, job: Job) -> None:
        if job.state in Job.FINAL:
            return
        with self._lock:
            outbox, process = self._outbox, self._process
            job.state = "cancelling"
        outbox.put(({"op": "cancel", "job": job.id}, []))
        if not job.wait(HARD_CANCEL_S) and process is not None:
            # The worker is inside a long computation: stop it now; the next job starts a fresh one.
            self._restart_after_kill(process, f"worker restarted to cancel job {job.id}")
            job._finish("cancelled", error=JobCancelled(f"job {job.id} cancelled"))

    def _restart_after_kill(self, process: subprocess.Popen, reason: str) -> None:
        with self._lock:
            if self._process is process:
                self._process = None
        process.kill()
        self._fail_pending(WorkerError(f"{reason}; resubmit the job"), exclude_cancelling=True)

    def _fail_pending(self, error: Exception, state: str = "failed", exclude_cancelling: bool = False) -> None:
        with self._lock:
            pending = [j for j in self._jobs.values() if j.state not in Job.FINAL]
        for job in pending:
            if exclude_cancelling and job.state == "cancelling":
                continue
            job._finish(state, error=error)

    # ----- threads -----------------------------------------------------------------------------
    def _writer(self, process: subprocess.Popen, outbox: queue.Queue) -> None:
        while True:
            header, arrays = outbox.get()
            try:
                _write_message(process.stdin, header, arrays)
            except (BrokenPipeError, OSError, ValueError):
                return
            if header["op"] == "shutdown":
                return

    def _reader(self, process: subprocess.Popen) -> None:
        while True:
            try:
                header, arrays = _read_message(process.stdout)
            except (EOFError, OSError, ValueError, struct.error):
                break
            self._handle(header, arrays)
        code = process.wait()
        if not self._ready.is_set():
            self._load_error = WorkerError(f"worker for model '{self.spec['model']}' exited with code {code} before loading it")
            self._ready.set()
        with self._lock:
            current = self._process is process
            if current:
                self._process = None
        if current:
            self._fail_pending(WorkerError(f"embedding worker exited unexpectedly (exit code {code})"))

    def _handle(self, header: dict, arrays: list[np.ndarray]) -> None:
        event = header.get("event")
        if event == "ready":
            self.model_info = header["info"]
            self.model_loads += header["loads"]  # counted over restarts, so a reload is visible
            self._ready.set()
            return
        if event == "load_error":
            self._load_error = ModelError(header["message"]) if header.get("kind") == "model" else WorkerError(header["message"])
            self._ready.set()
            return
        if event == "log":
            print(header.get("message", ""), file=self._log)
            return
        job = self._jobs.get(header.get("job"))
        if job is None:
            return
        if event == "started":
            job.started = time.monotonic()
            if job.state == "queued":
                job.state = "running"
        elif event == "progress":
            job.done = header["done"]
        elif event == "result":
            job.done = job.total
            job._finish("done", result=arrays[0])
        elif event == "cancelled":
            job._finish("cancelled", error=JobCancelled(f"job {job.id} cancelled after {job.done} of {job.total}"))
        elif event == "error":
            job._finish("failed", error=WorkerError(f"job {job.id} ({job.kind}, {job.total} items) failed in model "
                                                     f"'{self.spec['model']}': {header['message']}"))


# ===== the worker process ==========================================================================

def _serve(spec: dict) -> int:
    """The worker's main loop: load the model once, then run jobs until told to stop."""
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    protocol_in = sys.stdin.buffer
    jobs: queue.Queue = queue.Queue()
    cancelled: set[int] = set()

    def read_requests() -> None:
        while True:
            try:
                header, arrays = _read_message(protocol_in)
            except (EOFError, OSError, ValueError, struct.error):
                jobs.put(None)
                return
            if header["op"] == "cancel":
                cancelled.add(header["job"])
            elif header["op"] == "shutdown":
                jobs.put(None)
                return
            else:
                jobs.put((header, arrays))

    from .registry import create_embedder

    try:
        embedder = create_embedder(spec["model"], device=spec.get("device"), precision=spec.get("precision", "auto"),
                                   threads=spec.get("threads"))
    except Exception as error:  # report and exit: the parent raises it from wait_ready()
        kind = "model" if isinstance(error, ModelError) else "other"
        _write_message(protocol_out, {"event": "load_error", "kind": kind, "message": str(error)})
        return 1
    _write_message(protocol_out, {"event": "ready", "info": embedder.describe(), "loads": 1})
    threading.Thread(target=read_requests, daemon=True).start()

    while (item := jobs.get()) is not None:
        header, arrays = item
        job_id = header["job"]
        if job_id in cancelled:
            _write_message(protocol_out, {"event": "cancelled", "job": job_id})
            continue
        _write_message(protocol_out, {"event": "started", "job": job_id})
        def stop(job_id=job_id) -> bool:
            return job_id in cancelled

        def report(done: int, job_id=job_id) -> None:
            _write_message(protocol_out, {"event": "progress", "job": job_id, "done": done})

        try:
            vectors = _run_job(embedder, header, arrays, stop, report)
        except JobCancelled:
            _write_message(protocol_out, {"event": "cancelled", "job": job_id})
            continue
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            message = f"{type(error).__name__}: {error} (at {os.path.basename(where.filename)}:{where.lineno})"
            _write_message(protocol_out, {"event": "error", "job": job_id, "message": message})
            continue
        _write_message(protocol_out, {"event": "result", "job": job_id}, [vectors])
    return 0


def _run_job(embedder, header: dict, arrays: list[np.ndarray], stop, report) -> np.ndarray:
    """One job's vectors: phrases, a volume (3D models), regions pooled from dense grids, or images in adaptive batches."""
    if header["kind"] == "text":
        return embedder.embed_text(header["texts"])
    if header["kind"] == "volume":
        return embed_volume_job(embedder, header, arrays[0])
    if header["kind"] == "regions":
        return EmbeddingRequest(EmbeddingKind.REGIONS, images=arrays, boxes=[tuple(b) for b in header["boxes"]],
                                pixel_mm=header["pixel_mm"], cell_mm=header["cell_mm"], pooling=header["pooling"],
                                passes=header["passes"]).run(embedder)
    return _embed_adaptively(embedder, arrays, stop, report)


def embed_volume_job(embedder, header: dict, array: np.ndarray) -> np.ndarray:
    """A 3D model's query vector (1, dim) for a volume job: its ROI's, or the whole volume's."""
    from ..imaging.roi import RoiBox
    from ..imaging.volume import Volume

    if not embedder.embeds_volumes:
        raise ModelError(f"model '{embedder.name}' embeds 2D images, not volumes")
    roi = header.get("roi")
    return EmbeddingRequest(EmbeddingKind.VOLUME, volume=Volume.from_array(array, np.asarray(header["ijk_to_ras"], float)),
                            roi=RoiBox(tuple(roi[:3]), tuple(roi[3:])) if roi is not None else None).run(embedder)


def _embed_adaptively(embedder, images: list[np.ndarray], should_stop, report) -> np.ndarray:
    """Embed in batches sized to take about TARGET_BATCH_S each (first one image, to measure)."""
    from .base import check_images

    images = check_images(images)  # up front, so a bad image is reported by its place in the whole job
    out, start, batch = [], 0, 1
    last_report = 0.0
    while start < len(images):
        if should_stop():
            raise JobCancelled("cancelled")
        began = time.perf_counter()
        chunk = images[start:start + batch]
        out.append(embedder.embed_images(chunk, batch_size=len(chunk)))
        per_image = (time.perf_counter() - began) / len(chunk)
        start += len(chunk)
        batch = int(min(MAX_BATCH, max(1, TARGET_BATCH_S / max(per_image, 1e-6))))
        now = time.monotonic()
        if now - last_report > 0.1 or start == len(images):
            report(start)
            last_report = now
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
