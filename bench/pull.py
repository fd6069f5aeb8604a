"""``python -m bench.pull``: the client's parallel pull against curl and aria2c -x8.

One file, one service, the same URL for every tool; rounds interleave the
tools (the order rotates each round) and every download is sha256-checked.
Reports the median MB/s of each tool and the client's ratio to each peer (of the
medians, and the median of the ratios within each round), in
bench/results/<timestamp>-pull/ (results.json, summary.md).

    python -m bench.pull                      # 1 GB file, embedded backend, 3 rounds
    python -m bench.pull --size 256MB --backend mongodb --parallel 8
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

from app.config import parse_size
from testkit.files import sha256_of, write_random
from testkit.live_service import LiveService
from testkit.mongo_server import REPO, MongoTestServer

RESULTS = REPO / "bench" / "results"


def tools(base: str, model_id: str, out: Path, parallel: int) -> dict[str, list[str]]:
    url = f"{base}/api/v1/models/{model_id}/download"
    return {
        "client": [sys.executable, "-m", "app", "pull", model_id, "--url", base, "--no-progress",
                   "--parallel", str(parallel), "-o", str(out)],
        "curl": ["curl", "-sS", "--fail", "-o", str(out), url],
        "aria2c -x8": ["aria2c", "-x8", "-s8", "-k1M", "--quiet", "--allow-overwrite=true",
                       "--auto-file-renaming=false", "--file-allocation=none", "-d", str(out.parent),
                       "-o", out.name, url],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pull", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1GB", help="file size (default 1GB)")
    p.add_argument("--backend", choices=["embedded", "mongodb"], default="embedded")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=4, help="the client's ranges (default 4, its own default)")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>-pull)")
    args = p.parse_args(argv)
    missing = [t for t in ("curl", "aria2c") if shutil.which(t) is None]
    if missing:
        print(f"bench.pull needs {', '.join(missing)} (apt-get install curl aria2)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    mongo = None
    env = {"DATA_DIR": str(work / "data"), "MONGODB_URL": "", "MAX_FILE_SIZE": str(size + 1), "LOG_LEVEL": "WARNING"}
    if args.backend == "mongodb":
        mongo = MongoTestServer()
        mongo.start()
        env.update(MONGODB_URL=mongo.url, MONGODB_DB="bench_pull")
    service = LiveService(env, work / "service.log")
    try:
        service.start()
        source = work / "model.bin"
        print(f"writing {size} random bytes", flush=True)
        digest = write_random(source, size)
        push = subprocess.run([sys.executable, "-m", "app", "push", str(source), "--name", "pullbench",
                               "--algorithm", "bench", "--url", service.url, "--json", "--no-progress"],
                              cwd=REPO, capture_output=True, text=True, check=True)
        model_id = json.loads(push.stdout)["model_id"]
        out = work / "out" / "model.bin"
        out.parent.mkdir()
        runs: dict[str, list[float]] = {}
        names = list(tools(service.url, model_id, out, args.parallel))
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out.unlink(missing_ok=True)
                started = time.perf_counter()
                proc = subprocess.run(tools(service.url, model_id, out, args.parallel)[name], cwd=REPO,
                                      capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if proc.returncode != 0 or sha256_of(out) != digest:
                    print(f"{name}: FAILED (exit {proc.returncode}) {proc.stderr[-500:]}", file=sys.stderr)
                    return 1
                mb_s = size / 1e6 / seconds
                runs.setdefault(name, []).append(mb_s)
                print(f"round {r + 1}/{args.rounds} {name}: {mb_s:.0f} MB/s (sha256 ok)", flush=True)
    finally:
        service.stop()
        if mongo is not None:
            mongo.close()
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(v) for name, v in runs.items()}
    # Ratios within a round first: on a shared machine the load moves both tools of a round together.
    round_ratios = {name: statistics.median(c / t for c, t in zip(runs["client"], v)) for name, v in runs.items()}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(args.out) if args.out else RESULTS / f"{stamp}-pull"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"| {name} | {medians[name]:.0f} | {min(v):.0f}-{max(v):.0f} | "
            f"{medians['client'] / medians[name]:.2f}x | {round_ratios[name]:.2f}x |" for name, v in runs.items()]
    summary = "\n".join([
        f"# Parallel pull, {args.size} file, {args.backend} backend, median of {args.rounds} rounds",
        "",
        f"The client pulls with `--parallel {args.parallel}`; every download sha256-checked.",
        "",
        "| tool | MB/s (median) | range | client / tool (medians) | client / tool (median of per-round ratios) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
    ])
    (folder / "summary.md").write_text(summary)
    (folder / "results.json").write_text(json.dumps({
        "size": size, "backend": args.backend, "rounds": args.rounds, "parallel": args.parallel,
        "mb_s": runs, "median_mb_s": medians, "median_round_ratio": round_ratios, "sha256": digest,
    }, indent=2))
    print(summary)
    print(f"results: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
