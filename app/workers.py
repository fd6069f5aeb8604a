"""Several serving processes on one port (``WORKERS`` / ``--workers``).

Each worker is a fresh interpreter (spawn, not fork: an event loop and a
MongoDB client must not be inherited) binding the same port with SO_REUSEPORT.
The supervisor forwards SIGTERM/SIGINT to the workers and exits with the
first non-zero status any of them had, so a worker that cannot reach the
database makes the whole service fail at start-up, as one process would.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable

from . import logs
from .config import Settings
from .storage.base import StorageUnavailable


def _worker(settings: Settings, target: Callable[[Settings], None]) -> None:
    logs.configure(settings.log_level, settings.log_format)
    try:
        target(settings)
    except StorageUnavailable as e:
        print(f"model-service: cannot start: {e}", file=sys.stderr)
        sys.exit(1)


def supervise(settings: Settings, target: Callable[[Settings], None]) -> None:
    # Metrics from every worker go to shared files (prometheus-client's
    # multiprocess mode); spawned workers inherit the variable.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="model-service-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        _run_workers(settings, target)
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def _run_workers(settings: Settings, target: Callable[[Settings], None]) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(settings, target), name=f"worker-{i}") for i in range(settings.workers)]
    for p in procs:
        p.start()

    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker shuts down gracefully

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    status = 0
    while any(p.is_alive() for p in procs):
        for p in procs:
            if not p.is_alive() and p.exitcode not in (0, None) and not stopping:
                # One worker failed: stop the others rather than serve degraded.
                status = status or p.exitcode
                stop(signal.SIGTERM, None)
        time.sleep(0.2)
    from prometheus_client import multiprocess

    for p in procs:
        p.join()
        multiprocess.mark_process_dead(p.pid)
        if p.exitcode and p.exitcode > 0:
            status = status or p.exitcode
    if status:
        sys.exit(status)
