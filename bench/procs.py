"""The processes a bench run starts: the service, nginx, the test MongoDB server, the client.

The service is started with testkit/live_service.LiveService (``python -m
app serve`` on a free 127.0.0.1 port, configured by environment variables, so
``WORKERS`` and ``GRIDFS_CHUNK_SIZE`` reach it the way an operator would set
them). The MongoDB server is testkit/mongo_server.MongoTestServer unless
``MONGODB_URL`` is set. Memory and CPU are read from outside, over the
service's whole process tree (the supervisor and its workers with --workers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from testkit.live_service import LiveService
from testkit.mongo_server import REPO, MongoTestServer
from testkit.peer import NginxProcess, PeerProcess, nginx_binary

# -- memory and CPU of a process tree --------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum of RSS over the tree, largest single process RSS)."""
    total = largest = 0
    for p in _tree(pid):
        try:
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


class Sampler:
    """Samples a process tree's RSS every `interval` s while a measurement runs; CPU by difference."""

    def __init__(self, pid: int | None, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak_total = self.peak_process = self.start_total = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Sampler":
        if self.pid is None:
            return self
        self.start_total, _ = tree_rss(self.pid)
        self._cpu0 = tree_cpu_seconds(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            total, largest = tree_rss(self.pid)
            self.peak_total = max(self.peak_total, total)
            self.peak_process = max(self.peak_process, largest)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.pid is None:
            return
        self._stop.set()
        self._thread.join()
        total, largest = tree_rss(self.pid)
        self.peak_total = max(self.peak_total, total)
        self.peak_process = max(self.peak_process, largest)
        self.cpu_s = tree_cpu_seconds(self.pid) - self._cpu0

    def figures(self) -> dict:
        if self.pid is None:
            return {}
        mb = 1024 * 1024
        return {"rss_peak_mb": self.peak_total / mb, "rss_peak_process_mb": self.peak_process / mb,
                "rss_start_mb": self.start_total / mb, "cpu_s": self.cpu_s}


# -- CPU placement ---------------------------------------------------------------------------

# With one server process on a 2-core machine, where the scheduler happens to
# put the server and the client (same core or not) swings a single stream by
# 2x from one run to the next. So, for single-process servers (the service
# with 1 worker, nginx with 1 worker), the server is pinned to core 0 and the
# client to the other cores: each side gets one core, the same for ours and
# the peer. With more workers nothing is pinned.
client_cpus: set[int] | None = None


def pinning_possible() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


def server_cpus() -> set[int]:
    return {0}


def other_cpus() -> set[int]:
    return set(range(1, os.cpu_count() or 2))


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process tree (threads started later inherit it)."""
    for p in _tree(pid):
        try:
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except (ProcessLookupError, PermissionError):
                    pass
        except FileNotFoundError:
            pass


def client_preexec():
    cpus = client_cpus
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


# -- the client process -----------------------------------------------------------------


def run_client(job: dict, sample_pid: int | None, timeout: float = 1800) -> tuple[dict, dict]:
    """Run one job in a fresh client process while sampling `sample_pid`; (result, figures)."""
    # The result goes to a file, not stdout: it can be megabytes of records.
    fd, out_path = tempfile.mkstemp(prefix="bench-client-", suffix=".json")
    os.close(fd)
    try:
        with Sampler(sample_pid) as sampler:
            proc = subprocess.run([sys.executable, "-m", "bench.client", out_path], input=json.dumps(job), cwd=REPO,
                                  capture_output=True, text=True, timeout=timeout, preexec_fn=client_preexec())
        text = Path(out_path).read_text()
    finally:
        os.unlink(out_path)
    if proc.returncode != 0 or not text.strip():
        result = {"wall": 0.0, "records": [],
                  "job_error": f"client exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    else:
        result = json.loads(text)
    return result, sampler.figures()


# -- the service -------------------------------------------------------------------------


class Endpoint:
    """Where the service answers on 127.0.0.1: one instance, or a balancer in front of several."""

    def __init__(self, url: str, port: int, pid: int | None = None) -> None:
        self.url, self.port, self._pid = url, port, pid

    @property
    def pid(self) -> int | None:
        return self._pid

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def raw_get(self, path: str, timeout: float = 120) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


class Service(Endpoint):
    """One service instance (backend, workers, chunk size), started with LiveService."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int) -> None:
        self.workers = workers
        env = {"LOG_LEVEL": "WARNING", "WORKERS": str(workers), **env}
        self.live = LiveService(env, log_path)
        super().__init__(self.live.url, self.live.port)

    def start(self, pin: bool = False) -> "Service":
        self.live.start(timeout=60)
        if self.workers > 1:
            self._wait_for_workers()
        if pin:
            pin_tree(self.pid, server_cpus())
        return self

    def _wait_for_workers(self, timeout: float = 30.0) -> None:
        # /health answers as soon as the first worker listens; wait for all of them.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listening = 0
            for p in _tree(self.pid)[1:]:
                try:
                    if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                           for c in p.net_connections("tcp")):
                        listening += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if listening >= self.workers:
                return
            time.sleep(0.1)
        raise RuntimeError(f"only some of {self.workers} workers are listening after {timeout} s")

    @property
    def pid(self) -> int:
        return self.live.pid

    def stop(self) -> None:
        self.live.stop()


def service_capabilities() -> dict:
    """What this checkout of the service supports (the bench adapts rather than guesses)."""
    from dataclasses import fields

    from app.config import Settings

    names = {f.name for f in fields(Settings)}
    return {"workers": "workers" in names, "gridfs_chunk_size": "gridfs_chunk_size" in names}


# -- nginx -------------------------------------------------------------------------------------


NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /files/ {{ alias {files}/; }}
        location /meta/ {{ alias {meta}/; default_type application/json; }}
        location /upload/ {{
            alias {upload}/;
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
    }}
}}
"""


def nginx_version() -> str:
    binary = nginx_binary()
    if not binary:
        return "missing"
    proc = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (proc.stderr or proc.stdout).strip().split("/")[-1]


class Nginx(NginxProcess):
    """nginx serving the bench's files with sendfile: the HTTP file-serving ceiling (a peer)."""

    def __init__(self, work: Path, files_dir: Path, workers: int, pin: bool = False) -> None:
        super().__init__(work / f"nginx-w{workers}", "nginx is not installed (Debian: apt-get install -y nginx-light)")
        self.pin, self.workers = pin, workers
        self.meta_dir = work / "meta"
        self.upload_dir = work / f"nginx-upload-w{workers}"
        for d in (self.meta_dir, self.upload_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Workers run as nobody when nginx starts as root: they must read the files and write uploads.
        for d in (work, files_dir, self.meta_dir):
            d.chmod(0o755)
        self.upload_dir.chmod(0o777)
        self.write_conf(NGINX_CONF.format(
            workers=workers, dir=self.dir, port=self.port, files=files_dir, meta=self.meta_dir,
            upload=self.upload_dir))

    def start(self) -> "Nginx":
        def pin() -> None:
            if self.pin:
                time.sleep(0.3)  # let the master fork its worker first
                pin_tree(self.pid, server_cpus())
        self.launch_nginx(on_listening=pin)
        return self


class Floor(PeerProcess):
    """bench/floor.py: a bare aiohttp-on-uvloop app returning the service's bytes pre-serialized (a peer)."""

    name = "bench.floor"

    def __init__(self, work: Path, models: dict[str, bytes], listing: bytes, file: Path, pin: bool = False) -> None:
        super().__init__()
        self.dir = work / f"floor-{os.urandom(2).hex()}"
        (self.dir / "models").mkdir(parents=True)
        paths = {}
        for mid, body in models.items():
            paths[mid] = str(self.dir / "models" / f"{mid}.json")
            Path(paths[mid]).write_bytes(body)
        (self.dir / "list.json").write_bytes(listing)
        self.spec = self.dir / "spec.json"
        self.spec.write_text(json.dumps({"port": self.port, "models": paths, "list": str(self.dir / "list.json"),
                                         "file": str(file)}))
        self.pin = pin

    def start(self) -> "Floor":
        log = self.dir / "floor.log"
        self.launch([sys.executable, "-m", "bench.floor", str(self.spec)], log, 30,
                    lambda: log.read_text(errors="replace"), cwd=REPO,
                    on_listening=self._pin)
        return self

    def _pin(self) -> None:
        if self.pin:
            pin_tree(self.pid, server_cpus())


# -- MongoDB -------------------------------------------------------------------------------------


@dataclass
class Mongo:
    url: str
    server: MongoTestServer | None = None
    kind: str = "ferretdb-test-server"
    dbs: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> "Mongo":
        url = os.environ.get("MONGODB_URL")
        if url:
            return cls(url, None, "MONGODB_URL")
        server = MongoTestServer()
        server.start()
        return cls(server.url, server)

    @property
    def is_test_server(self) -> bool:
        return self.server is not None

    def sync_client(self):
        from pymongo import MongoClient

        return MongoClient(self.url, serverSelectionTimeoutMS=10000)

    def drop(self, db_name: str) -> None:
        with self.sync_client() as c:
            c.drop_database(db_name)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
