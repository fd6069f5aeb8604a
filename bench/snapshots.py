"""``python -m bench.snapshots``: multi-file versions measured against aria2c, curl and nginx.

Five measurements, each in one run on 127.0.0.1 (medians of the rounds, tools
interleaved, every file sha256-checked):

- delta: push v2 of a 12-file model (2 GB) in which one 150 MB file changed, and
  fetch v2 into a cache holding v1. Bytes are counted on the wire by an nginx
  reverse proxy in front of the service (``$request_length``/``$bytes_sent``).
- warm: a warm ``fetch`` of a 1000-file snapshot; HTTP requests counted by the
  same proxy.
- cold: a pull of 1000 files of 16 KB plus 4 of 256 MB, against ``aria2c -i
  <urls> -j 16 -x 4`` on the service's per-file URLs and on nginx serving the
  same tree as static files.
- tar: that snapshot's ``/download`` (the tar) with curl, against nginx serving a
  file of the same size.
- rss: the service's peak RSS while 16 clients pull the 1000-file snapshot.

    python -m bench.snapshots                 # all, full sizes, 3 rounds
    python -m bench.snapshots --scale 0.05 --rounds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorfleet_client import ModelServiceClient

from bench.procs import Sampler
from testkit.files import sha256_of, write_random
from testkit.live_service import LiveService
from testkit.mongo_server import REPO, MongoTestServer, free_port
from testkit.peer import NginxProcess

RESULTS = REPO / "bench" / "results"
MB = 1_000_000
MiB = 1 << 20

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    error_log {dir}/error.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    log_format wire '$request_method $status $request_length $bytes_sent';
    server {{
        # The same tree as static files: the per-file ceiling.
        listen 127.0.0.1:{static_port};
        root {tree};
    }}
    server {{
        # A counting proxy in front of the service: bytes on the wire, both ways.
        listen 127.0.0.1:{proxy_port};
        access_log {dir}/wire.log wire;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{ proxy_pass {service}; }}
    }}
}}
"""


class Nginx(NginxProcess):
    """nginx as the static peer and as a byte-counting proxy in front of the service."""

    def __init__(self, work: Path, tree: Path, service_url: str) -> None:
        super().__init__(work / "nginx", "nginx is not installed (Debian: apt-get install -y nginx-light)")
        # Workers run as nobody when nginx starts as root.
        for d in (work, tree):
            d.chmod(0o755)
        # nginx binds both ports before it serves either: the static one answering means both do.
        self.static_port, self.proxy_port = self.port, free_port()
        self.static_url = self.url
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.write_conf(NGINX_CONF.format(
            dir=self.dir, tree=tree, static_port=self.static_port, proxy_port=self.proxy_port,
            service=service_url))
        self.launch_nginx()

    def wire(self) -> list[tuple[str, int, int, int]]:
        """(method, status, request bytes, response bytes) of every proxied request so far."""
        log = self.dir / "wire.log"
        if not log.exists():
            return []
        rows = []
        for line in log.read_text().splitlines():
            method, status, received, sent = line.split()
            rows.append((method, int(status), int(received), int(sent)))
        return rows

def model_tree(root: Path, files: dict[str, int]) -> dict[str, str]:
    """Write random files at the given relative paths; their sha256s."""
    digests = {}
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digests[rel] = write_random(path, size)
    return digests


def tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str, url: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "app", *args, "--url", url, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model-service {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def push(path: Path, name: str, url: str) -> tuple[str, dict]:
    """Push a folder with the CLI; (model id, its JSON answer: files, already_stored, bytes_sent...)."""
    proc = cli("push", str(path), "--name", name, "--algorithm", "bench", "--json", url=url)
    answer = json.loads(proc.stdout)
    return answer["model_id"], answer


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return seconds


def delta(work: Path, service: LiveService, nginx: Nginx, scale: float) -> dict:
    """Push and fetch v2 of a 12-file model in which one 150 MB file changed."""
    shard, changed = int(264 * MB * scale), int(150 * MB * scale)
    files = {"config.json": 2_000, "tokenizer.json": 9_000_000 // 4, "generation_config.json": 300,
             "special_tokens_map.json": 500, "changed.safetensors": changed}
    files |= {f"model-{i:05d}-of-00007.safetensors": shard for i in range(1, 8)}
    src = work / "delta-src"
    model_tree(src, files)
    total = sum(files.values())
    before = len(nginx.wire())
    push(src, "deltabench", nginx.proxy_url)
    v1_sent = sum(r[2] for r in nginx.wire()[before:])
    cache = work / "delta-cache"
    with ModelServiceClient(nginx.proxy_url) as c:
        c.fetch("deltabench", cache_dir=cache)
    write_random(src / "changed.safetensors", changed)
    before = len(nginx.wire())
    _, said = push(src, "deltabench", nginx.proxy_url)
    v2_sent = sum(r[2] for r in nginx.wire()[before:])
    before = len(nginx.wire())
    with ModelServiceClient(nginx.proxy_url) as c:
        folder = Path(c.fetch("deltabench", cache_dir=cache))
    v2_received = sum(r[3] for r in nginx.wire()[before:])
    if tree_digests(folder) != tree_digests(src):
        raise RuntimeError("the fetched v2 differs from what was pushed")
    return {"files": len(files), "total_bytes": total, "changed_bytes": changed,
            "v1_push_sent": v1_sent, "v2_push_sent": v2_sent, "v2_fetch_received": v2_received,
            "push_sent_over_changed": v2_sent / changed, "fetch_received_over_changed": v2_received / changed,
            "push_said": said}


def small_tree(root: Path, count: int, size: int, large: int, large_size: int) -> dict[str, int]:
    files = {f"small/{i // 100:02d}/file-{i:04d}.json": size for i in range(count)}
    files |= {f"shard-{i}.bin": large_size for i in range(large)}
    model_tree(root, files)
    return files


def warm(work: Path, nginx: Nginx) -> dict:
    """A warm fetch of a 1000-file snapshot: how many requests it makes."""
    src = work / "warm-src"
    small_tree(src, 1000, 16 * 1024, 0, 0)
    push(src, "warmbench", nginx.proxy_url)
    cache = work / "warm-cache"
    with ModelServiceClient(nginx.proxy_url) as c:
        started = time.perf_counter()
        c.fetch("warmbench", cache_dir=cache)
        cold_s = time.perf_counter() - started
    before = len(nginx.wire())
    with ModelServiceClient(nginx.proxy_url) as c:
        started = time.perf_counter()
        folder = Path(c.fetch("warmbench", cache_dir=cache))
        warm_s = time.perf_counter() - started
    rows = nginx.wire()[before:]
    if tree_digests(folder) != tree_digests(src):
        raise RuntimeError("the warm fetch's folder differs from what was pushed")
    return {"files": 1000, "cold_fetch_s": cold_s, "warm_fetch_s": warm_s, "warm_requests": len(rows),
            "warm_statuses": [r[1] for r in rows]}


def cold(work: Path, service: LiveService, nginx: Nginx, tree: Path, scale: float, rounds: int) -> dict:
    """Pull 1000 x 16 KB + 4 x 256 MB: our pull against aria2c on our URLs and on nginx's."""
    large = int(256 * MB * scale)
    files = small_tree(tree, 1000, 16 * 1024, 4, large)
    expected = tree_digests(tree)
    model_id, _ = push(tree, "coldbench", service.url)
    lists = {}
    bases = {"service": f"{service.url}/api/v1/models/{model_id}/files/", "nginx": nginx.static_url + "/"}
    for peer, base in bases.items():
        lines = []
        for rel in files:
            lines += [base + rel, f"  out={rel}"]
        lists[peer] = work / f"urls-{peer}.txt"
        lists[peer].write_text("\n".join(lines) + "\n")
    out = work / "cold-out"

    def aria2c(peer: str) -> list[str]:
        return ["aria2c", "-i", str(lists[peer]), "-j", "16", "-x", "4", "-s", "4", "-k", "1M", "--quiet",
                "--allow-overwrite=true", "--auto-file-renaming=false", "--file-allocation=none", "-d", str(out)]

    tools = {
        "pull": [sys.executable, "-m", "app", "pull", "coldbench", "-o", str(out), "--url", service.url,
                 "--no-progress"],
        "aria2c on service": aria2c("service"),
        "aria2c on nginx": aria2c("nginx"),
    }
    runs: dict[str, list[float]] = {name: [] for name in tools}
    names = list(tools)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            shutil.rmtree(out, ignore_errors=True)
            if name != "pull":
                out.mkdir()
            runs[name].append(timed(tools[name]))
            if tree_digests(out) != expected:
                raise RuntimeError(f"{name}: the pulled tree differs from the pushed one")
            print(f"  cold round {r + 1}/{rounds} {name}: {runs[name][-1]:.2f} s (all sha256 ok)", flush=True)
    medians = {name: statistics.median(v) for name, v in runs.items()}
    return {"files": len(files), "bytes": sum(files.values()), "model_id": model_id, "seconds": runs,
            "median_s": medians,
            "pull_speed_over_aria2c_service": medians["aria2c on service"] / medians["pull"],
            "pull_speed_over_aria2c_nginx": medians["aria2c on nginx"] / medians["pull"]}


def tar(work: Path, service: LiveService, nginx: Nginx, tree: Path, model_id: str, rounds: int) -> dict:
    """The snapshot's tar with curl, against nginx serving one file of the same size."""
    import tarfile

    url = f"{service.url}/api/v1/models/{model_id}/download"
    out = work / "snapshot.tar"
    subprocess.run(["curl", "-sS", "--fail", "-o", str(out), url], check=True)
    size = out.stat().st_size
    expected = tree_digests(tree)
    unpacked = work / "tar-unpacked"
    unpacked.mkdir()
    with tarfile.open(out) as t:
        t.extractall(unpacked, filter="data")
    if tree_digests(unpacked) != expected:
        raise RuntimeError("the tar does not unpack to the snapshot's files")
    shutil.rmtree(unpacked)
    tar_digest = sha256_of(out)
    peer = tree / "same-size.bin"
    write_random(peer, size)
    tools = {"curl tar": ["curl", "-sS", "--fail", "-o", str(out), url],
             "curl nginx file": ["curl", "-sS", "--fail", "-o", str(out), nginx.static_url + "/same-size.bin"]}
    runs: dict[str, list[float]] = {name: [] for name in tools}
    try:
        for r in range(rounds):
            for name in (list(tools) if r % 2 == 0 else list(tools)[::-1]):
                runs[name].append(timed(tools[name]))
                if name == "curl tar" and sha256_of(out) != tar_digest:
                    raise RuntimeError("two downloads of the tar differ")
                print(f"  tar round {r + 1}/{rounds} {name}: {size / MB / runs[name][-1]:.0f} MB/s", flush=True)
    finally:
        peer.unlink()
    mb_s = {name: size / MB / statistics.median(v) for name, v in runs.items()}
    return {"bytes": size, "mb_s": mb_s, "tar_over_nginx": mb_s["curl tar"] / mb_s["curl nginx file"]}


def rss(work: Path, service: LiveService, clients: int) -> dict:
    """Peak service RSS while many clients pull the 1000-file snapshot at once."""
    procs = []
    with Sampler(service.pid) as sampler:
        for i in range(clients):
            procs.append(subprocess.Popen([sys.executable, "-m", "app", "pull", "warmbench", "-o",
                                           str(work / f"rss-{i}"), "--url", service.url, "--no-progress"],
                                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        failed = [p.stderr.read().decode()[-500:] for p in procs if p.wait(600) != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} pulls failed: {failed[0]}")
    return {"clients": clients, **sampler.figures()}


def summary(results: dict, args: argparse.Namespace) -> str:
    d, w, c, t, r = (results.get(k) for k in ("delta", "warm", "cold", "tar", "rss"))
    lines = [f"# Multi-file versions, embedded backend, scale {args.scale}, median of {args.rounds} rounds", ""]
    if d:
        said = d["push_said"]
        lines += [f"- delta: push v2 ({d['files']} files, {d['total_bytes'] / MB:.0f} MB, one "
                  f"{d['changed_bytes'] / MB:.0f} MB file changed) sent {d['v2_push_sent'] / MB:.1f} MB = "
                  f"{d['push_sent_over_changed']:.4f}x the changed file (v1 sent {d['v1_push_sent'] / MB:.0f} MB); "
                  f"fetching v2 into a cache holding v1 received {d['v2_fetch_received'] / MB:.1f} MB = "
                  f"{d['fetch_received_over_changed']:.4f}x. The CLI counted {said['already_stored']} of "
                  f"{said['files']} files already stored, {said['bytes_sent'] / MB:.1f} MB sent"]
    if w:
        lines += [f"- warm fetch of {w['files']} files: {w['warm_requests']} HTTP request(s) "
                  f"(statuses {w['warm_statuses']}), {w['warm_fetch_s'] * 1000:.0f} ms; cold fetch "
                  f"{w['cold_fetch_s']:.2f} s"]
    if c:
        lines += ["", f"Cold pull of {c['files']} files ({c['bytes'] / MB:.0f} MB), every file sha256-checked:", "",
                  "| tool | seconds (median) | all rounds |", "| --- | --- | --- |"]
        lines += [f"| {name} | {c['median_s'][name]:.2f} | {', '.join(f'{s:.2f}' for s in v)} |"
                  for name, v in c["seconds"].items()]
        lines += ["", f"pull speed / aria2c on the service: {c['pull_speed_over_aria2c_service']:.2f}x; "
                  f"/ aria2c on nginx: {c['pull_speed_over_aria2c_nginx']:.2f}x"]
    if t:
        lines += ["", f"- tar of the snapshot ({t['bytes'] / MB:.0f} MB) with curl: {t['mb_s']['curl tar']:.0f} MB/s; "
                  f"nginx serving a file of that size: {t['mb_s']['curl nginx file']:.0f} MB/s = "
                  f"{t['tar_over_nginx']:.2f}x"]
    if r:
        lines += [f"- service RSS while {r['clients']} clients pull the 1000-file snapshot: peak "
                  f"{r['rss_peak_mb']:.0f} MB"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply the large files' sizes (default 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", choices=["embedded", "mongodb"], default="embedded")
    p.add_argument("--scenarios", default="delta,warm,cold,tar,rss")
    p.add_argument("--clients", type=int, default=16, help="concurrent pulls for the rss scenario")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>-snapshots)")
    args = p.parse_args(argv)
    scenarios = set(args.scenarios.split(","))
    missing = [t for t in ("curl", "aria2c") if shutil.which(t) is None]
    if missing:
        print(f"bench.snapshots needs {', '.join(missing)} (apt-get install curl aria2)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-snapshots-"))
    tree = work / "tree"
    tree.mkdir()
    env = {"DATA_DIR": str(work / "data"), "MONGODB_URL": "", "MAX_FILE_SIZE": "100GB", "LOG_LEVEL": "WARNING"}
    mongo = None
    if args.backend == "mongodb":
        mongo = MongoTestServer()
        mongo.start()
        env.update(MONGODB_URL=mongo.url, MONGODB_DB="bench_snapshots")
    service = LiveService(env, work / "service.log")
    nginx = None
    results: dict = {}
    try:
        service.start()
        nginx = Nginx(work, tree, service.url)
        if "delta" in scenarios:
            print("delta: push and fetch v2 with one changed file", flush=True)
            results["delta"] = delta(work, service, nginx, args.scale)
        if "warm" in scenarios or "rss" in scenarios:
            print("warm: fetch of a 1000-file snapshot, twice", flush=True)
            results["warm"] = warm(work, nginx)
        if "cold" in scenarios or "tar" in scenarios:
            print("cold: pull against aria2c", flush=True)
            results["cold"] = cold(work, service, nginx, tree, args.scale, args.rounds)
        if "tar" in scenarios:
            print("tar: curl of the snapshot's tar against nginx", flush=True)
            results["tar"] = tar(work, service, nginx, tree, results["cold"]["model_id"], args.rounds)
        if "rss" in scenarios:
            print(f"rss: {args.clients} pulls at once", flush=True)
            results["rss"] = rss(work, service, args.clients)
    finally:
        if nginx is not None:
            nginx.stop()
        service.stop()
        if mongo is not None:
            mongo.close()
        shutil.rmtree(work, ignore_errors=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(args.out) if args.out else RESULTS / f"{stamp}-snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    text = summary(results, args)
    (folder / "summary.md").write_text(text)
    (folder / "results.json").write_text(json.dumps({"args": vars(args), **results}, indent=2, default=str))
    print(text)
    print(f"results: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
