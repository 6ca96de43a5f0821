"""A Milvus server for tests: milvus-lite's gRPC server in a child process on 127.0.0.1, stopped, killed and restarted
on the same port and data folder (what a department's Milvus does when it is upgraded or crashes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port nothing listens on now (on 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MilvusServer:
    """``milvus-lite server --data-dir DATA --host 127.0.0.1 --port PORT`` as a child process."""

    def __init__(self, data: str, port: int | None = None):
        self.data, self.port = str(data), port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MilvusServer:
        """Start it and wait until it answers."""
        environment = {**os.environ, "GRPC_VERBOSITY": "NONE"}
        self.process = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", self.data, "--host",
                                         "127.0.0.1", "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=environment)
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"milvus-lite server did not answer on {self.address} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: what a crash does (no flush, no goodbye)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL if it lingers)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
