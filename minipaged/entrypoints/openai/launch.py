"""Start an OpenAI-compatible server as a subprocess and wait until it answers (tests, benchmarks, notebook)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's pick for a throwaway socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def minipaged_command(port: int, *extra: str, python: str = sys.executable) -> list[str]:
    """The command line of ``python -m minipaged serve`` on loopback ``port``."""
    return [python, "-m", "minipaged", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set size (``VmHWM`` in /proc/PID/status), or None where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class ServerProcess:
    """A server subprocess; ``base_url`` is its root (``http://127.0.0.1:PORT``).

    Output goes to ``log_path`` (read it when start-up fails). Use as a context manager, or call
    ``start()`` / ``stop()``.
    """

    command: Sequence[str]
    base_url: str
    health_path: str = "/health"
    log_path: Path | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self, timeout: float = 300.0) -> ServerProcess:
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, **(self.env or {}))
        # A process group of its own, so stop() also reaches any workers the server spawns.
        self.proc = subprocess.Popen(
            list(self.command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + self.health_path, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return "(no log)"
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss_bytes(self) -> int | None:
        return peak_rss_bytes(self.proc.pid)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
