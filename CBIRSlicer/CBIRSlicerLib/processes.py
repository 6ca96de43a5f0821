"""Library modules run in child processes: the embedding worker and the background index build share this.

A child is the same interpreter (or Slicer's ``PythonSlicer``) running ``python -m CBIRSlicerLib.<module>``
with the library's folder on ``PYTHONPATH``, so it works from a Slicer module folder that is not installed.
Its output streams are read on daemon threads (the GUI thread never blocks on a pipe), and stopping it
asks first and kills after a grace period.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable

LIBRARY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds CBIRSlicerLib


def child_environment() -> dict:
    """This process's environment with the library's folder first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (LIBRARY_ROOT, env.get("PYTHONPATH")) if p)
    return env


def start_module(python: str, module: str, spec: dict, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start ``python -m CBIRSlicerLib.<module> '<spec as JSON>'`` with pipes for stdin and stdout; returns at once."""
    return subprocess.Popen([python, "-m", f"CBIRSlicerLib.{module}", json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr, env=child_environment(), bufsize=0)


def in_thread(target: Callable, *args, name: str) -> threading.Thread:
    """Run ``target(*args)`` on a started daemon thread (stream readers, writers, watchdogs)."""
    thread = threading.Thread(target=target, args=args, daemon=True, name=name)
    thread.start()
    return thread


def wait_or_kill(process: subprocess.Popen, timeout: float) -> int:
    """Wait up to ``timeout`` seconds for the child to exit, then kill it; returns its exit code."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
