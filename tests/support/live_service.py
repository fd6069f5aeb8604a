"""The service as a real process on a real 127.0.0.1 port, for tests that need
one: curl and wget as clients, memory measured from outside, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from .mongo_server import REPO, free_port


class LiveService:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO, env=self._env,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"service did not start; log:\n{self.log()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit status."""
        status = self._proc.wait(timeout)
        self.stop()
        return status

    def stop(self) -> int | None:
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()
        return proc.returncode
