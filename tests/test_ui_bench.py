"""`python -m bench.ui` on a small registry: it runs, every answer is 200, every case is measured.
It asserts no speed (a shared CI machine is no place for that); the README quotes a full run."""

import json
import subprocess
import sys

from testkit.mongo_server import REPO


def test_ui_bench_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.ui", "--models", "150", "--rounds", "3", "--target", "1000",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failures"] == []
    assert [r["case"] for r in results["rows"]] == [
        "models, first page", "models, search + sort", "models, filters, page 40", "model version"]
    for row in results["rows"]:
        assert row["server_page_ms"] > 0 and row["server_json_ms"] > 0
