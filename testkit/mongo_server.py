"""The test MongoDB server: FerretDB embedded in a small Go program (tests/mongo_server).

Built with the machine's Go on first use and cached under .cache/; started on a
free 127.0.0.1 port with its SQLite files in a temporary folder. ``stop`` and
``start`` keep the port and the data, so fault tests can take the database away
for real and bring it back where the service expects it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO / "tests" / "mongo_server"
BINARY = REPO / ".cache" / "mongo-test-server"


class ServerUnavailable(RuntimeError):
    """The test server could not be built or started here."""


def _newest_source_mtime() -> float:
    return max(p.stat().st_mtime for p in SOURCE_DIR.iterdir() if p.suffix in (".go", ".mod", ".sum"))


def build() -> Path:
    """Build the server binary if it is missing or older than its sources."""
    if BINARY.exists() and BINARY.stat().st_mtime >= _newest_source_mtime():
        return BINARY
    go = shutil.which("go")
    if go is None:
        raise ServerUnavailable("Go is not installed, so the FerretDB test server cannot be built")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    tmp = BINARY.with_suffix(".tmp")
    proc = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=SOURCE_DIR, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServerUnavailable(f"go build of the FerretDB test server failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, BINARY)
    return BINARY


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MongoTestServer:
    def __init__(self) -> None:
        self.binary = build()
        self.port = free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="ferretdb-"))
        self.url = f"mongodb://127.0.0.1:{self.port}/"
        self._proc: subprocess.Popen | None = None
        self._log = open(self.data_dir / "server.log", "ab")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [str(self.binary), "-addr", f"127.0.0.1:{self.port}", "-dir", str(self.data_dir / "db")],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout
        line = self._proc.stdout.readline().decode()
        if not line.startswith("ready ") or time.monotonic() > deadline:
            self.stop()
            raise ServerUnavailable(f"FerretDB test server did not start: {line!r}; see {self._log.name}")

    def stop(self) -> None:
        """Stop the server for real (SIGTERM, then SIGKILL); its data stays."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        terminate(proc, 10)
        if proc.stdout:
            proc.stdout.close()

    def close(self) -> None:
        self.stop()
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
