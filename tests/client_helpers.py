"""Shared by test_client.py and test_client_cli.py: the service as a real process
on each backend, the CLI as a real process, counting requests from the
service's access log, and changing a stored file behind the service's back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from bson import Binary

from testkit.files import sha256_of, write_random  # noqa: F401  (re-exported)
from testkit.live_service import LiveService, service_on
from testkit.mongo_server import REPO
from tests.conftest import BACKENDS


class ClientLive:
    """A running service, with views of its access log and its store from outside."""

    def __init__(self, service: LiveService, backend: str, data_dir: Path, mongo=None, db_name=None) -> None:
        self.service, self.backend, self.data_dir = service, backend, data_dir
        self.mongo, self.db_name = mongo, db_name
        self.url = service.url

    def log_offset(self) -> int:
        """Where the log ends once the requests made so far are all in it."""
        return len(self._settled_log())

    def requests(self, since: int, path_contains: str = "") -> list[tuple[str, str, int]]:
        """(method, path, status) of the requests logged after ``since``, in order."""
        text = self._settled_log()
        out = []
        for line in text[since:].splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if entry.get("logger") == "app.access" and path_contains in entry["path"]:
                out.append((entry["method"], entry["path"], entry["status"]))
        return out

    def _settled_log(self, settle: float = 0.3) -> str:
        # The service logs a request when its response is done, which can be
        # a moment after the client has seen the response: wait until the log
        # stops growing.
        last = -1
        deadline = time.monotonic() + 5
        while True:
            text = self.service.log()
            if len(text) == last or time.monotonic() > deadline:
                return text
            last = len(text)
            time.sleep(settle)

    def tamper(self, sha256: str) -> None:
        """Change stored bytes of a file without the service knowing (same length, new content)."""
        if self.backend == "embedded":
            blob = self.data_dir / "blobs" / sha256[:2] / sha256
            with open(blob, "r+b") as f:
                f.seek(1000)
                byte = f.read(1)
                f.seek(1000)
                f.write(bytes([byte[0] ^ 0xFF]))
            return
        with self.mongo.sync_client() as c:
            db = c[self.db_name]
            files = db["models.files"].find_one({"metadata.sha256": sha256})
            chunk = db["models.chunks"].find_one({"files_id": files["_id"], "n": 0})
            data = bytearray(chunk["data"])
            data[1000] ^= 0xFF
            db["models.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": Binary(bytes(data))}})

    def cli_env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "MODEL_SERVICE_URL": self.url, **extra}

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """Run ``model-service ARGS`` as its own process (stdout is not a terminal)."""
        return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd or REPO, env=self.cli_env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def cli_popen(self, *args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=cwd or REPO, env=self.cli_env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module", params=BACKENDS)
def live(request, tmp_path_factory):
    """The service as a real process on each backend, shared by a test module."""
    backend = request.param
    work = tmp_path_factory.mktemp(f"client-{backend}")
    with service_on(request, backend, work, "t_client", MAX_FILE_SIZE="1GB", LOG_LEVEL="INFO", LOG_FORMAT="json",
                    WORKERS="1") as (service, data_dir, mongo, db_name):
        yield ClientLive(service, backend, data_dir, mongo, db_name)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
