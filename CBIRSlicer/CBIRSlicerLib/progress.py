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
