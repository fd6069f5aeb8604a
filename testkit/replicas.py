"""Several service processes on one MongoDB database, with nginx round-robin in front.

What a Kubernetes Deployment of the service looks like, on 127.0.0.1: N
separate ``python -m app serve`` processes (not WORKERS of one), each on its
own port with its own DATA_DIR, all on one MongoDB database, and nginx as the
load balancer (streaming both ways: no request or response buffering, HTTP/1.1
keepalive to the replicas). A replica can be SIGKILLed and started again on
its port; nginx keeps sending to it once it answers again.

Used by tests/test_replicas.py and bench's "replicas" scenario.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .live_service import LiveService
from .peer import NginxProcess


class BalancerUnavailable(RuntimeError):
    """nginx is not installed here."""


BALANCER_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format upstream '$status $upstream_addr $request_method $uri';
    access_log {dir}/access.log upstream;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream replicas {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port}{listen_options};
        client_max_body_size 0;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # Stream both ways, as an ingress in front of model uploads and downloads must.
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


class Balancer(NginxProcess):
    """nginx round-robin over ``ports`` on 127.0.0.1.

    ``client_sndbuf`` (e.g. "64k") caps the socket buffer towards clients, so that a client that stops
    reading stops nginx, and the replica behind it, soon after (tests of what happens mid-stream).
    """

    def __init__(self, work: Path, ports: list[int], workers: int = 1, client_sndbuf: str | None = None) -> None:
        super().__init__(work / "nginx-balancer", "the replicas tests and bench need nginx as the load balancer "
                                                  "(Debian: apt-get install -y nginx-light; make bench-tools)")
        # A replica that refused a connection is skipped for a second only: a restarted one is back at once.
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in ports)
        self.write_conf(BALANCER_CONF.format(
            workers=workers, dir=self.dir, port=self.port, servers=servers,
            listen_options=f" sndbuf={client_sndbuf}" if client_sndbuf else ""))

    @staticmethod
    def unavailable(message: str) -> Exception:
        return BalancerUnavailable(message)

    def start(self, timeout: float = 15.0) -> "Balancer":
        self.launch_nginx(timeout)
        return self

    def requests(self) -> list[tuple[str, str, str, str]]:
        """(status, replica 127.0.0.1:port, method, path) of each request so far, in the order they ended."""
        path = self.dir / "access.log"
        if not path.exists():
            return []
        return [tuple(line.split()) for line in path.read_text(errors="replace").splitlines()
                if len(line.split()) == 4]


class Replicas:
    """N service processes on one MongoDB database (``mongo_url``, ``db_name``) and a Balancer in front.

    ``env`` is added to every replica's environment (it may override the defaults below);
    ``balancer_sndbuf`` is the Balancer's ``client_sndbuf``.
    """

    def __init__(self, n: int, mongo_url: str, db_name: str, work: Path, env: dict[str, str] | None = None,
                 balancer_workers: int = 1, balancer_sndbuf: str | None = None) -> None:
        self.work = work
        base = {
            "MONGODB_URL": mongo_url, "MONGODB_DB": db_name, "MONGODB_TIMEOUT_MS": "5000",
            # Short, so that a killed replica's leases expire within a test (issue 16's setting).
            "LEASE_TTL": "3",
            "LOG_LEVEL": "WARNING", "WORKERS": "1",
            # Behind the balancer every client has its address: no per-client caps, no rate limits.
            "MAX_UPLOADS_PER_CLIENT": "0", "MAX_CONCURRENT_UPLOADS": "0", "RATE_LIMIT": "",
            "DOWNLOAD_RATE_LIMIT": "", "ENABLE_AUTH": "false",
        }
        self.replicas: list[LiveService] = []
        for i in range(n):
            data = work / f"replica{i}"
            data.mkdir(parents=True, exist_ok=True)
            self.replicas.append(LiveService({**base, "DATA_DIR": str(data / "data"), **(env or {})},
                                             data / "service.log"))
        self.balancer = Balancer(work, [r.port for r in self.replicas], balancer_workers, balancer_sndbuf)

    @property
    def url(self) -> str:
        """The balancer's URL."""
        return self.balancer.url

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def start(self, timeout: float = 60.0) -> "Replicas":
        try:
            # The first one alone sets the database up (indexes); the others then start together.
            self.replicas[0].start(timeout)
            self._start(range(1, len(self.replicas)), timeout)
            self.balancer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, indexes, timeout: float) -> None:
        indexes = list(indexes)
        if not indexes:
            return
        with ThreadPoolExecutor(len(indexes)) as pool:
            for f in [pool.submit(self.replicas[i].start, timeout) for i in indexes]:
                f.result()

    def running(self, i: int) -> bool:
        return self.replicas[i]._proc is not None and self.replicas[i]._proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL replica i (by its PID): no drain, no clean-up, its leases left behind."""
        replica = self.replicas[i]
        os.kill(replica.pid, signal.SIGKILL)
        replica.wait(10)

    def stop_replica(self, i: int) -> int | None:
        """SIGTERM replica i: its graceful shutdown."""
        return self.replicas[i].stop()

    def restart(self, *indexes: int, timeout: float = 60.0) -> None:
        """Start the given (stopped or killed) replicas again, on their ports."""
        self._start(indexes, timeout)

    def logs(self) -> str:
        return "\n".join(f"--- replica {i} ({r.url}) ---\n{r.log()}" for i, r in enumerate(self.replicas)
                         if r.log_path.exists())

    def stop(self) -> None:
        self.balancer.stop()
        for r in self.replicas:
            r.stop()
