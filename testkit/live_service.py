"""The service as a real process on a real 127.0.0.1 port, for tests that need
one: curl and wget as clients, memory measured from outside, faults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil

from .mongo_server import REPO, free_port, terminate


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
        status = terminate(proc, 15)
        self._log.close()
        return status


@contextmanager
def service_on(request, backend: str, work_dir: Path, db_prefix: str, **env: str):
    """A LiveService on ``backend`` with its data under ``work_dir``: yields
    (service, data_dir, mongo, db_name); stops it and drops its database after.

    ``request`` is the pytest request, for the session's ``mongo`` fixture.
    """
    env = {"DATA_DIR": str(work_dir / "data"), **env}
    mongo = db_name = None
    if backend == "mongodb":
        mongo = request.getfixturevalue("mongo")
        db_name = f"{db_prefix}_{uuid.uuid4().hex[:8]}"
        env.update(MONGODB_URL=mongo.url, MONGODB_DB=db_name)
        env.setdefault("MONGODB_TIMEOUT_MS", "3000")
    else:
        env["MONGODB_URL"] = ""
    service = LiveService(env, work_dir / "service.log")
    service.start()
    try:
        yield service, work_dir / "data", mongo, db_name
    finally:
        service.stop()
        if mongo is not None and (mongo.server is None or mongo.server.running):
            with mongo.sync_client() as c:
                c.drop_database(db_name)


@contextmanager
def processes_on_one_data_dir(work: Path, n: int, **env: str):
    """``n`` separate service processes (not WORKERS) on one embedded DATA_DIR, ``work/data``; stopped after."""
    env = {"DATA_DIR": str(work / "data"), "MONGODB_URL": "", **env}
    started: list[LiveService] = []
    try:
        for i in range(n):
            service = LiveService(env, work / f"service{i}.log")
            service.start()
            started.append(service)
        yield started
    finally:
        for service in started:
            service.stop()
