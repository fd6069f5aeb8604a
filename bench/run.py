"""The bench run: files, services, scenarios, peers interleaved round by round.

Every scenario gets fresh storage (a new DATA_DIR, or a new MongoDB database),
starts the service on it with LiveService, uploads what it needs through the
API, then measures each point for ``rounds`` rounds. In every round the
service and its peer run back to back, in alternating order (ours first in
even rounds, the peer first in odd ones), so drift on this shared machine
hits both. The load always comes from a separate client process
(``bench.client``, or wrk for the metadata requests); the service's memory and
CPU are sampled from outside over its whole process tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from testkit.files import sha256_of
from testkit.mongo_server import REPO

from . import procs, stats

MB = 1000 * 1000
MiB = 1024 * 1024
RANGE_SIZE = MiB
ROUND_BYTES = 2000 * MB  # what a download round moves at least, in back-to-back batches (bench/README.md)
RANGE_CONCURRENCY = 4
SEGMENTS = 8
UPLOAD_LEVELS = (1, 4)
RSS_UPLOADS = 8  # concurrent uploads of the larger file while the service's RSS is sampled
SESSION_CHUNK = 32 * MiB  # PATCH size of the session upload (the client's default)
META_OPS = ("list", "search", "get")
META_CONCURRENCY = 16
META_SAMPLE_IDS = 256
VARIANTS = max(*UPLOAD_LEVELS, RSS_UPLOADS)
FILES_CACHE = REPO / ".cache" / "bench-files"


# -- source files ----------------------------------------------------------------------------


@dataclass
class SourceFile:
    path: Path
    size: int
    sha256: str
    head: bytes  # the first 32 bytes, so an "upload as is" uses the same code path as a variant
    variants: list[tuple[str, str]]  # (prefix hex, sha256) of distinct-content variants for uploads

    @property
    def name(self) -> str:
        return self.path.name

    def spec(self) -> dict:
        return {"path": str(self.path), "size": self.size, "sha256": self.sha256}


def _variant_prefix(i: int) -> bytes:
    return hashlib.sha256(f"bench-upload-variant-{i}".encode()).digest()


def make_source(size: int, into: Path, say: Callable[[str], None]) -> SourceFile:
    """A random file of `size` bytes (cached in .cache/bench-files), linked into `into` for nginx."""
    FILES_CACHE.mkdir(parents=True, exist_ok=True)
    # Bench runs may share the cache (a test running --quick beside a full
    # run): one creates a file while the others wait for it.
    with open(FILES_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _make_source_locked(size, into, say)


def _make_source_locked(size: int, into: Path, say: Callable[[str], None]) -> SourceFile:
    cached = FILES_CACHE / f"random-{size}.bin"
    meta_path = cached.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and cached.exists() else None
    if meta is None or meta.get("size") != size or cached.stat().st_size != size:
        say(f"creating a random {size / MB:g} MB file")
        h = hashlib.sha256()
        tmp = cached.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 8 * MiB))
                h.update(block)
                f.write(block)
                left -= len(block)
        os.replace(tmp, cached)
        meta = {"size": size, "sha256": h.hexdigest()}
    if len(meta.get("variants", [])) < VARIANTS and size >= 32:
        variants = []
        with open(cached, "rb") as f:
            for i in range(VARIANTS):
                h = hashlib.sha256(_variant_prefix(i))
                f.seek(32)
                while block := f.read(8 * MiB):
                    h.update(block)
                variants.append([_variant_prefix(i).hex(), h.hexdigest()])
        meta["variants"] = variants
    meta_tmp = meta_path.with_suffix(f".{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)
    target = into / cached.name
    if not target.exists():
        try:
            os.link(cached, target)
        except OSError:
            shutil.copyfile(cached, target)
    target.chmod(0o644)
    with open(cached, "rb") as f:
        head = f.read(32)
    return SourceFile(target, size, meta["sha256"], head, [tuple(v) for v in meta.get("variants", [])])


# -- options ---------------------------------------------------------------------------------------


@dataclass
class Options:
    backends: list[str]
    sizes: list[int]
    mongo_sizes: list[int] | None
    rounds: int
    workers: list[int]
    chunk_sizes: list[int]
    concurrency: list[int]
    scenarios: list[str]
    out: Path
    quick: bool
    client: str
    verify: str
    duration: float
    meta_models: int
    meta_models_explicit: bool
    mongo_range_size: int | None
    keep_work: bool
    pin: bool = True


# -- the run's state ---------------------------------------------------------------------------------


@dataclass
class Model:
    id: str
    file: SourceFile
    file_id: str | None = None
    chunk_size: int | None = None

    @property
    def path(self) -> str:
        return f"/api/v1/models/{self.id}/download"


@dataclass
class Store:
    """Fresh storage for one scenario: a data directory, or a database on the MongoDB server."""

    backend: str
    data_dir: Path | None = None
    db: str | None = None


class Context:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="bench-"))
        self.work.chmod(0o755)
        self.files_dir = self.work / "files"
        self.files_dir.mkdir()
        self.logs = opts.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.scenario_runs: list[dict] = []
        self.files: dict[int, SourceFile] = {}
        self._nginx: dict[int, procs.Nginx] = {}
        self.mongo: procs.Mongo | None = None
        self.capabilities = procs.service_capabilities()
        self._warmed: set[tuple[int, str]] = set()

    # -- progress ------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- resources -------------------------------------------------------------------
    def file(self, size: int) -> SourceFile:
        if size not in self.files:
            self.files[size] = make_source(size, self.files_dir, self.say)
        return self.files[size]

    def sizes(self, backend: str) -> tuple[int, int]:
        """(the 'concurrent' file, the 'large' file) for a backend."""
        sizes = self.opts.sizes
        if backend == "mongodb" and self.opts.mongo_sizes:
            sizes = self.opts.mongo_sizes
        return min(sizes), max(sizes)

    def pinned(self, workers: int) -> bool:
        return self.opts.pin and workers == 1 and procs.pinning_possible()

    def nginx(self, workers: int) -> procs.Nginx:
        if workers not in self._nginx:
            self._nginx[workers] = procs.Nginx(self.work, self.files_dir, workers, pin=self.pinned(workers)).start()
            self.say(f"nginx ({workers} worker{'s' * (workers > 1)}) on {self._nginx[workers].url}")
        return self._nginx[workers]

    def mongodb(self) -> procs.Mongo:
        if self.mongo is None:
            self.say("starting the MongoDB server" if not os.environ.get("MONGODB_URL") else "using MONGODB_URL")
            self.mongo = procs.Mongo.start()
        return self.mongo

    def close(self) -> None:
        for n in self._nginx.values():
            n.stop()
        if self.mongo is not None:
            self.mongo.close()
        if not self.opts.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- storage and services ------------------------------------------------------------
    @contextmanager
    def fresh_store(self, backend: str, scenario: str):
        tag = secrets.token_hex(3)
        if backend == "embedded":
            store = Store(backend, data_dir=self.work / f"data-{scenario}-{tag}")
        else:
            store = Store(backend, db=f"bench_{scenario}_{tag}")
        try:
            yield store
        finally:
            if store.data_dir is not None:
                shutil.rmtree(store.data_dir, ignore_errors=True)
            if store.db is not None and self.mongo is not None:
                try:
                    self.mongo.drop(store.db)
                except Exception as e:  # noqa: BLE001 - cleanup must not hide the scenario's outcome
                    self.say(f"could not drop {store.db}: {e}")

    def service_env(self, store: Store, chunk_size: int | None = None) -> dict[str, str]:
        biggest = max(max(self.opts.sizes), max(self.opts.mongo_sizes or [0]))
        # Explicit, so that nothing in the caller's environment (LiveService
        # passes it through) turns on auth or rate limits, or caps downloads.
        env = {"MAX_FILE_SIZE": str(biggest * 2 + MiB), "ENABLE_AUTH": "false", "RATE_LIMIT": "",
               "DOWNLOAD_RATE_LIMIT": "", "MAX_CONCURRENT_DOWNLOADS": str(max(128, 2 * max(self.opts.concurrency)))}
        if chunk_size is not None:
            env["GRIDFS_CHUNK_SIZE"] = str(chunk_size)
        if store.backend == "embedded":
            env.update({"MONGODB_URL": "", "DATA_DIR": str(store.data_dir)})
        else:
            env.update({"MONGODB_URL": self.mongodb().url, "MONGODB_DB": store.db, "GRIDFS_BUCKET": "models"})
        return env

    @contextmanager
    def service(self, store: Store, workers: int, chunk_size: int | None = None, label: str = "",
                pin: bool = True):
        env = self.service_env(store, chunk_size)
        if workers > 1 and not self.capabilities["workers"]:
            raise RuntimeError("this checkout of the service has no WORKERS / --workers setting")
        name = f"{store.backend}-{label or 'service'}-w{workers}" + (f"-cs{chunk_size}" if chunk_size else "")
        svc = procs.Service(env, self.logs / f"{name}-{secrets.token_hex(2)}.log", workers)
        pin = pin and self.pinned(workers)
        svc.start(pin=pin)
        procs.client_cpus = procs.other_cpus() if pin else None
        try:
            yield svc
        finally:
            procs.client_cpus = None
            svc.stop()

    def upload_as_is(self, svc: procs.Service, f: SourceFile, name: str) -> Model:
        """Setup: register a model and upload the file unchanged (through the client process)."""
        status, body = svc.api("POST", "/api/v1/models", {"name": name, "algorithm": "bench", "format": "bin"})
        if status != 201:
            raise RuntimeError(f"registering {name}: {status} {body}")
        model = Model(body["model_id"], f)
        job = {"job": "upload", "expect": f.spec(), "uploads": [{
            "url": f"{svc.url}/api/v1/models/{model.id}/upload?filename={f.name}",
            "prefix": f.head.hex(), "sha256": f.sha256}]}
        result, _ = procs.run_client(job, None)
        rec = (result.get("records") or [{}])[0]
        if not rec.get("ok"):
            raise RuntimeError(f"setup upload of {f.name} failed: {result.get('job_error') or rec.get('error')}")
        model.file_id, model.chunk_size = rec.get("file_id"), rec.get("chunk_size")
        return model

    def warm(self, port: int, path: str, f: SourceFile) -> None:
        """One unrecorded download first, so round 1 does not measure a cold process or page cache."""
        key = (port, path)
        if key in self._warmed:
            return
        self._warmed.add(key)
        job = {"job": "get", "host": "127.0.0.1", "port": port, "path": path, "expect": f.spec(), "concurrency": 1,
               "verify": "bytes"}
        result, _ = procs.run_client(job, None)
        rec = (result.get("records") or [{}])[0]
        if not rec.get("ok"):
            self.failures.append(f"warm-up download of {path} on port {port}: "
                                 f"{result.get('job_error') or rec.get('error')}")

    # -- measuring ---------------------------------------------------------------------------
    def measure(self, backend: str, scenario: str, point: dict, rounds: int,
                ours: Callable[[], tuple[dict, dict, str]], peer: Callable[[], tuple[dict, dict, str]] | None,
                metrics: Callable[[dict], dict], expected_requests: int | None = None,
                progress: Callable[[dict], str] | None = None) -> None:
        """Run ours and the peer `rounds` times, interleaved, and record both sides."""
        label = " ".join(f"{k}={v}" for k, v in point.items())
        for r in range(rounds):
            sides = [("ours", ours), ("peer", peer)] if r % 2 == 0 else [("peer", peer), ("ours", ours)]
            line = []
            for side, fn in sides:
                if fn is None:
                    continue
                result, figures, who = fn()
                rec = self._record(backend, scenario, point, r, side, who, result, figures, metrics,
                                   expected_requests)
                self.records.append(rec)
                shown = progress(rec["metrics"]) if progress and rec["metrics"] else ""
                status = "ok" if rec["ok"] else f"{rec['errors']} ERRORS {rec['error_samples'][:1]}"
                line.append(f"{side}({who}) {shown} {status}")
            self.say(f"[{backend}] {scenario} {label} round {r + 1}/{rounds}: " + " | ".join(line))

    def _record(self, backend, scenario, point, r, side, who, result, figures, metrics, expected_requests) -> dict:
        recs = result.get("records", [])
        bad = [x for x in recs if not x.get("ok")]
        errors = len(bad)
        samples = [x.get("error") for x in bad[:3]]
        if result.get("job_error"):
            errors += 1
            samples.insert(0, result["job_error"][:500])
        if expected_requests is not None and len(recs) < expected_requests:
            errors += expected_requests - len(recs)
            samples.append(f"{len(recs)} of {expected_requests} requests ran")
        if result.get("sha256_ok") is False:
            samples.append("assembled sha256 mismatch")
        try:
            m = metrics(result) if recs or "metrics" in result else {}
        except Exception as e:  # noqa: BLE001
            m = {}
            errors += 1
            samples.append(f"metrics: {e}")
        wall = result.get("wall") or 0.0
        rec = {
            "backend": backend, "scenario": scenario, "point": point, "round": r, "side": side, "who": who,
            "metrics": m, "requests": len(recs) if recs else result.get("requests", 0), "errors": errors,
            "verified": sum(1 for x in recs if x.get("verified")),
            "verify_method": sorted({x.get("verify", "") for x in recs if x.get("verify")}),
            "error_samples": samples, "process": figures, "wall_s": wall,
            "client_cpu_s": result.get("client_cpu_s"), "client_maxrss_mb": result.get("client_maxrss_mb"),
        }
        if wall and result.get("client_cpu_s") is not None:
            rec["client_busy"] = result["client_cpu_s"] / wall
        for key in ("sha256_ok", "hash_time"):
            if key in result:
                rec[key] = result[key]
        rec["ok"] = errors == 0 and (not recs or rec["verified"] == len(recs))
        if not rec["ok"]:
            self.failures.append(f"{backend} {scenario} {point} round {r + 1} {side} ({who}): "
                                 f"{errors} errors {samples[:2]}")
        return rec


# -- metrics from a job's result ------------------------------------------------------------------


def transfer_metrics(result: dict) -> dict:
    recs = result["records"]
    wall = result["wall"] or float("nan")
    good = [r for r in recs if r.get("ok")]
    return {
        "mb_s": sum(r["bytes"] for r in good) / wall / MB,
        "gb": sum(r["bytes"] for r in good) / 1e9,
        "ttfb_p50_ms": stats.pct([r["ttfb"] for r in good if r.get("ttfb") is not None], 50) * 1000,
        "ttfb_p99_ms": stats.pct([r["ttfb"] for r in good if r.get("ttfb") is not None], 99) * 1000,
        "total_p50_s": stats.pct([r["total"] for r in good], 50),
        "total_p99_s": stats.pct([r["total"] for r in good], 99),
    }


def ranges_metrics(result: dict) -> dict:
    recs = result["records"]
    good = [r for r in recs if r.get("ok")]
    wall = result["wall"] or float("nan")
    lat = [r["total"] for r in good]
    return {
        "req_s": len(good) / wall,
        "lat_p50_ms": stats.pct(lat, 50) * 1000,
        "lat_p90_ms": stats.pct(lat, 90) * 1000,
        "lat_p99_ms": stats.pct(lat, 99) * 1000,
        "ttfb_p50_ms": stats.pct([r["ttfb"] for r in good if r.get("ttfb") is not None], 50) * 1000,
    }


def ttfb_metrics(first: int, far: int) -> Callable[[dict], dict]:
    def metrics(result: dict) -> dict:
        good = [r for r in result["records"] if r.get("ok") and not r.get("warmup")]
        at0 = stats.median([r["ttfb"] for r in good if r["offset"] == first])
        at90 = stats.median([r["ttfb"] for r in good if r["offset"] == far])
        return {"ttfb_at_0_ms": at0 * 1000, "ttfb_at_90_ms": at90 * 1000, "ttfb_90_over_0": at90 / at0}
    return metrics


def upload_metrics(result: dict) -> dict:
    recs = result["records"]
    good = [r for r in recs if r.get("ok")]
    wall = result["wall"] or float("nan")
    return {"mb_s": sum(r["bytes"] for r in good) / wall / MB, "gb": sum(r["bytes"] for r in good) / 1e9,
            "total_p50_s": stats.pct([r["total"] for r in good], 50)}


def query_metrics(result: dict) -> dict:
    if "metrics" in result:  # wrk
        return result["metrics"]
    good = [r for r in result["records"] if r.get("ok")]
    wall = result["wall"] or float("nan")
    lat = [r["total"] for r in good]
    return {"req_s": len(good) / wall, "lat_p50_ms": stats.pct(lat, 50) * 1000,
            "lat_p99_ms": stats.pct(lat, 99) * 1000}


def _mbs(m: dict) -> str:
    return f"{m.get('mb_s', float('nan')):.0f} MB/s"


# -- job builders -------------------------------------------------------------------------------------


def get_job(ctx: Context, port: int, path: str, f: SourceFile, concurrency: int, checksum_header: bool,
            repeat: int = 1) -> dict:
    return {"job": "get", "host": "127.0.0.1", "port": port, "path": path, "expect": f.spec(),
            "concurrency": concurrency, "repeat": repeat, "verify": ctx.opts.verify, "client": ctx.opts.client,
            "expect_checksum_header": f.sha256 if checksum_header else None}


def gridfs_job(ctx: Context, store: Store, model: Model, kind: str, **extra) -> dict:
    return {"job": kind, "url": ctx.mongodb().url, "db": store.db, "bucket": "models", "file_id": model.file_id,
            "expect": model.file.spec(), "verify": ctx.opts.verify, **extra}


def ours_and_peer_get(ctx: Context, backend: str, store: Store, svc: procs.Service, model: Model,
                      concurrency: int, workers: int, repeat: int = 1):
    ctx.warm(svc.port, model.path, model.file)
    if backend == "embedded":
        ctx.warm(ctx.nginx(workers).port, f"/files/{model.file.name}", model.file)

    def ours():
        r, fig = procs.run_client(get_job(ctx, svc.port, model.path, model.file, concurrency, True, repeat), svc.pid)
        return r, fig, f"service w{workers}"

    if backend == "embedded":
        ngx = ctx.nginx(workers)

        def peer():
            r, fig = procs.run_client(get_job(ctx, ngx.port, f"/files/{model.file.name}", model.file,
                                              concurrency, False, repeat), ngx.pid)
            return r, fig, f"nginx w{workers}"
    else:
        def peer():
            r, fig = procs.run_client(gridfs_job(ctx, store, model, "gridfs_read", concurrency=concurrency,
                                                 repeat=repeat), None)
            return r, fig, "pymongo gridfs"
    return ours, peer


# -- scenarios ------------------------------------------------------------------------------------------


def scenario_single(ctx: Context, backend: str) -> None:
    """1. Single-stream download of each file size."""
    small, large = ctx.sizes(backend)
    w = ctx.opts.workers[0]
    with ctx.fresh_store(backend, "single") as store, ctx.service(store, w, label="single") as svc:
        for size in sorted({small, large}):
            model = ctx.upload_as_is(svc, ctx.file(size), f"single-{size}")
            repeat = batches(ctx, size)
            ours, peer = ours_and_peer_get(ctx, backend, store, svc, model, 1, w, repeat)
            ctx.measure(backend, "single", {"size_mb": round(size / MB), "workers": w, "downloads": repeat},
                        ctx.opts.rounds, ours, peer, transfer_metrics, expected_requests=repeat, progress=_mbs)


def batches(ctx: Context, size: int, clients: int = 1) -> int:
    """Batches of `clients` downloads per round, one after another: ~ROUND_BYTES in all, at most 8.

    One 256 MB download lasts ~0.1 s on loopback, so one scheduler hiccup
    moved a round by 30%; a round of ~1 s is steadier for both sides alike.
    --quick measures nothing, so one batch does.
    """
    if ctx.opts.quick:
        return 1
    return max(1, min(8, -(-ROUND_BYTES // (size * clients))))


def scenario_concurrent(ctx: Context, backend: str) -> None:
    """2. Concurrent downloads of the smaller file at each concurrency, for each worker count."""
    small, _ = ctx.sizes(backend)
    f = ctx.file(small)
    with ctx.fresh_store(backend, "concurrent") as store:
        model = None
        for w in ctx.opts.workers:
            with ctx.service(store, w, label="concurrent") as svc:
                if model is None:
                    model = ctx.upload_as_is(svc, f, "concurrent")
                for c in ctx.opts.concurrency:
                    repeat = batches(ctx, small, c)
                    ours, peer = ours_and_peer_get(ctx, backend, store, svc, model, c, w, repeat)
                    ctx.measure(backend, "concurrent", {"workers": w, "concurrency": c, "size_mb": round(small / MB),
                                                        "batches": repeat},
                                ctx.opts.rounds, ours, peer, transfer_metrics, expected_requests=c * repeat,
                                progress=lambda m: f"{_mbs(m)} ttfb p99 {m['ttfb_p99_ms']:.0f} ms")


def _range_file(ctx: Context, backend: str) -> int:
    small, large = ctx.sizes(backend)
    if backend == "mongodb" and ctx.mongo is not None and ctx.mongo.is_test_server:
        # FerretDB scans the whole chunks collection for every range: keep it finishing.
        return ctx.opts.mongo_range_size or small
    return ctx.opts.mongo_range_size if backend == "mongodb" and ctx.opts.mongo_range_size else large


def scenario_ranges(ctx: Context, backend: str) -> None:
    """3. Random 1 MiB ranges across the large file; TTFB at offset 0 against offset 90%."""
    if backend == "mongodb":
        ctx.mongodb()
    size = _range_file(ctx, backend)
    f = ctx.file(size)
    w = ctx.opts.workers[0]
    far = min(int(size * 0.9), size - RANGE_SIZE)
    with ctx.fresh_store(backend, "ranges") as store, ctx.service(store, w, label="ranges") as svc:
        model = ctx.upload_as_is(svc, f, "ranges")
        ctx.warm(svc.port, model.path, f)
        if backend == "embedded":
            ctx.warm(ctx.nginx(w).port, f"/files/{f.name}", f)
        common = {"range_size": RANGE_SIZE, "concurrency": RANGE_CONCURRENCY, "duration": ctx.opts.duration,
                  "min_requests": RANGE_CONCURRENCY}
        probe = {"offsets": [0, far], "length": RANGE_SIZE, "repeats": 3 if ctx.opts.quick else 7}
        http = {"host": "127.0.0.1", "expect": f.spec(), "verify": ctx.opts.verify}
        for kind, extra, metrics, point, progress in (
            ("ranges", common, ranges_metrics,
             {"size_mb": round(size / MB), "range": "1MiB", "concurrency": RANGE_CONCURRENCY},
             lambda m: f"{m['req_s']:.0f} req/s p99 {m['lat_p99_ms']:.0f} ms"),
            ("ttfb_probe", probe, ttfb_metrics(0, far), {"size_mb": round(size / MB), "offsets": "0 vs 90%"},
             lambda m: f"ttfb 0: {m['ttfb_at_0_ms']:.1f} ms, 90%: {m['ttfb_at_90_ms']:.1f} ms"),
        ):
            # Round r uses the same random offsets on both sides.
            seeds = {"ours": iter(range(1000)), "peer": iter(range(1000))}

            def ours(kind=kind, extra=extra, seeds=seeds):
                job = {"job": kind, "port": svc.port, "path": model.path, **http, **extra, "seed": next(seeds["ours"]),
                       "expect_checksum_header": f.sha256}
                r, fig = procs.run_client(job, svc.pid)
                return r, fig, f"service w{w}"

            if backend == "embedded":
                ngx = ctx.nginx(w)

                def peer(kind=kind, extra=extra, seeds=seeds):
                    job = {"job": kind, "port": ngx.port, "path": f"/files/{f.name}", **http, **extra,
                           "seed": next(seeds["peer"])}
                    r, fig = procs.run_client(job, ngx.pid)
                    return r, fig, f"nginx w{w}"
            else:
                def peer(kind=kind, extra=extra, seeds=seeds):
                    r, fig = procs.run_client(gridfs_job(ctx, store, model, "gridfs_" + kind, **extra,
                                                         seed=next(seeds["peer"])), None)
                    return r, fig, "pymongo gridfs"

            scen = "ranges" if kind == "ranges" else "ttfb"
            ctx.measure(backend, scen, point, ctx.opts.rounds, ours, peer, metrics, progress=progress)


def scenario_segmented(ctx: Context, backend: str) -> None:
    """4. The large file in 8 parallel ranges, assembled, sha256-verified."""
    _, size = ctx.sizes(backend)
    f = ctx.file(size)
    w = ctx.opts.workers[0]
    with ctx.fresh_store(backend, "segmented") as store, ctx.service(store, w, label="segmented") as svc:
        model = ctx.upload_as_is(svc, f, "segmented")
        ctx.warm(svc.port, model.path, f)
        if backend == "embedded":
            ctx.warm(ctx.nginx(w).port, f"/files/{f.name}", f)

        def ours():
            job = {"job": "segmented", "host": "127.0.0.1", "port": svc.port, "path": model.path,
                   "expect": f.spec(), "parts": SEGMENTS, "expect_checksum_header": f.sha256}
            r, fig = procs.run_client(job, svc.pid)
            return r, fig, f"service w{w}"

        if backend == "embedded":
            ngx = ctx.nginx(w)

            def peer():
                job = {"job": "segmented", "host": "127.0.0.1", "port": ngx.port, "path": f"/files/{f.name}",
                       "expect": f.spec(), "parts": SEGMENTS}
                r, fig = procs.run_client(job, ngx.pid)
                return r, fig, f"nginx w{w}"
        else:
            def peer():
                r, fig = procs.run_client(gridfs_job(ctx, store, model, "gridfs_segmented", parts=SEGMENTS), None)
                return r, fig, "pymongo gridfs"

        ctx.measure(backend, "segmented", {"size_mb": round(size / MB), "parts": SEGMENTS}, ctx.opts.rounds, ours,
                    peer, transfer_metrics, expected_requests=SEGMENTS, progress=_mbs)


_session_rounds = itertools.count()


def _upload_pair(ctx: Context, backend: str, store: Store, svc: procs.Service, f: SourceFile, c: int, w: int,
                 chunk_size: int, method: str = "PUT"):
    counter = iter(range(10**6))

    def ours():
        if method == "session":
            # Content committed by a session stays for BLOB_GRACE: each round sends another variant.
            n = next(_session_rounds)
            ups = [f.variants[(n * c + i) % VARIANTS] for i in range(c)]
            job = {"job": "upload_session", "url": f"{svc.url}/api/v1/uploads", "chunk": SESSION_CHUNK,
                   "expect": f.spec(), "uploads": [{"prefix": p, "sha256": h} for p, h in ups]}
            r, fig = procs.run_client(job, svc.pid)
            return r, fig, f"service w{w} (session)"
        ids = []
        for i in range(c):
            status, body = svc.api("POST", "/api/v1/models", {"name": f"upload-{secrets.token_hex(4)}",
                                                              "algorithm": "bench"})
            if status != 201:
                raise RuntimeError(f"register for upload: {status} {body}")
            ids.append(body["model_id"])
        job = {"job": "upload", "expect": f.spec(), "uploads": [
            {"url": f"{svc.url}/api/v1/models/{mid}/upload?filename=variant{i}.bin", "prefix": f.variants[i][0],
             "sha256": f.variants[i][1]} for i, mid in enumerate(ids)]}
        r, fig = procs.run_client(job, svc.pid)
        for mid in ids:  # frees the content, so the next round uploads new content again
            svc.api("DELETE", f"/api/v1/models/{mid}")
        return r, fig, f"service w{w}"

    if backend == "embedded":
        ngx = ctx.nginx(w)

        def peer():
            n = next(counter)
            names = [f"r{n}-variant{i}.bin" for i in range(c)]
            job = {"job": "upload", "expect": f.spec(), "uploads": [
                {"url": f"{ngx.url}/upload/{name}", "prefix": f.variants[i][0], "sha256": f.variants[i][1],
                 "check_response": False, "expect_status": [201, 204], "verify": "sha256 of nginx's file"}
                for i, name in enumerate(names)]}
            r, fig = procs.run_client(job, ngx.pid)
            # nginx computes no checksum: hash what it wrote (outside the timing), then remove it.
            for i, (name, rec) in enumerate(zip(names, r.get("records", []))):
                written = ngx.upload_dir / name
                if rec.get("ok"):
                    digest = sha256_of(written) if written.exists() else None
                    if digest != f.variants[i][1]:
                        rec["ok"], rec["verified"] = False, False
                        rec["error"] = f"nginx wrote sha256 {digest}"
                written.unlink(missing_ok=True)
            return r, fig, f"nginx w{w}"
    else:
        def peer():
            job = {"job": "gridfs_write", "url": ctx.mongodb().url, "db": store.db, "bucket": "models",
                   "expect": f.spec(), "chunk_size": chunk_size,
                   "uploads": [{"name": f"peer-{i}", "prefix": f.variants[i][0]} for i in range(c)]}
            r, fig = procs.run_client(job, None)
            return r, fig, "pymongo upload_from_stream"
    return ours, peer


def _hashlib_peer(f: SourceFile):
    def peer():
        prefix, sha256 = f.variants[0]
        r, fig = procs.run_client({"job": "hash", "expect": f.spec(), "prefix": prefix, "sha256": sha256}, None)
        return r, fig, "hashlib.sha256, one thread"
    return peer


def scenario_upload(ctx: Context, backend: str) -> None:
    """5. Upload throughput: one stream and 4 concurrent (PUT), one session; each single stream also against
    hashlib.sha256 of the same bytes in one thread; the service's RSS while 8 clients upload the larger file."""
    small, large = ctx.sizes(backend)
    f = ctx.file(small)
    w = ctx.opts.workers[0]
    default_chunk = 255 * 1024
    point = {"size_mb": round(small / MB)}
    # Not pinned: the service hashes and writes in threads beside its event loop, which one CPU would serialise.
    with ctx.fresh_store(backend, "upload") as store, ctx.service(store, w, label="upload", pin=False) as svc:
        for method, c in [("PUT", c) for c in UPLOAD_LEVELS] + [("session", 1)]:
            ours, peer = _upload_pair(ctx, backend, store, svc, f, c, w, default_chunk, method)
            ctx.measure(backend, "upload", {"method": method, "concurrency": c, **point}, ctx.opts.rounds,
                        ours, peer, upload_metrics, expected_requests=c, progress=_mbs)
        for method in ("PUT", "session"):
            ours, _ = _upload_pair(ctx, backend, store, svc, f, 1, w, default_chunk, method)
            ctx.measure(backend, "upload_hashlib", {"method": method, "concurrency": 1, **point}, ctx.opts.rounds,
                        ours, _hashlib_peer(f), upload_metrics, expected_requests=1, progress=_mbs)
        # --quick checks that it runs and reports: the smaller file (8 uploads of the larger one took 37 s of
        # a 3.5 min smoke run on the FerretDB test server).
        big = ctx.file(small if ctx.opts.quick else large)
        ours, _ = _upload_pair(ctx, backend, store, svc, big, RSS_UPLOADS, w, default_chunk)
        ctx.measure(backend, "upload_rss",
                    {"method": "PUT", "concurrency": RSS_UPLOADS, "size_mb": round(big.size / MB)}, 1, ours,
                    None, upload_metrics, expected_requests=RSS_UPLOADS, progress=_mbs)


# -- metadata -------------------------------------------------------------------------------------------

_WORDS = ("churn", "fraud", "vision", "ranker", "speech")
_ALGOS = ("random_forest", "xgboost", "cnn", "transformer", "logistic_regression")


def model_body(i: int) -> dict:
    word = _WORDS[i % len(_WORDS)]
    return {
        "name": f"bench-{i:05d}-{word}",
        "algorithm": _ALGOS[(i // 5) % len(_ALGOS)],
        "description": f"benchmark model {i} for {word} workloads",
        "hyperparameters": {"n_estimators": 50 + i % 450, "max_depth": 3 + i % 12},
        "metrics": {"accuracy": round(0.5 + (i * 7919 % 5000) / 10000, 4), "f1_score": round(0.4 + i % 500 / 1000, 4)},
        "dataset_info": {"name": f"dataset-{i % 50}", "rows": 1000 + i},
        "tags": [word, "production" if i % 3 == 0 else "staging"],
    }


META_QUERIES = {
    "list": "/api/v1/models?limit=20",
    "search": "/api/v1/models/search?q=churn&sort=-metrics.accuracy&limit=20",
}


def _seed(ctx: Context, store: Store, svc: procs.Service, n: int) -> list[str]:
    """Register n models: through the API (embedded), or a few through the API and copies of them (mongodb)."""
    through_api = n if store.backend == "embedded" else min(n, 200)
    t0 = time.monotonic()
    result, _ = procs.run_client({"job": "seed", "url": svc.url, "concurrency": 16,
                                  "models": [model_body(i) for i in range(through_api)]}, None)
    ids = result.get("ids") or []
    if result.get("job_error") or result.get("errors") or None in ids:
        raise RuntimeError(f"seeding failed: {result.get('job_error') or result.get('errors')}")
    if n > through_api:
        # FerretDB numbers each new version by scanning every model, so 10,000
        # registrations through the API would take very long: insert copies of
        # a document the service wrote, with the same fields a registration sets.
        from bson import ObjectId

        with ctx.mongo.sync_client() as c:
            models = c[store.db]["models"]
            template = models.find_one({"_id": ObjectId(ids[0])})
            base = template["created_at"]
            from datetime import timedelta

            batch = []
            for i in range(through_api, n):
                body = model_body(i)
                doc = {**template, **body, "_id": ObjectId(), "created_at": base + timedelta(milliseconds=i),
                       "updated_at": base + timedelta(milliseconds=i)}
                batch.append(doc)
                ids.append(str(doc["_id"]))
                if len(batch) == 1000:
                    models.insert_many(batch)
                    batch = []
            if batch:
                models.insert_many(batch)
    ctx.say(f"[{store.backend}] registry seeded with {n} models in {time.monotonic() - t0:.1f} s "
            f"({through_api} through the API)")
    return ids


def _wrk(url: str, duration: float, connections: int, script: Path | None) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "30s"]
    if script is not None:
        cmd += ["-s", str(script)]
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 120,
                          preexec_fn=procs.client_preexec())
    out = proc.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or not m or not rps:
        return {"wall": 0.0, "records": [],
                "job_error": f"wrk failed ({proc.returncode}): {proc.stderr[-500:]} {out[-500:]}"}
    requests = int(m.group(1))
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock_errors = sum(map(int, sock.groups())) if sock else 0
    lat = {q: _wrk_time(v) for q, v in re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)", out, re.M)}
    result = {"wall": duration, "requests": requests, "metrics": {
        "req_s": float(rps.group(1)), "lat_p50_ms": lat.get("50"), "lat_p99_ms": lat.get("99")}, "records": []}
    if non2xx or sock_errors:
        result["job_error"] = f"wrk: {non2xx} non-2xx responses, {sock_errors} socket errors"
    elif requests == 0:
        result["job_error"] = f"wrk: no request completed in {duration:g} s"
    return result


def _wrk_time(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def _wrk_get_script(path: Path, ids: list[str], prefix: str, suffix: str) -> Path:
    quoted = ", ".join(f'"{i}"' for i in ids)
    path.write_text(
        f"local ids = {{{quoted}}}\n"
        f"request = function()\n"
        f"  return wrk.format(\"GET\", \"{prefix}\" .. ids[math.random(#ids)] .. \"{suffix}\")\n"
        f"end\n")
    return path


def scenario_metadata(ctx: Context, backend: str) -> None:
    """6. list, search and get requests/s against a registry of N models (wrk, 16 connections)."""
    n = _metadata_models(ctx, backend)
    if n != ctx.opts.meta_models:
        ctx.notes.append(f"{backend} metadata: a registry of {n} models on the FerretDB test server "
                         f"(not {ctx.opts.meta_models}), so that the scenario finishes")
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install -y wrk)")
    with ctx.fresh_store(backend, "metadata") as store:
        ids: list[str] = []
        sample: list[str] = []
        # --quick exercises several workers in the concurrent scenario only.
        for w in ctx.opts.workers[:1] if ctx.opts.quick else ctx.opts.workers:
            with ctx.service(store, w, label="metadata") as svc:
                if not ids:
                    ids = _seed(ctx, store, svc, n)
                    sample = ids[:: max(1, len(ids) // META_SAMPLE_IDS)][:META_SAMPLE_IDS]
                    _verify_and_copy_metadata(ctx, svc, n, sample, backend)
                for op in META_OPS:
                    _measure_metadata(ctx, backend, store, svc, w, op, n, sample)


def _verify_and_copy_metadata(ctx: Context, svc: procs.Service, n: int, sample: list[str], backend: str) -> None:
    """Check the answers once (wrk checks only status codes) and keep copies for nginx to serve."""
    meta = ctx.work / "meta"
    (meta / "models").mkdir(parents=True, exist_ok=True)
    for op, path in META_QUERIES.items():
        status, body = svc.raw_get(path)
        doc = json.loads(body)
        problems = []
        if status != 200 or len(doc.get("models", [])) != 20:
            problems.append(f"status {status}, {len(doc.get('models', []))} models")
        if op == "list" and doc.get("pagination", {}).get("total") != n:
            problems.append(f"total {doc.get('pagination', {}).get('total')} != {n}")
        if op == "search" and not all("churn" in m["name"] for m in doc.get("models", [])):
            problems.append("search returned models without 'churn'")
        if problems:
            ctx.failures.append(f"{backend} metadata {op}: {problems}")
        (meta / f"{op}.json").write_bytes(body)
    for mid in sample:
        status, body = svc.raw_get(f"/api/v1/models/{mid}")
        if status != 200 or json.loads(body).get("id") != mid:
            ctx.failures.append(f"{backend} metadata get {mid}: status {status}")
        (meta / "models" / f"{mid}.json").write_bytes(body)
    for p in [meta, meta / "models", *meta.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def _on_ferretdb(ctx: Context, backend: str) -> bool:
    return backend == "mongodb" and ctx.mongo is not None and ctx.mongo.is_test_server


def _metadata_duration(ctx: Context, backend: str) -> float:
    # FerretDB sorts and filters every listing in memory over the whole
    # collection; a longer window keeps the requests still queued when it
    # closes a small part of the measurement.
    if _on_ferretdb(ctx, backend):
        return max(ctx.opts.duration, 2.0 if ctx.opts.quick else 5.0)
    return ctx.opts.duration


def _metadata_models(ctx: Context, backend: str) -> int:
    # On FerretDB a listing of 10,000 models takes about 4 s (in-memory sort
    # and count over the collection), 60 s with 16 at a time: a registry of
    # 1,000 keeps the scenario finishing. --models overrides.
    if _on_ferretdb(ctx, backend) and not ctx.opts.meta_models_explicit:
        return min(ctx.opts.meta_models, 1000)
    return ctx.opts.meta_models


def _metadata_connections(ctx: Context, backend: str) -> int:
    # FerretDB answers a listing in about a second: 16 at a time queue for
    # longer than a measurement window, so nothing would complete in it.
    return 4 if _on_ferretdb(ctx, backend) else META_CONCURRENCY


def _settle(result: dict) -> None:
    """After a timed window, let requests still queued in the server finish before the next measurement."""
    p99 = (result.get("metrics") or {}).get("lat_p99_ms")
    if p99 is None and result.get("records"):
        p99 = stats.pct([r["total"] for r in result["records"]], 99) * 1000
    if p99 and p99 > 50:
        time.sleep(min(30.0, 1.5 * p99 / 1000))


def _measure_metadata(ctx: Context, backend: str, store: Store, svc: procs.Service, w: int, op: str, n: int,
                      sample: list[str]) -> None:
    d = _metadata_duration(ctx, backend)
    conns = _metadata_connections(ctx, backend)
    script_dir = ctx.work / "wrk"
    script_dir.mkdir(exist_ok=True)

    def ours():
        if op == "get":
            script = _wrk_get_script(script_dir / "ours.lua", sample, "/api/v1/models/", "")
            url = svc.url + "/"
        else:
            script, url = None, svc.url + META_QUERIES[op]
        with procs.Sampler(svc.pid) as s:
            r = _wrk(url, d, conns, script)
        _settle(r)
        return r, s.figures(), f"service w{w}"

    if backend == "embedded":
        ngx = ctx.nginx(w)

        def peer():
            if op == "get":
                script = _wrk_get_script(script_dir / "nginx.lua", sample, "/meta/models/", ".json")
                url = ngx.url + "/"
            else:
                script, url = None, f"{ngx.url}/meta/{op}.json"
            with procs.Sampler(ngx.pid) as s:
                r = _wrk(url, d, conns, script)
            return r, s.figures(), f"nginx w{w} (static copy)"
    else:
        from app.storage.base import ModelQuery
        from app.storage.mongo import MongoStorage

        if op == "list":
            query = {"op": "list", "filter": {}, "sort_field": "created_at", "sort_desc": True, "limit": 20,
                     "expect_count": 20}
        elif op == "search":
            filt = MongoStorage._filter(ModelQuery(text="churn"))
            query = {"op": "search", "filter": filt, "sort_field": "metrics.accuracy", "sort_desc": True,
                     "limit": 20, "expect_count": 20}
        else:
            query = {"op": "get"}

        def peer():
            job = {"job": "mongo_query", "url": ctx.mongodb().url, "db": store.db, "query": query, "ids": sample,
                   "concurrency": conns, "duration": d}
            r, fig = procs.run_client(job, None)
            _settle(r)
            return r, fig, "pymongo (same query)"

    ctx.measure(backend, "metadata", {"workers": w, "op": op, "models": n, "connections": conns}, ctx.opts.rounds,
                ours, peer,
                query_metrics, progress=lambda m: f"{m['req_s']:.0f} req/s")


# -- per-request cost: the framework's floor ---------------------------------------------------------------

SMALL_FILE = 16 * 1024  # a snapshot's small file (config, tokenizer)
SMALL_CONCURRENCY = 16
TTFB_DOWNLOADS = 200  # one at a time, each on a new connection


def scenario_floors(ctx: Context, backend: str) -> None:
    """Per-request cost (issue 18): get-by-id and the listing against bench/floor.py (a bare aiohttp handler on
    uvloop returning the service's own bytes), 16 KB whole-file downloads over 16 connections against the floor
    and nginx (wrk), and the time to first byte of one download against nginx."""
    if backend != "embedded":
        return
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install -y wrk)")
    n = ctx.opts.meta_models
    f = ctx.file(SMALL_FILE)
    w = ctx.opts.workers[0]
    d = ctx.opts.duration
    with ctx.fresh_store(backend, "floors") as store, ctx.service(store, w, label="floors") as svc:
        model = ctx.upload_as_is(svc, f, "small-file")
        ids = _seed(ctx, store, svc, n)
        sample = ids[:: max(1, len(ids) // META_SAMPLE_IDS)][:META_SAMPLE_IDS]
        bodies = {}
        for mid in sample:
            status, bodies[mid] = svc.raw_get(f"/api/v1/models/{mid}")
            if status != 200:
                raise RuntimeError(f"get {mid}: status {status}")
        status, listing = svc.raw_get(META_QUERIES["list"])
        if status != 200:
            raise RuntimeError(f"listing: status {status}")
        floor = procs.Floor(ctx.work, bodies, listing, f.path, pin=ctx.pinned(w)).start()
        try:
            ngx = ctx.nginx(w)
            nginx_path = f"/files/{f.name}"
            for port, path in ((svc.port, model.path), (floor.port, "/file"), (ngx.port, nginx_path)):
                ctx.warm(port, path, f)
            scripts = ctx.work / "wrk"
            scripts.mkdir(exist_ok=True)
            get_script = _wrk_get_script(scripts / "floors-get.lua", sample, "/api/v1/models/", "")

            def wrk_side(url, pid, who, script=None, conns=META_CONCURRENCY):
                def side():
                    with procs.Sampler(pid) as s:
                        r = _wrk(url, d, conns, script)
                    _settle(r)
                    return r, s.figures(), who
                return side

            svc_who, floor_who, ngx_who = f"service w{w}", "bare aiohttp (bench/floor.py)", f"nginx w{w}"
            for op, ours, peer in (
                ("get", wrk_side(svc.url + "/", svc.pid, svc_who, get_script),
                 wrk_side(floor.url + "/", floor.pid, floor_who, get_script)),
                ("list", wrk_side(svc.url + META_QUERIES["list"], svc.pid, svc_who),
                 wrk_side(floor.url + META_QUERIES["list"], floor.pid, floor_who)),
            ):
                ctx.measure(backend, "floors", {"op": op, "peer": "floor", "models": n,
                                                "connections": META_CONCURRENCY},
                            ctx.opts.rounds, ours, peer, query_metrics,
                            progress=lambda m: f"{m['req_s']:.0f} req/s p99 {m['lat_p99_ms']:.1f} ms")
            download = wrk_side(svc.url + model.path, svc.pid, svc_who, conns=SMALL_CONCURRENCY)
            for name, peer in (("floor", wrk_side(floor.url + "/file", floor.pid, floor_who, conns=SMALL_CONCURRENCY)),
                               ("nginx", wrk_side(ngx.url + nginx_path, ngx.pid, ngx_who, conns=SMALL_CONCURRENCY))):
                ctx.measure(backend, "floors", {"op": "download 16KB", "peer": name,
                                                "connections": SMALL_CONCURRENCY},
                            ctx.opts.rounds, download, peer, query_metrics,
                            progress=lambda m: f"{m['req_s']:.0f} req/s p99 {m['lat_p99_ms']:.1f} ms")
            repeat = 20 if ctx.opts.quick else TTFB_DOWNLOADS

            def ttfb_side(port, path, header, pid, who):
                def side():
                    r, fig = procs.run_client(get_job(ctx, port, path, f, 1, header, repeat), pid)
                    return r, fig, who
                return side

            ctx.measure(backend, "floors", {"op": "ttfb 16KB", "peer": "nginx", "downloads": repeat},
                        ctx.opts.rounds, ttfb_side(svc.port, model.path, True, svc.pid, svc_who),
                        ttfb_side(ngx.port, nginx_path, False, ngx.pid, ngx_who), transfer_metrics,
                        expected_requests=repeat, progress=lambda m: f"ttfb p50 {m['ttfb_p50_ms']:.2f} ms")
        finally:
            floor.stop()


# -- chunk size -----------------------------------------------------------------------------------------


def scenario_chunksize(ctx: Context, backend: str) -> None:
    """GRIDFS_CHUNK_SIZE compared: download (1 and 4 streams) and upload, each against the raw driver."""
    if backend != "mongodb":
        return
    small, _ = ctx.sizes(backend)
    f = ctx.file(small)
    w = ctx.opts.workers[0]
    for cs in ctx.opts.chunk_sizes:
        with ctx.fresh_store(backend, f"chunk{cs // 1024}k") as store, \
                ctx.service(store, w, chunk_size=cs, label="chunksize") as svc:
            model = ctx.upload_as_is(svc, f, f"chunk-{cs}")
            if model.chunk_size != cs:
                ctx.notes.append(f"GRIDFS_CHUNK_SIZE={cs} was not applied by the service "
                                 f"(files are stored with {model.chunk_size}-byte chunks)")
            point = {"chunk_kib": cs // 1024, "effective_chunk_kib": (model.chunk_size or 0) // 1024,
                     "size_mb": round(small / MB)}
            for c in (1,) if ctx.opts.quick else (1, 4):
                ours, peer = ours_and_peer_get(ctx, backend, store, svc, model, c, w)
                ctx.measure(backend, "chunksize", {**point, "op": f"download x{c}"}, ctx.opts.rounds, ours, peer,
                            transfer_metrics, expected_requests=c, progress=_mbs)
            ours, peer = _upload_pair(ctx, backend, store, svc, f, 1, w, cs)
            ctx.measure(backend, "chunksize", {**point, "op": "upload x1"}, ctx.opts.rounds, ours, peer,
                        upload_metrics, expected_requests=1, progress=_mbs)


def scenario_client(ctx: Context, backend: str) -> None:
    """Calibration: single stream with aiohttp's client (instead of the lean one), ours against the peer."""
    if backend != "embedded" or ctx.opts.client == "aiohttp":
        return
    small, _ = ctx.sizes(backend)
    w = ctx.opts.workers[0]
    with ctx.fresh_store(backend, "client") as store, ctx.service(store, w, label="client") as svc:
        model = ctx.upload_as_is(svc, ctx.file(small), "client")
        ngx = ctx.nginx(w)
        ctx.warm(svc.port, model.path, model.file)
        ctx.warm(ngx.port, f"/files/{model.file.name}", model.file)

        def job(port, path, header):
            j = get_job(ctx, port, path, model.file, 1, header)
            j["client"] = "aiohttp"
            return j

        def ours():
            r, fig = procs.run_client(job(svc.port, model.path, True), svc.pid)
            return r, fig, f"service w{w}"

        def peer():
            r, fig = procs.run_client(job(ngx.port, f"/files/{model.file.name}", False), ngx.pid)
            return r, fig, f"nginx w{w}"

        ctx.measure(backend, "aiohttp_client", {"size_mb": round(small / MB), "client": "aiohttp"}, ctx.opts.rounds,
                    ours, peer, transfer_metrics, expected_requests=1, progress=_mbs)


# -- replicas -------------------------------------------------------------------------------------------

REPLICA_COUNTS = (1, 2, 3)
QUICK_REPLICA_COUNTS = (1, 2)  # --quick: that it runs and reports, in half the time
REPLICA_DOWNLOADS = 8  # concurrent downloads through the balancer
REPLICA_MODELS = 100  # registry size for get-by-id


def scenario_replicas(ctx: Context, backend: str) -> None:
    """Replicas (mongodb): 1, 2 and 3 service processes on one database behind nginx round-robin (as a
    Kubernetes Deployment runs them); aggregate download MB/s and get-by-id req/s through the balancer,
    reported as ratios to one replica."""
    if backend != "mongodb":
        return
    from testkit.replicas import Replicas

    small, _ = ctx.sizes(backend)
    f = ctx.file(small)
    d = _metadata_duration(ctx, backend)
    conns = _metadata_connections(ctx, backend)
    with ctx.fresh_store(backend, "replicas") as store:
        env = {k: v for k, v in ctx.service_env(store).items() if k not in ("MONGODB_URL", "MONGODB_DB")}
        model, sample = None, []
        for n in QUICK_REPLICA_COUNTS if ctx.opts.quick else REPLICA_COUNTS:
            cluster = Replicas(n, ctx.mongodb().url, store.db, ctx.work / f"replicas-{n}-{secrets.token_hex(2)}",
                               {**env, "LEASE_TTL": "10"})
            cluster.start()
            try:
                ep = procs.Endpoint(cluster.url, cluster.balancer.port, cluster.balancer.pid)
                if model is None:
                    model = ctx.upload_as_is(ep, f, "replicas")
                    ids = _seed(ctx, store, ep, REPLICA_MODELS)
                    sample = ids[:: max(1, len(ids) // META_SAMPLE_IDS)][:META_SAMPLE_IDS]
                for i in range(n):  # each replica's first download unrecorded (round-robin: n of them)
                    ctx.warm(cluster.balancer.port, f"{model.path}?warm={i}", f)
                repeat = batches(ctx, small, REPLICA_DOWNLOADS)

                def download(n=n):
                    r, fig = procs.run_client(get_job(ctx, cluster.balancer.port, model.path, f, REPLICA_DOWNLOADS,
                                                      True, repeat), None)
                    return r, fig, f"{n} replica{'s' * (n > 1)} behind nginx"

                ctx.measure(backend, "replicas", {"replicas": n, "op": f"download x{REPLICA_DOWNLOADS}",
                                                  "size_mb": round(small / MB), "batches": repeat},
                            ctx.opts.rounds, download, None, transfer_metrics,
                            expected_requests=REPLICA_DOWNLOADS * repeat, progress=_mbs)
                script = _wrk_get_script(ctx.work / f"replicas-get-{n}.lua", sample, "/api/v1/models/", "")

                def get(n=n):
                    r = _wrk(cluster.url + "/", d, conns, script)
                    _settle(r)
                    return r, {}, f"{n} replica{'s' * (n > 1)} behind nginx"

                ctx.measure(backend, "replicas", {"replicas": n, "op": "get", "models": len(ids),
                                                  "connections": conns},
                            ctx.opts.rounds, get, None, query_metrics, progress=lambda m: f"{m['req_s']:.0f} req/s")
            finally:
                cluster.stop()
    ctx.notes.append(_replica_ratios(ctx))


def _replica_ratios(ctx: Context) -> str:
    def median(op_prefix: str, n: int, key: str) -> float:
        values = [r["metrics"][key] for r in ctx.records if r["scenario"] == "replicas" and r["ok"]
                  and r["point"]["replicas"] == n and r["point"]["op"].startswith(op_prefix) and key in r["metrics"]]
        return stats.median(values) if values else float("nan")

    counts = sorted({r["point"]["replicas"] for r in ctx.records if r["scenario"] == "replicas"})
    parts = []
    for label, op, key in (("download MB/s", "download", "mb_s"), ("get-by-id req/s", "get", "req_s")):
        one = median(op, 1, key)
        parts.append(f"{label} {one:.1f} with one replica; " + ", ".join(
            f"{n} replicas {median(op, n, key) / one:.2f}x" for n in counts[1:]))
    return ("replicas (mongodb, nginx round-robin, ratios to one replica): " + "; ".join(parts) +
            f". On this {os.cpu_count()}-core machine the replicas, nginx, the database and the client share "
            "the same cores, so more replicas cannot add capacity: these ratios show the cost of coordination "
            "(leases, locks, the balancer hop), not a speed-up. A ratio above 1 means one replica left the cores "
            "idle (waiting on the database, one query per connection at a time on the FerretDB test server), "
            "not that replicas scale; that needs a core, or a host, for each.")


SCENARIOS: dict[str, Callable[[Context, str], None]] = {
    "single": scenario_single,
    "concurrent": scenario_concurrent,
    "ranges": scenario_ranges,
    "segmented": scenario_segmented,
    "upload": scenario_upload,
    "metadata": scenario_metadata,
    "chunksize": scenario_chunksize,
    "client": scenario_client,
    "replicas": scenario_replicas,
    "floors": scenario_floors,
}


# -- the whole run ------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def _source_commit() -> str:
    head = _git("rev-parse", "HEAD")
    if head:
        return head
    marker = REPO / ".source-commit"  # an exported tree (git archive) may carry its commit here
    return marker.read_text().strip() if marker.exists() else "unknown"


def environment(ctx: Context) -> dict:
    import psutil

    cpu_model = ""
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("wrk") else "missing"
    return {
        "git_head": _source_commit(),
        "source": str(REPO),
        "git_dirty_files": len([line for line in _git("status", "--porcelain").splitlines() if line.strip()]),
        "host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "nginx": procs.nginx_version(), "wrk": wrk,
        "mongodb": None if ctx.mongo is None else (
            "FerretDB test server (tests/mongo_server, SQLite)" if ctx.mongo.is_test_server else "MONGODB_URL"),
        "service_capabilities": ctx.capabilities,
        "pinning": ("1-worker servers (service, nginx) on CPU 0, clients on the other CPUs; nothing pinned with "
                    "more workers") if ctx.opts.pin and procs.pinning_possible() else "off",
    }


def run(opts: Options) -> int:
    from . import report

    ctx = Context(opts)
    started = datetime.now(timezone.utc)
    ctx.say(f"bench: backends {','.join(opts.backends)}; scenarios {','.join(opts.scenarios)}; "
            f"{opts.rounds} rounds; results in {opts.out}")
    exit_code = 0
    try:
        for backend in opts.backends:
            if backend == "mongodb":
                ctx.mongodb()
            for name in opts.scenarios:
                t0 = time.monotonic()
                before = len(ctx.records)
                try:
                    SCENARIOS[name](ctx, backend)
                    outcome = "done"
                except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the others
                    outcome = f"failed: {type(e).__name__}: {e}"
                    ctx.failures.append(f"{backend} {name}: {outcome}")
                    ctx.say(f"[{backend}] {name} FAILED: {e}\n{traceback.format_exc()}")
                ctx.scenario_runs.append({"backend": backend, "scenario": name, "outcome": outcome,
                                          "records": len(ctx.records) - before,
                                          "seconds": round(time.monotonic() - t0, 1)})
        meta = {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - ctx.t0, 1),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
            "environment": environment(ctx),
            "sizes": {b: list(ctx.sizes(b)) for b in opts.backends},
            "range_file": {b: _range_file(ctx, b) for b in opts.backends},
        }
        report.write(opts.out, meta, ctx.records, ctx.scenario_runs, ctx.failures, ctx.notes)
        ctx.say(f"results: {opts.out / 'summary.md'}")
    finally:
        ctx.close()
    if ctx.failures:
        print("\nFAILED: " + f"{len(ctx.failures)} problem(s):", file=sys.stderr)
        for f in ctx.failures[:30]:
            print("  - " + f, file=sys.stderr)
        exit_code = 1
    return exit_code
