"""``python -m bench.ui``: what the web UI's pages cost the server, beside the JSON API.

Fills an embedded registry with N models (10,000 by default; one name has a
few versions with a file), serves the application on 127.0.0.1 and asks, in
alternation, for each UI page and the JSON request(s) that answer the same
query. Server time runs from the first middleware in to the response out
(perf_counter); the client's round trip is reported beside it. Medians land in
bench/results/<timestamp>-ui/ (results.json, summary.md). The target: a page
costs at most 2x its JSON endpoint. Exit status 1 if a page missed it or any
answer was wrong.

    python -m bench.ui                     # 10,000 models, 200 rounds
    python -m bench.ui --models 500 --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app import registry
from app.config import Settings
from app.server import create_app
from app.storage import make_storage
from bench.run import model_body
from testkit.mongo_server import REPO

RESULTS = REPO / "bench" / "results"
TARGET = 2.0


async def _fill(data_dir: Path, n: int) -> str:
    """N models straight into storage (the registry's own documents); the id of one with versions."""
    storage = make_storage(Settings(data_dir=str(data_dir)))
    await storage.open()
    try:
        for i in range(n):
            await storage.insert_model(registry.model_document(model_body(i), "v1.0"))
        parent = None
        for minor in range(5):
            fields = {**model_body(1), "name": "churn-ui-bench"}
            doc = await registry.create(storage, fields, parent_id=parent)
            parent = doc["id"]
        async with storage.file_writer() as w:
            await w.write(b"\0" * 4096)
            stored = await w.commit()
        await storage.update_model(parent, {"file_metadata": {
            "file_id": stored.file_id, "filename": "model.pkl", "size_bytes": stored.size,
            "checksum": f"sha256:{stored.sha256}", "chunk_size": stored.chunk_size, "content_type":
            "application/octet-stream", "format": "pkl", "uploaded_at": stored.uploaded_at}})
        await storage.settle_file(stored.file_id)
        return parent
    finally:
        await storage.close()


def pairs(model_id: str, limit: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each page and the JSON request(s) that answer the same question.

    A model page shows the version and its name's versions: GET {id} and GET {id}/versions.
    """
    api = "/api/v1/models"
    return {
        "models, first page": (f"/ui?limit={limit}", (f"{api}?limit={limit}",)),
        "models, search + sort": (f"/ui?q=churn&sort=-metrics.accuracy&limit={limit}",
                                  (f"{api}?q=churn&sort=-metrics.accuracy&limit={limit}",)),
        "models, filters, page 40": (
            f"/ui?algorithm=xgboost&tags=production&min_accuracy=0.6&sort=name&limit={limit}&page=40",
            (f"{api}?algorithm=xgboost&tags=production&min_accuracy=0.6&sort=name&limit={limit}&page=40",)),
        "model version": (f"/ui/models/{model_id}", (f"{api}/{model_id}", f"{api}/{model_id}/versions")),
    }


async def measure(data_dir: Path, cases: dict[str, tuple[str, tuple[str, ...]]], rounds: int):
    """Server time of each request (the app's whole middleware chain, perf_counter), and the round trip."""
    server: dict[str, float] = {}

    @web.middleware
    async def timing(request: web.Request, handler):
        t0 = time.perf_counter()
        try:
            return await handler(request)
        finally:
            server[request.path_qs] = (time.perf_counter() - t0) * 1000

    app = create_app(Settings(data_dir=str(data_dir)))
    app.middlewares.insert(0, timing)
    samples: dict[str, dict[str, list[float]]] = {p: {"server": [], "client": []}
                                                  for page, apis in cases.values() for p in (page, *apis)}
    failures: list[str] = []
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for r in range(-10, rounds):  # ten rounds of warm-up, not counted
            for page, apis in cases.values():
                # Alternate which goes first, so neither always follows the other.
                for path in ((page, *apis) if r % 2 else (*apis, page)):
                    t0 = time.perf_counter()
                    async with client.get(path) as resp:
                        body = await resp.read()
                    took = (time.perf_counter() - t0) * 1000
                    if resp.status != 200 or not body:
                        failures.append(f"{path}: status {resp.status}")
                    if r >= 0:
                        samples[path]["server"].append(server[path])
                        samples[path]["client"].append(took)
    rows = []
    for name, (page, apis) in cases.items():
        med = {p: {k: statistics.median(v) for k, v in samples[p].items()} for p in (page, *apis)}
        row = {"case": name, "page": page, "json": list(apis),
               "server_page_ms": med[page]["server"], "server_json_ms": sum(med[a]["server"] for a in apis),
               "client_page_ms": med[page]["client"], "client_json_ms": sum(med[a]["client"] for a in apis)}
        row["ratio"] = row["server_page_ms"] / row["server_json_ms"]
        rows.append(row)
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--limit", type=int, default=25, help="rows per page (the UI's default)")
    parser.add_argument("--target", type=float, default=TARGET, help="largest page/JSON ratio that passes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or RESULTS / (dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-ui")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        model_id = asyncio.run(_fill(work / "data", args.models))
        print(f"registry filled with {args.models} models in {time.monotonic() - t0:.1f} s", flush=True)
        # uvloop, as the service runs; the clock is perf_counter, not the loop's (ms steps).
        rows, failures = uvloop.run(measure(work / "data", pairs(model_id, args.limit), args.rounds))
    for row in rows:
        if row["ratio"] > args.target:
            failures.append(f"{row['case']}: the page costs {row['ratio']:.2f}x its JSON (target {args.target}x)")
    lines = [f"# Web UI render time, {args.models} models, embedded backend, median of {args.rounds} rounds", "",
             "JSON for a model version is GET {id} plus GET {id}/versions, "
             "the two calls that carry what the page shows.",
             "",
             "| case | page, server ms | JSON, server ms | page / JSON | page, client ms | JSON, client ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['case']} | {r['server_page_ms']:.1f} | {r['server_json_ms']:.1f} | {r['ratio']:.2f}x | "
              f"{r['client_page_ms']:.1f} | {r['client_json_ms']:.1f} |" for r in rows]
    lines += ["", *(f"- FAILED: {f}" for f in failures)]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps({"models": args.models, "rounds": args.rounds, "rows": rows,
                                                   "failures": failures}, indent=2))
    print(summary + f"results in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
