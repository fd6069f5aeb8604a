"""`python -m bench --quick` as a smoke test: every scenario completes, with
zero errors and every body verified. It asserts no speed: speeds are for the
bench's own reports, read as ratios to nginx and the raw driver."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from testkit.mongo_server import REPO
from tests.support.prerequisites import cannot_run

pytestmark = pytest.mark.slow


def test_bench_quick_completes_with_zero_errors(tmp_path):
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None
               and not os.path.exists(f"/usr/sbin/{tool}")]
    if missing:
        cannot_run(f"bench needs {', '.join(missing)} (make bench-tools installs them)")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    backends = {r["backend"] for r in results["summary"]}
    assert backends == {"embedded", "mongodb"}
    scenarios = {(r["backend"], r["scenario"]) for r in results["summary"]}
    for scenario in ("single", "concurrent", "ranges", "segmented", "upload", "metadata"):
        assert ("embedded", scenario) in scenarios and ("mongodb", scenario) in scenarios, scenario
    # embedded only: per-request cost against the bare aiohttp floor and nginx, each request kind once.
    floors = {(r["point"]["op"], r["point"]["peer"]) for r in results["summary"] if r["scenario"] == "floors"}
    assert floors == {("get", "floor"), ("list", "floor"), ("download 16KB", "floor"), ("download 16KB", "nginx"),
                      ("ttfb 16KB", "nginx")}, floors
    assert not any(r["backend"] == "mongodb" and r["scenario"] == "floors" for r in results["summary"])
    # mongodb only: chunk sizes, and replicas behind nginx (--quick: 1 and 2), reported as ratios.
    assert {r["point"]["chunk_kib"] for r in results["summary"] if r["scenario"] == "chunksize"} == {1024}
    replicas = {(r["point"]["replicas"], r["point"]["op"].split()[0]) for r in results["summary"]
                if r["scenario"] == "replicas"}
    assert replicas == {(1, "download"), (1, "get"), (2, "download"), (2, "get")}, replicas
    assert any(n.startswith("replicas (mongodb") and "2 replicas" in n for n in results["notes"]), results["notes"]
    for record in results["summary"]:
        assert record["ours_errors"] == 0 and record["peer_errors"] == 0, record["point"]
        assert record["ours_requests"] > 0, record["point"]
    for backend in ("embedded", "mongodb"):
        uploads = {(r["scenario"], r["point"]["method"], r["point"]["concurrency"]): r for r in results["summary"]
                   if r["backend"] == backend and r["scenario"].startswith("upload")}
        # Each upload variant ran, against its peer, and every body it sent was verified (the
        # service's sha256 of it, or the files document's length and chunk count): bytes, never speeds.
        assert set(uploads) == {("upload", "PUT", 1), ("upload", "PUT", 4), ("upload", "session", 1),
                                ("upload_hashlib", "PUT", 1), ("upload_hashlib", "session", 1),
                                ("upload_rss", "PUT", 8)}, (backend, sorted(uploads))
        for key, r in uploads.items():
            assert r["ours_verified"] == r["ours_requests"] == r["point"]["concurrency"] * r["rounds"], (backend, key)
            if key[0] != "upload_rss":
                assert r["peer_verified"] == r["peer_requests"] > 0, (backend, key)
        assert uploads[("upload_hashlib", "PUT", 1)]["peer_who"] == "hashlib.sha256, one thread"
        rss = uploads[("upload_rss", "PUT", 8)]
        assert rss["ours_rss_peak_mb_max"] > 0 and rss["metrics"]["gb"]["ours"] > 0
    [errors] = [t for t in results["targets"] if t["target"].startswith("zero errors")]
    assert errors["met"], errors
    assert (out / "summary.md").exists() and list(out.glob("*.png"))


def test_snapshots_bench_completes_and_sends_only_what_changed(tmp_path):
    """bench.snapshots at a small scale: every file verified; the delta and the warm fetch are
    byte and request counts, which hold at any scale (the speeds are its report's business)."""
    missing = [tool for tool in ("nginx", "aria2c", "curl") if shutil.which(tool) is None
               and not os.path.exists(f"/usr/sbin/{tool}")]
    if missing:
        cannot_run(f"bench.snapshots needs {', '.join(missing)} (make bench-tools installs them)")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.snapshots", "--scale", "0.01", "--rounds", "1",
                           "--clients", "2", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    delta = results["delta"]
    assert delta["push_said"]["already_stored"] == delta["files"] - 1
    # Request heads and JSON bodies ride on top of the changed file's bytes.
    assert delta["changed_bytes"] <= delta["v2_push_sent"] <= delta["changed_bytes"] * 1.05
    assert delta["changed_bytes"] <= delta["v2_fetch_received"] <= delta["changed_bytes"] * 1.05
    assert results["warm"]["warm_requests"] == 1 and results["warm"]["warm_statuses"] == [304]
    assert set(results["cold"]["median_s"]) == {"pull", "aria2c on service", "aria2c on nginx"}
    assert results["tar"]["bytes"] > results["cold"]["bytes"]
    assert results["rss"]["rss_peak_mb"] > 0
