"""The client CLI (``model-service push/pull/list/show/versions/rm/stats``) as a real
process against the service as a real process, on both backends."""

from __future__ import annotations

import functools
import http.server
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest
from tensorfleet_client.download import PARALLEL_THRESHOLD

from testkit.mongo_server import REPO
from tests.client_helpers import live, sha256_of, unique, write_random  # noqa: F401  (live is a fixture)

BIG = 300 * 1000 * 1000  # the 300 MB
# On FerretDB every range read scans the whole chunks collection, so its copy of the test takes the smallest
# file the client still pulls in 4 parallel ranges (over 64 MB): the ranges and their joins are the same.
BIG_ON_FERRETDB = PARALLEL_THRESHOLD + 6 * 1000 * 1000


def ok_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def push(live, path, name: str, *extra: str) -> dict:
    return ok_json(live.cli("push", str(path), "--name", name, "--algorithm", "random_forest", "--json", *extra,
                            timeout=300))


def test_push_pull_show_list_versions_rm(live, tmp_path):
    src = tmp_path / "model.pkl"
    digest = write_random(src, 2_000_000)
    name = unique("cli")
    pushed = push(live, src, name, "--metric", "accuracy=0.93", "--param", "n_estimators=150",
                  "--param", "criterion=gini", "--tag", "churn", "--tag", "prod", "--description", "first")
    model_id = pushed["model_id"]
    assert pushed["version"] == "v1.0" and pushed["checksum"] == f"sha256:{digest}"

    pulled = ok_json(live.cli("pull", name, "-o", str(tmp_path / "pulled.pkl"), "--json"))
    assert pulled["model_id"] == model_id and pulled["bytes_transferred"] == 2_000_000
    assert (tmp_path / "pulled.pkl").read_bytes() == src.read_bytes()
    # Without -o: the server's file name, in the current directory.
    here = tmp_path / "here"
    here.mkdir()
    proc = live.cli("pull", model_id, cwd=here)
    assert proc.returncode == 0, proc.stderr
    assert "sha256 verified" in proc.stdout and proc.stderr == ""  # no progress bar off a terminal
    assert sha256_of(here / "model.pkl") == digest

    shown = live.cli("show", model_id)
    assert shown.returncode == 0, shown.stderr
    assert f"name:             {name}" in shown.stdout and "accuracy=0.93" in shown.stdout
    assert f"sha256:{digest}" in shown.stdout
    doc = ok_json(live.cli("show", name, "--json"))
    assert doc["hyperparameters"] == {"n_estimators": 150, "criterion": "gini"}
    assert doc["tags"] == ["churn", "prod"] and doc["description"] == "first"

    second = push(live, src, name, "--breaking", "--metric", "accuracy=0.95")
    assert second["version"] == "v2.0"
    versions = live.cli("versions", name)
    assert versions.returncode == 0, versions.stderr
    lines = versions.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "VERSION"]
    assert [line.split()[2] for line in lines[1:]] == ["v2.0", "v1.0"]

    listed = live.cli("list", "-q", name, "--sort=-metrics.accuracy")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [second["model_id"], model_id]
    page = ok_json(live.cli("list", "--tag", "prod", "-q", name, "--json"))
    assert [m["id"] for m in page["models"]] == [model_id] and page["pagination"]["total"] == 1

    removed = live.cli("rm", model_id)
    assert removed.returncode == 0 and model_id in removed.stdout
    for args in (("show", model_id), ("rm", model_id), ("pull", model_id, "-o", str(tmp_path / "gone"))):
        proc = live.cli(*args)
        assert proc.returncode == 3, (args, proc.stderr)
        assert "not_found" in proc.stderr
    assert not (tmp_path / "gone").exists()


def test_pull_killed_halfway_resumes(live, tmp_path):
    src = tmp_path / "src.bin"
    size = 4_000_000
    digest = write_random(src, size)
    model_id = push(live, src, unique("killed"))["model_id"]
    target = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"

    proc = live.cli_popen("pull", model_id, "-o", str(target), "--limit-rate", "1M", "--json")
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 1_000_000):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the temporary file did not grow"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to clean up or save anything
    proc.communicate()
    assert not target.exists()
    partial = part.stat().st_size
    assert 1_000_000 < partial < size

    out = ok_json(live.cli("pull", model_id, "-o", str(target), "--json"))
    assert out["resumed_bytes"] == partial
    assert out["bytes_transferred"] == size - partial < size
    assert sha256_of(target) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "src.bin"]


def test_pull_stopped_with_sigterm_saves_its_ranges_and_resumes(live, tmp_path):
    src = tmp_path / "src.bin"
    size = 6_000_000
    digest = write_random(src, size)
    model_id = push(live, src, unique("stopped"))["model_id"]
    target = tmp_path / "model.bin"
    state = tmp_path / "model.bin.part.json"

    proc = live.cli_popen("pull", model_id, "-o", str(target), "--parallel", "4", "--limit-rate", "2M")
    deadline = time.monotonic() + 30
    while saved_bytes(state) < 1_000_000:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in stderr
    assert not target.exists()
    saved = saved_bytes(state)

    out = ok_json(live.cli("pull", model_id, "-o", str(target), "--json"))
    assert out["parallel"] == 4 and out["resumed_bytes"] == saved
    assert out["bytes_transferred"] == size - saved
    assert sha256_of(target) == digest
    assert not state.exists()


def saved_bytes(state) -> int:
    try:
        return sum(done for _, _, done in json.loads(state.read_bytes())["segments"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or caught mid-write


def test_tampered_file_fails_with_exit_code_4_and_leaves_no_file(live, tmp_path):
    src = tmp_path / "src.bin"
    digest = write_random(src, 1_000_000)
    model_id = push(live, src, unique("tampered"))["model_id"]
    live.tamper(digest)
    out = tmp_path / "out"
    out.mkdir()

    proc = live.cli("pull", model_id, "-o", str(out / "model.bin"))
    assert proc.returncode == 4, proc.stderr
    assert "sha256" in proc.stderr and digest in proc.stderr
    proc = live.cli("pull", model_id, "--json", cwd=out)  # into the directory, under the server's name
    assert proc.returncode == 4, proc.stderr
    assert list(out.iterdir()) == []


def test_two_processes_fetching_the_same_model_download_it_once(live, tmp_path):
    src = tmp_path / "src.bin"
    digest = write_random(src, 3_000_000)
    name = unique("fleet")
    model_id = push(live, src, name)["model_id"]
    cache = tmp_path / "cache"

    since = live.log_offset()
    # Slow enough that all three are running while the first one downloads.
    procs = [live.cli_popen("pull", name, "--cache-dir", str(cache), "--json", "--limit-rate", "1500k")
             for _ in range(3)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))

    assert sorted(r["cached"] for r in results) == [False, True, True]
    assert len({r["path"] for r in results}) == 1 and sha256_of(results[0]["path"]) == digest
    downloader = next(r for r in results if not r["cached"])
    assert downloader["bytes_transferred"] == 3_000_000
    requests = live.requests(since, "/download")
    assert [r for r in requests if r[0] == "GET"] == [("GET", f"/api/v1/models/{model_id}/download", 206)]
    heads = sorted(status for method, _, status in requests if method == "HEAD")
    assert heads == [200, 304, 304]


def test_progress_bar_only_on_a_terminal(live, tmp_path):
    src = tmp_path / "src.bin"
    write_random(src, 2_000_000)
    model_id = push(live, src, unique("progress"))["model_id"]  # stderr not a terminal: checked empty below

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "app", "pull", model_id, "-o", str(tmp_path / "out.bin"),
                             "--limit-rate", "4M"], cwd=REPO, env=live.cli_env(), stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(30) == 0
    proc.stdout.close()
    text = seen.decode()
    # tqdm's line, redrawn in place: "pull <id>: 100%|####| 2.00M/2.00M [00:00<00:00, 3.99MB/s]"
    assert "\r" in text and f"pull {model_id}: 100%" in text and "2.00M/2.00M" in text and "MB/s]" in text


def test_stats_and_usage_errors(live, tmp_path):
    stats = ok_json(live.cli("stats", "--json"))
    assert stats["total_models"] >= 0 and "status_distribution" in stats
    human = live.cli("stats")
    assert human.returncode == 0 and "total_models:" in human.stdout

    src = tmp_path / "m.bin"
    write_random(src, 1000)
    usage = [
        ("push", str(tmp_path / "missing.bin"), "--name", "x", "--algorithm", "y"),
        ("push", str(src), "--name", "x", "--algorithm", "y", "--metric", "accuracy=high"),
        ("push", str(src), "--name", "bad name!", "--algorithm", "y"),  # the service refuses the name
        ("push", str(src), "--name", "x"),  # --algorithm is required
        ("pull", "x", "--limit-rate", "fast"),
        ("pull", "x", "--parallel", "0"),
        ("pull", "x", "--version", "1.0"),
        ("pull", "x", "--cache-dir", str(tmp_path), "-o", str(tmp_path / "y")),
        ("rm", "not-an-id"),
    ]
    for args in usage:
        proc = live.cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "error" in proc.stderr
    unreachable = live.cli("list", "--url", "http://127.0.0.1:9", "--retries", "0")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_stats_on_a_service_without_statistics_exits_1(tmp_path):
    # A plain web server: every /api path is a 404 (with an HTML body, not the service's JSON).
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = subprocess.run([sys.executable, "-m", "app", "stats", "--url", url], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1, proc.stderr
    assert "does not provide statistics" in proc.stderr and "404" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_parallel_pull_of_a_300_mb_file_is_identical(live, tmp_path_factory):
    """Last in the module: on FerretDB every range read scans the whole chunks
    collection, so the big file is deleted again before anything else runs."""
    size = BIG_ON_FERRETDB if live.backend == "mongodb" and not os.environ.get("MONGODB_URL") else BIG
    folder = tmp_path_factory.mktemp("big")
    src = folder / "big.bin"
    digest = write_random(src, size)
    pushed = push(live, src, unique("big"))
    try:
        assert pushed["size"] == size and pushed["checksum"] == f"sha256:{digest}"
        target = folder / "pulled.bin"
        out = ok_json(live.cli("pull", pushed["model_id"], "-o", str(target), "--json", timeout=300))
        # 4 ranges: the default for files over 64 MB.
        assert out["parallel"] == 4 and out["bytes_transferred"] == size and out["resumed_bytes"] == 0
        assert out["sha256"] == digest and sha256_of(target) == digest
    finally:
        live.cli("rm", pushed["model_id"])
