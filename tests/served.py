"""A real ``reid serve`` process for the tests: started on a free loopback port, waited for until ready,
stopped by its pid (SIGTERM to drain, SIGKILL to crash)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REID = Path(sys.executable).with_name("reid")
STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``reid serve --index INDEX ARGS`` on 127.0.0.1; ``url``, ``client()``, ``stop()`` / ``kill()``."""

    def __init__(self, index: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(index).with_name(f"serve-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([str(REID), "serve", "--index", str(index), "--port", str(self.port), *args],
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"reid serve exited with {self.process.returncode}: {self.log()}")
            try:
                reply = httpx.get(f"{self.url}/health/ready", timeout=2)
            except httpx.TransportError:
                reply = None
            if reply is not None and reply.status_code == 200:
                return
            if reply is not None and reply.json().get("error") != "loading":
                self.kill()
                raise AssertionError(f"reid serve failed to open: {reply.json()['error']}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"reid serve was not ready within {STARTUP_S} s: {self.log()}")

    def client(self, token: str | None = None):
        from reid_deploy.client import SearchClient

        return SearchClient(self.url, token)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain), then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, ids: int, seed: int) -> np.ndarray:
    """Unit features in identity clusters (non-trivial reciprocal sets)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim))
    return unit_rows(centers[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, dim)))
