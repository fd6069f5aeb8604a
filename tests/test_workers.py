"""--workers N: N serving processes on one port, stopped together by SIGTERM."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from testkit.mongo_server import REPO, free_port
from tests.support import deadlines


def test_two_workers_share_the_port_and_stop_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path), "HOST": "127.0.0.1", "PORT": str(port), "MONGODB_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--workers", "2"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # Both workers are up and each one has the port open (the other child is
        # multiprocessing's resource tracker).
        listening = deadlines.listening_children(proc.pid, port, 2)
        assert len(listening) == 2

        # Metrics add up over both workers, whichever one answers the scrape.
        for i in range(6):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/models", method="POST",
                                         data=b'{"name": "w%d", "algorithm": "xgb"}' % i)
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 201
        for _ in range(4):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert 'model_registrations_total{algorithm="xgb"} 6.0' in text
        # Request durations are tallied in each worker and reach the shared files within FLUSH_SECONDS.
        durations = 'api_request_duration_seconds_count{endpoint="/api/v1/models",method="POST",status="201"} 6.0'
        deadline = time.monotonic() + 10
        while durations not in text:
            assert time.monotonic() < deadline, "the workers' request durations never added up to 6"
            time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in listening)
    except BaseException:
        if proc.poll() is not None:
            print("service exited:", proc.returncode, proc.stderr.read().decode(errors="replace")[-3000:])
        raise
    finally:
        if proc.poll() is None:
            proc.kill()


def test_workers_fail_together_when_the_database_is_unreachable(tmp_path):
    env = {**os.environ, "MONGODB_URL": f"mongodb://127.0.0.1:{free_port()}/", "MONGODB_TIMEOUT_MS": "1000",
           "PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "app", "serve", "--workers", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot reach MongoDB" in proc.stderr
