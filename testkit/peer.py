"""A helper process on 127.0.0.1 that tests and the bench start, wait for and stop: nginx (as a file
server or a load balancer), bench/floor.py.

One place says how such a process is launched (its output to a log file), when it counts as up (it
accepts a connection on its port; it exiting first is an error quoting its log) and how it is stopped
(SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from .mongo_server import free_port, terminate


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.path.exists(p)), None)


class PeerProcess:
    """A process listening on ``self.port``, started by ``launch``."""

    name = "process"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def launch(self, argv: list[str], log_path: Path, timeout: float, failure_log: Callable[[], str],
               cwd: Path | None = None, on_listening: Callable[[], None] | None = None) -> None:
        """Start ``argv`` and return once it accepts connections; RuntimeError (with ``failure_log()``'s
        tail) if it exits first, or if it is not listening within ``timeout`` seconds (it is stopped then)."""
        self._log = open(log_path, "ab")
        self._proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = failure_log()[-2000:]
                self.stop()
                raise RuntimeError(f"{self.name} exited: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if on_listening is not None:
                on_listening()
            return
        self.stop()
        raise RuntimeError(f"{self.name} did not start listening within {timeout:g} s")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        terminate(proc, 10)  # SIGTERM (nginx: its fast shutdown of master and workers)
        self._log.close()


class NginxProcess(PeerProcess):
    """nginx run from its own directory ``dir`` with ``dir/nginx.conf``, its error log in ``dir/error.log``."""

    name = "nginx"

    def __init__(self, dir: Path, missing: str) -> None:
        super().__init__()
        binary = nginx_binary()
        if binary is None:
            raise self.unavailable(missing)
        self.binary = binary
        self.dir = dir
        self.dir.mkdir(parents=True, exist_ok=True)
        # Workers run as nobody when nginx starts as root: they write body temp files here.
        self.dir.chmod(0o777)

    @staticmethod
    def unavailable(message: str) -> Exception:
        return RuntimeError(message)

    def write_conf(self, text: str) -> None:
        (self.dir / "nginx.conf").write_text(text)

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def launch_nginx(self, timeout: float = 15.0, on_listening: Callable[[], None] | None = None) -> None:
        self.launch([self.binary, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir),
                     "-e", str(self.dir / "error.log")], self.dir / "stderr.log", timeout, self.error_log,
                    on_listening=on_listening)
