"""Building or extending an index in a separate process, for the GUI: progress, rate, time left, cancel.

The child runs :meth:`Index.add_sources` (reading, slicing, embedding, writing) and reports one
JSON line per event on its own protocol stream; the parent only runs a thread that reads those
lines, so nothing the GUI owns is touched off its thread and a timer can poll :meth:`IndexBuild.poll`.
Cancel asks the child to stop after the case in hand; if it has not stopped within
``HARD_STOP_S`` (a large case with a slow model) it is killed, which the index is built to
survive: complete cases stay, the unfinished one is purged by the next writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from ..processes import in_thread, start_module, wait_or_kill
from ..progress import FINAL, Progress, State
from .writer import BuildReport

HARD_STOP_S = 10.0


@dataclass
class BuildSpec:
    """What to build: the index folder, the sources, and (for a new index) the model and slicing settings."""

    folder: str
    sources: list[str]
    model: str = "biomedclip"
    settings: dict = field(default_factory=dict)  # IndexSettings fields; empty: the defaults
    index_type: str = "auto"
    device: str | None = None
    dicom: dict = field(default_factory=dict)  # DICOM database / PACS sources: modalities, date_from, date_to, body_part


class IndexBuild:
    """One build in a child process; ``poll()`` from a timer, ``cancel()``, then ``report`` (typed) or ``error``."""

    def __init__(self, spec: BuildSpec, python: str | None = None):
        self.spec = spec
        self.python = python or sys.executable
        self.state = State.STARTING
        self.done = self.total = 0
        self.label = ""
        self.report: BuildReport | None = None
        self.error: str | None = None
        self.log: list[str] = []
        self._process: subprocess.Popen | None = None
        self._first_case: float | None = None
        self._finished: float | None = None

    def start(self) -> IndexBuild:
        """Start the child process; returns at once."""
        self._process = start_module(self.python, "index.background_build", asdict(self.spec))
        in_thread(self._read_events, name="cbir-build-events")
        in_thread(self._read_log, name="cbir-build-log")
        return self

    @property
    def finished(self) -> bool:
        """Whether the build has ended (done, failed or cancelled)."""
        return self.state in FINAL

    def poll(self) -> Progress:
        """A snapshot for the progress bar (safe from any thread): cases done of total, the case in hand, rate, time left."""
        return Progress.timed(self.state, self.done, self.total, self._first_case, self._finished, self.label, self.error or "")

    def cancel(self) -> None:
        """Ask the build to stop after the current case; kill it if it has not within HARD_STOP_S (from a later call)."""
        if self.finished or self._process is None:
            return
        self.state = State.STOPPING
        try:
            self._process.stdin.write(b"stop\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        in_thread(wait_or_kill, self._process, HARD_STOP_S, name="cbir-build-stop")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build ends (scripts and tests); True if it did."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def _read_log(self) -> None:
        for line in self._process.stderr:
            self.log.append(line.decode(errors="replace").rstrip())

    def _read_events(self) -> None:
        for line in self._process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self._handle(event)
        code = self._process.wait()
        self._finished = time.monotonic()
        if not self.finished:
            stopped = self.state == State.STOPPING
            self.state = State.CANCELLED if stopped else State.FAILED
            if not stopped:
                tail = "; ".join(self.log[-3:])
                self.error = f"the index build exited with code {code}" + (f": {tail}" if tail else "")

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            if self._first_case is None:
                self._first_case = time.monotonic()
            self.done, self.total, self.label = event["done"], event["total"], event["label"]
            if self.state == State.STARTING:
                self.state = State.RUNNING
        elif kind == "report":
            fields = event["report"]  # a BuildReport as JSON: its (path, reason) pairs came back as lists
            self.report = BuildReport(**{**fields, "skipped": [tuple(pair) for pair in fields.get("skipped", [])]})
            self._finished = time.monotonic()
            self.state = State.CANCELLED if self.state == State.STOPPING else State.DONE
        elif kind == "error":
            self.error = event["message"]
            self._finished = time.monotonic()
            self.state = State.FAILED


# ===== the child process ===========================================================================

def _dicom_options(given: dict):
    """The series filter of a DICOM database or PACS build, from the spec's plain fields."""
    from .dicom_sources import DicomOptions
    from .dicomweb_listing import SeriesFilter

    return DicomOptions(SeriesFilter(tuple(given.get("modalities") or ()), given.get("date_from"), given.get("date_to"),
                                     given.get("body_part")))


def _run(spec: dict) -> int:
    """Build as asked, reporting progress as JSON lines on the original stdout; everything printed goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    stop = threading.Event()

    def emit(event: dict) -> None:
        protocol.write(json.dumps(event) + "\n")

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()  # "stop", or the parent has gone

    threading.Thread(target=watch_stdin, daemon=True).start()
    from ..errors import CBIRError
    from ..models.registry import create_embedder
    from .first_build import undone_if_empty
    from .items import IndexSettings
    from .location import create_index, index_exists, open_index

    try:
        exists = index_exists(spec["folder"])  # a folder, or a Milvus location
        # A first build that ends without a case leaves nothing behind (first_build.py), as the CLI's does.
        with contextlib.nullcontext() if exists else undone_if_empty(spec["folder"]):
            if exists:
                index = open_index(spec["folder"], writable=True)
                embedder = create_embedder(index.model_name(), device=spec.get("device"))
            else:
                embedder = create_embedder(spec["model"], device=spec.get("device"))
                index = create_index(spec["folder"], embedder, IndexSettings(**spec.get("settings", {})), spec.get("index_type", "auto"))
            with index:
                report = index.add_sources(spec["sources"], embedder, should_stop=stop.is_set,
                                           dicom=_dicom_options(spec.get("dicom") or {}),
                                           progress=lambda done, total, label: emit({"event": "progress", "done": done,
                                                                                     "total": total, "label": label}))
    except CBIRError as error:
        emit({"event": "error", "message": str(error)})
        return 1
    emit({"event": "report", "report": asdict(report)})
    return 0


if __name__ == "__main__":
    sys.exit(_run(json.loads(sys.argv[1])))
