"""How background work reports where it stands: one ``poll() -> Progress`` for index builds, searches, placements and
the embedding worker's jobs, polled from a timer on the caller's thread (the module's QTimer), never blocking it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    """Where a piece of background work stands (a ``str``, so it prints and compares as its value)."""

    QUEUED = "queued"  # waiting for the worker
    STARTING = "starting"  # its process is starting
    LOADING_MODEL = "loading model"  # the worker loads the model (once per session)
    RUNNING = "running"  # embedding, indexing or placing
    STOPPING = "stopping"  # asked to stop, finishing what is in hand
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({State.DONE, State.FAILED, State.CANCELLED})


@dataclass(frozen=True)
class Progress:
    """A snapshot: the state, items done of total, the item in hand, rate (items per second), seconds left, and why it
    failed or stopped."""

    state: State
    done: int = 0
    total: int = 0
    label: str = ""
    rate: float = 0.0
    eta_s: float | None = None
    message: str = ""

    @property
    def finished(self) -> bool:
        """Whether the work has ended (done, failed or cancelled)."""
        return self.state in FINAL

    @classmethod
    def timed(cls, state: State, done: int, total: int, since: float | None, until: float | None = None, label: str = "",
              message: str = "") -> Progress:
        """A snapshot with the rate since ``since`` (a ``time.monotonic()``; None: not begun) up to ``until`` (the end,
        or now), and, while the work runs, the seconds left at that rate."""
        rate, eta = 0.0, None
        if since is not None and done:
            rate = done / max((until or time.monotonic()) - since, 1e-9)
            eta = (total - done) / rate if state not in FINAL and rate > 0 else None
        return cls(state, done, total, label, rate, eta, message)


class PendingCall:
    """A function run on a background thread and polled like any background work.

    The function is called with this object: it may say how far it is (:meth:`report`) and should stop when
    :meth:`stopping` says so (:meth:`cancel`). Its value is :attr:`value`, or its exception :attr:`error`. For work that
    releases the GIL (file and network reading, SimpleITK), so the caller's thread (the GUI's) stays responsive.
    """

    def __init__(self, function, name: str = "cbir-call"):
        import threading

        self.value = None
        self.error: BaseException | None = None
        self._done, self._total, self._label = 0, 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True, name=name)
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self.value = function(self)
        except Exception as error:  # kept for the caller's thread, which reads it from poll() or result()
            self.error = error

    def report(self, done: int, total: int | None = None, label: str = "") -> None:
        """How far the work is (called from its thread)."""
        self._done, self._total, self._label = int(done), int(total or 0), label

    def stopping(self) -> bool:
        """Whether the caller asked the work to stop."""
        return self._stop.is_set()

    def cancel(self) -> None:
        """Ask the work to stop (it does when it next looks at :meth:`stopping`)."""
        self._stop.set()

    @property
    def finished(self) -> bool:
        """Whether the function has returned or raised."""
        return not self._thread.is_alive()

    def poll(self) -> Progress:
        """Running (with what it reported), then done, failed (``message``: the error) or cancelled."""
        if not self.finished:
            return Progress(State.STOPPING if self.stopping() else State.RUNNING, self._done, self._total, self._label)
        if self.error is not None:
            state = State.CANCELLED if self.stopping() else State.FAILED
            return Progress(state, self._done, self._total, self._label, message=str(self.error))
        return Progress(State.DONE, self._done, self._total, self._label)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the function has ended (scripts and tests); whether it has."""
        self._thread.join(timeout)
        return self.finished

    def result(self):
        """The function's value, or its exception raised here (call once finished)."""
        if self.error is not None:
            raise self.error
        return self.value
