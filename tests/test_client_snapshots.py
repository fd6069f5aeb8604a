"""Snapshots through the client (issue 14): push a folder, pull one into a folder, fetch into the cache.

Against the service as a real process on both backends (tests/client_helpers.py),
counting what crossed the wire from the service's access log and its metrics;
plus a fake service that sends hostile manifests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from tensorfleet_client import AsyncModelServiceClient, ModelServiceClient, NotCached, ProtocolError, RetryPolicy, rules
from tensorfleet_client import manifest as mf

from tests.client_helpers import live, sha256_of, unique, write_random  # noqa: F401  (live is a fixture)

BOUND = 120  # seconds any one process of a test may take

# A small transformer-like model: configs, a tokenizer folder, two shards.
LAYOUT = {
    "config.json": 2_000,
    "generation_config.json": 300,
    "tokenizer/tokenizer.json": 60_000,
    "tokenizer/vocab.txt": 40_000,
    "model-00001-of-00002.safetensors": 1_500_000,
    "model-00002-of-00002.safetensors": 1_200_000,
}


def make_model(folder: Path, layout: dict[str, int] = LAYOUT) -> dict[str, str]:
    """Random files at ``layout``'s paths; their sha256 by path."""
    digests = {}
    for path, size in layout.items():
        target = folder.joinpath(*path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        digests[path] = write_random(target, size)
    return digests


def files_under(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by its path relative to it."""
    return {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def upload_bytes(live) -> float:
    """The service's model_upload_bytes counter (bytes stored by uploads and blob PUTs)."""
    with urllib.request.urlopen(live.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^model_upload_bytes_total (\S+)$", text, re.M)
    assert m, "no model_upload_bytes_total in /metrics"
    return float(m[1])


def file_gets(live, since: int) -> list[str]:
    """The paths of the snapshot files read with GET since ``since`` (status 200 or 206)."""
    return sorted(path.split("/files/", 1)[1] for method, path, status in live.requests(since, "/files/")
                  if method == "GET" and status in (200, 206))


def push_cli(live, folder: Path, name: str, *extra: str) -> dict:
    proc = live.cli("push", str(folder), "--name", name, "--algorithm", "transformer", "--json", *extra,
                    timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- the client's twins of the server's definitions ------------------------------------

PATH_CASES = ["config.json", "a/b/c.bin", "ünïcode/naïve.txt", "", "/etc/passwd", "../x", "a/../b", "a/./b", "a//b",
              "a/", "a\\b", "c:d", "a/b.", "a/b ", "tab\there", "del\x7f", "e\u0301.txt", "x" * 256, "é" * 128,
              "/".join(["d" * 200] * 6), ".hidden", "a/.b", "..."]


def test_the_client_and_the_server_agree_on_the_digest_and_the_path_rules():
    from app import snapshots

    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    entries = [("b/ü.json", 10, "ab" * 32), ("a", 0, empty), ("B", 3, "cd" * 32), ("a0/z", 7, "ef" * 32)]
    server = snapshots.snapshot_digest([{"path": p, "size_bytes": s, "checksum": f"sha256:{h}"}
                                        for p, s, h in entries])
    assert mf.snapshot_digest(entries) == server
    assert mf.snapshot_digest(reversed(entries)) == server  # order of the input does not matter
    for path in PATH_CASES:
        assert (rules.path_problem(path) is None) == (snapshots.path_problem(path) is None), path
    for paths in (["A.txt", "a.txt"], ["a", "a/b"], ["Dir/x", "dir"], ["a/b", "a/c", "b"], ["ß", "ss"]):
        try:
            snapshots.check_paths(paths, 100)
            server_ok = True
        except Exception:  # noqa: BLE001 - the server's ApiError
            server_ok = False
        assert (rules.paths_conflict(paths) is None) == server_ok, paths


# -- push --------------------------------------------------------------------------------


async def test_push_a_folder_then_a_version_with_one_changed_file_sends_only_that_file(live, tmp_path):
    folder = tmp_path / "model"
    digests = make_model(folder)
    total = sum(LAYOUT.values())
    name = unique("snap-push")
    async with AsyncModelServiceClient(live.url) as client:
        before = upload_bytes(live)
        first = await client.push_folder(folder, name=name, algorithm="transformer", metrics={"loss": 1.5})
        assert upload_bytes(live) - before == total
        assert (first.files, first.already_stored, first.bytes_sent, first.bytes_not_sent) == (6, 0, total, 0)
        doc = await client.get_model(first.model_id)
        assert doc["version"] == first.version == "v1.0"
        assert {f["path"]: f["checksum"] for f in doc["files"]} == {p: f"sha256:{h}" for p, h in digests.items()}
        assert doc["snapshot_digest"] == mf.snapshot_digest((p, LAYOUT[p], h) for p, h in digests.items())
        assert "file_metadata" not in doc

        # A fine-tune changed one shard.
        changed = "model-00002-of-00002.safetensors"
        new = write_random(folder / changed, LAYOUT[changed])
        since = live.log_offset()
        before = upload_bytes(live)
        second = await client.push_folder(folder, name=name, algorithm="transformer")
        sent = upload_bytes(live) - before
    assert second.version == "v1.1"
    assert (second.already_stored, second.bytes_sent, second.bytes_not_sent) == (5, LAYOUT[changed],
                                                                               total - LAYOUT[changed])
    assert sent == LAYOUT[changed]
    puts = [r for r in live.requests(since, "/api/v1/blobs/") if r[0] == "PUT"]
    assert puts == [("PUT", f"/api/v1/blobs/sha256:{new}", 201)]


def test_cli_push_of_a_folder_says_what_it_did_not_send(live, tmp_path):
    folder = tmp_path / "model"
    make_model(folder)
    name = unique("snap-cli")
    push_cli(live, folder, name)
    (folder / "config.json").write_text('{"changed": true}')
    proc = live.cli("push", str(folder), "--name", name, "--algorithm", "transformer", timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    not_sent = sum(LAYOUT.values()) - LAYOUT["config.json"]
    assert proc.stdout.splitlines()[0] == f"5 of 6 files already stored, {not_sent / 1e6:.1f} MB not sent"
    assert f"pushed {name} v1.1" in proc.stdout


def test_cli_push_refuses_a_folder_the_service_would_refuse_before_sending_anything(live, tmp_path):
    folder = tmp_path / "model"
    make_model(folder, {"Config.json": 10, "config.json": 10})
    since = live.log_offset()
    proc = live.cli("push", str(folder), "--name", unique("snap-bad"), "--algorithm", "x", timeout=BOUND)
    assert proc.returncode == 2 and "differ only by case" in proc.stderr
    assert live.requests(since) == []


# -- pull into a folder ----------------------------------------------------------------------


def test_pull_into_a_new_and_an_empty_folder_and_with_include_exclude(live, tmp_path):
    folder = tmp_path / "model"
    digests = make_model(folder)
    name = unique("snap-pull")
    pushed = push_cli(live, folder, name)

    out = tmp_path / "out"
    proc = live.cli("pull", name, "-o", str(out), "--json", timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert files_under(out) == digests
    assert (result["model_id"], result["files"], result["files_downloaded"]) == (pushed["model_id"], 6, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no .part left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = live.cli("pull", name, "-o", str(empty), "--include", "*.json", "--exclude", "tokenizer/*",
                    timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    assert files_under(empty) == {p: h for p, h in digests.items() if p in ("config.json", "generation_config.json")}

    # A folder with something in it is left alone.
    proc = live.cli("pull", name, "-o", str(empty), timeout=BOUND)
    assert proc.returncode == 1 and "exists already" in proc.stderr
    assert sorted(files_under(empty)) == ["config.json", "generation_config.json"]
    proc = live.cli("pull", name, "-o", str(empty), "--force", timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    assert files_under(empty) == digests


def test_pull_killed_mid_file_and_run_again_downloads_nothing_it_verified(live, tmp_path):
    layout = {**{f"small/{i}.json": 20_000 + i for i in range(6)}, "big.bin": 24_000_000}
    folder = tmp_path / "model"
    digests = make_model(folder, layout)
    name = unique("snap-kill")
    push_cli(live, folder, name)
    out = tmp_path / "out"
    staging = tmp_path / "out.part"

    since = live.log_offset()
    proc = live.cli_popen("pull", name, "-o", str(out), "--limit-rate", "3M", "--json")
    deadline = time.monotonic() + BOUND
    big_part = staging / "big.bin.part"
    while True:
        smalls_done = all((staging / p).is_file() for p in layout if p.startswith("small/"))
        if smalls_done and big_part.exists() and big_part.stat().st_size >= 4_000_000:
            break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the pull did not get far enough"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(BOUND)
    assert not out.exists()  # nothing half-done where the folder goes
    first_gets = file_gets(live, since)
    assert sorted(set(first_gets)) == sorted(layout)

    since = live.log_offset()
    again = live.cli("pull", name, "-o", str(out), "--json", timeout=BOUND)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert files_under(out) == digests
    assert result["files_kept"] == 6 and result["files_downloaded"] == 1
    assert result["resumed_bytes"] >= 4_000_000
    assert result["bytes_transferred"] == layout["big.bin"] - result["resumed_bytes"]
    assert file_gets(live, since) == ["big.bin"]  # the small files were not asked for again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


# -- fetch into the cache ----------------------------------------------------------------------


async def test_fetch_a_snapshot_warm_is_one_request_and_a_new_version_fetches_only_new_blobs(live, tmp_path):
    folder = tmp_path / "model"
    digests = make_model(folder)
    name = unique("snap-fetch")
    cache = tmp_path / "cache"
    async with AsyncModelServiceClient(live.url) as client:
        await client.push_folder(folder, name=name, algorithm="transformer")
        since = live.log_offset()
        first = await client.fetch_result(name, cache_dir=cache)
    assert first.path == cache / "snapshots" / name / "v1.0" and files_under(first.path) == digests
    assert not first.cached and first.files == 6 and first.bytes_transferred == sum(LAYOUT.values())
    assert file_gets(live, since) == sorted(LAYOUT)
    assert sorted(p.name for p in (cache / "blobs" / "sha256").iterdir() if ".lock" not in p.name) == \
        sorted(set(digests.values()))
    # Links to the blobs, not copies.
    blob = cache / "blobs" / "sha256" / digests["config.json"]
    assert (first.path / "config.json").stat().st_ino == blob.stat().st_ino

    # A restarted inference server: one conditional request.
    since = live.log_offset()
    async with AsyncModelServiceClient(live.url) as client:
        warm = await client.fetch_result(name, cache_dir=cache)
        assert client.request_count == 1
    assert warm.cached and warm.path == first.path and warm.bytes_transferred == 0
    assert live.requests(since) == [("GET", f"/api/v1/models/by-name/{name}/files", 304)]

    # v2 changed one shard: only that one is downloaded; v1's folder is still there as it was.
    changed = "model-00001-of-00002.safetensors"
    digests2 = {**digests, changed: write_random(folder / changed, LAYOUT[changed])}
    with ModelServiceClient(live.url) as client:
        client.push_folder(folder, name=name, algorithm="transformer")
        since = live.log_offset()
        second = client.fetch_result(name, cache_dir=cache)
    assert second.version == "v1.1" and not second.cached and files_under(second.path) == digests2
    assert second.bytes_transferred == LAYOUT[changed]
    assert file_gets(live, since) == [changed]
    assert files_under(first.path) == digests

    # Offline: the cache answers, with no request at all; a miss fails clearly.
    os.environ["MODEL_SERVICE_OFFLINE"] = "1"
    try:
        async with AsyncModelServiceClient("http://127.0.0.1:9", retry=RetryPolicy(attempts=1)) as offline:
            hit = await offline.fetch_result(name, cache_dir=cache)
            pinned = await offline.fetch_result(name, "v1.0", cache_dir=cache)
            with pytest.raises(NotCached) as e:
                await offline.fetch(unique("never-fetched"), cache_dir=cache)
            assert offline.request_count == 0
    finally:
        del os.environ["MODEL_SERVICE_OFFLINE"]
    assert (hit.path, hit.version, hit.stale) == (second.path, "v1.1", True)
    assert pinned.path == first.path
    assert "MODEL_SERVICE_OFFLINE" in str(e.value) and "not in the cache" in str(e.value)


FETCH = """
import json, sys
from tensorfleet_client import ModelServiceClient
with ModelServiceClient() as client:
    r = client.fetch_result(sys.argv[1], cache_dir=sys.argv[2], limit_rate=float(sys.argv[3]))
print(json.dumps(r.to_dict()))
"""


def test_two_processes_fetching_one_snapshot_download_each_blob_once(live, tmp_path):
    layout = {**LAYOUT, "model-00001-of-00002.safetensors": 12_000_000}  # one file in ranges, slowly
    folder = tmp_path / "model"
    digests = make_model(folder, layout)
    name = unique("snap-fleet")
    push_cli(live, folder, name)
    cache = tmp_path / "cache"

    since = live.log_offset()
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, name, str(cache), str(6_000_000)], env=live.cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=BOUND)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert len({r["path"] for r in results}) == 1 and files_under(Path(results[0]["path"])) == digests
    gets = file_gets(live, since)
    small = [p for p in layout if layout[p] <= 8_000_000]
    assert sorted(p for p in gets if p in small) == sorted(small)  # each once
    assert "model-00001-of-00002.safetensors" in gets
    assert sum(r["bytes_transferred"] for r in results) == sum(layout.values())


# -- a hostile manifest ------------------------------------------------------------------------

DATA = b"x" * 1000
SHA = "a" * 64


def hostile_manifest(paths: list[str]) -> dict:
    import hashlib

    sha = hashlib.sha256(DATA).hexdigest()
    files = [{"path": p, "size_bytes": len(DATA), "checksum": f"sha256:{sha}"} for p in paths]
    return {"id": "c0ffee" * 4, "name": "lying", "version": "v1.0", "files": files,
            "snapshot_digest": mf.snapshot_digest((p, len(DATA), sha) for p in paths),
            "total_size_bytes": len(DATA) * len(paths)}


class HostileService:
    """Answers a manifest with the given paths, and any file with DATA; records what it was asked."""

    def __init__(self, paths: list[str]) -> None:
        self.manifest = hostile_manifest(paths)
        self.seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/models/by-name/{name}/files", self.files)
        app.router.add_get("/api/v1/models/by-name/{name}", self.model)
        app.router.add_get("/api/v1/models/{id}/files/{path:.+}", self.file)
        return app

    async def files(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.json_response(self.manifest, headers={"ETag": '"abc"'})

    async def model(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.json_response({k: v for k, v in self.manifest.items() if k != "total_size_bytes"})

    async def file(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.Response(body=DATA)


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


HOSTILE = {
    "parent": (["../x"], 'component ".."'),
    "deeper parent": (["ok.json", "a/../../x"], 'component ".."'),
    "absolute": (["/tmp/x"], "relative"),
    "case conflict": (["A.bin", "a.bin"], "differ only by case"),
    "file and folder": (["a", "a/b"], "is a file and also a folder"),
    "backslash": (["..\\x"], "'\\' and ':'"),
    "not NFC": (["e\u0301.json"], "NFC"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("how", ["pull", "fetch"])
async def test_a_hostile_manifest_writes_nothing(aiohttp_server, tmp_path, case, how):
    paths, rule = HOSTILE[case]
    service = HostileService(paths)
    server = await aiohttp_server(service.app())
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("mine")
    (tmp_path / "cache").mkdir()
    before = tree(tmp_path)
    async with AsyncModelServiceClient(str(server.make_url("")), retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(ProtocolError) as e:
            if how == "pull":
                await client.pull_folder("lying", tmp_path / "out")
            else:
                await client.fetch("lying", cache_dir=tmp_path / "cache")
    assert rule in str(e.value) and "nothing was written" in str(e.value)
    after = tree(tmp_path)
    if how == "fetch":
        # The name's lock is all: taken before the manifest is asked for.
        assert {k: v for k, v in after.items() if k not in before} == {"cache/locks": None,
                                                                       "cache/locks/lying.lock": b""}
        after = {k: v for k, v in after.items() if k in before}
    assert after == before
    assert not [p for p in service.seen if "/files/" in p]  # no file was even asked for


async def test_a_manifest_whose_digest_does_not_match_its_files_is_refused(aiohttp_server, tmp_path):
    service = HostileService(["ok.json"])
    service.manifest["snapshot_digest"] = "sha256:" + SHA
    server = await aiohttp_server(service.app())
    async with AsyncModelServiceClient(str(server.make_url("")), retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(ProtocolError) as e:
            await client.pull_folder("lying", tmp_path / "out")
    assert "is not the digest of its files" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_hostile_cases_are_refused_by_the_server_too():
    """The client's cases are the server's rules, not a stricter or looser set of its own."""
    from app import snapshots

    for case, (paths, _) in HOSTILE.items():
        with pytest.raises(Exception):  # noqa: B017 - the server's ApiError, 400 invalid_path / path_conflict
            snapshots.check_paths(paths, 100)


def test_manifest_json_round_trip():
    m = mf.Manifest.parse(hostile_manifest(["a/b.json", "c"]), '"x"', "test")
    assert mf.Manifest.from_cache(orjson.loads(orjson.dumps(m.to_json()))) == m


class BlobService:
    """The push half of the API, losing the first blob once between the question and the commit."""

    def __init__(self) -> None:
        self.stored: dict[str, int] = {}
        self.puts: list[str] = []
        self.commits = 0
        self.lost: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/blobs/missing", self.missing)
        app.router.add_put("/api/v1/blobs/{digest}", self.put)
        app.router.add_post("/api/v1/models", self.commit)
        return app

    async def missing(self, request: web.Request) -> web.Response:
        asked = (await request.json())["digests"]
        return web.json_response({"missing": [d for d in asked if d not in self.stored]})

    async def put(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        body = await request.read()
        self.puts.append(digest)
        self.stored[digest] = len(body)
        return web.json_response({"digest": digest, "size_bytes": len(body)}, status=201)

    async def commit(self, request: web.Request) -> web.Response:
        files = (await request.json())["files"]
        self.commits += 1
        if self.commits == 1:  # a gc of unreferenced blobs ran just now
            self.lost = files[0]["checksum"]
            del self.stored[self.lost]
        missing = [f["checksum"] for f in files if f["checksum"] not in self.stored]
        if missing:
            return web.json_response({"error": {"code": "missing_blobs", "message": "gone", "missing": missing}},
                                     status=422)
        return web.json_response({"model_id": "ab" * 12, "version": "v1.0"}, status=201)


async def test_push_uploads_again_the_blobs_a_commit_finds_missing_and_no_other(aiohttp_server, tmp_path):
    service = BlobService()
    server = await aiohttp_server(service.app())
    folder = tmp_path / "model"
    digests = make_model(folder, {"a.json": 100, "b/c.bin": 5000, "same.json": 100})
    (folder / "same.json").write_bytes((folder / "a.json").read_bytes())  # one content, two paths
    async with AsyncModelServiceClient(str(server.make_url("")), retry=RetryPolicy(attempts=1)) as client:
        result = await client.push_folder(folder, name="m", algorithm="x")
    assert (result.model_id, result.version, result.files) == ("ab" * 12, "v1.0", 3)
    assert service.commits == 2 and service.lost == f"sha256:{digests['a.json']}"
    # Each content once, then the lost one again; never a file twice for its two paths.
    assert sorted(service.puts[:2]) == sorted({f"sha256:{digests['a.json']}", f"sha256:{digests['b/c.bin']}"})
    assert service.puts[2:] == [service.lost]
    assert result.already_stored == 1  # same.json's bytes went with a.json's


async def test_fetch_follows_a_single_file_model_whose_next_version_is_a_folder(live, tmp_path):
    src = tmp_path / "weights.bin"
    write_random(src, 200_000)
    folder = tmp_path / "model"
    digests = make_model(folder, {"config.json": 100, "weights.bin": 300_000})
    name = unique("snap-grows")
    cache = tmp_path / "cache"
    async with AsyncModelServiceClient(live.url) as client:
        await client.push(src, name=name, algorithm="x")
        single = await client.fetch_result(name, cache_dir=cache)
        assert single.path == cache / name / "v1.0" / "weights.bin" and single.files is None
        await client.push(folder, name=name, algorithm="x")  # a folder: a snapshot, v1.1
        grown = await client.fetch_result(name, cache_dir=cache)
    assert grown.path == cache / "snapshots" / name / "v1.1" and grown.files == 2
    assert files_under(grown.path) == digests


async def test_a_new_version_with_the_same_files_is_learnt_from_the_304_without_a_download(live, tmp_path):
    folder = tmp_path / "model"
    digests = make_model(folder, {"config.json": 100, "w/weights.bin": 300_000})
    name = unique("snap-same")
    cache = tmp_path / "cache"
    async with AsyncModelServiceClient(live.url) as client:
        await client.push_folder(folder, name=name, algorithm="x")
        first = await client.fetch_result(name, cache_dir=cache)
        second_push = await client.push_folder(folder, name=name, algorithm="x", metrics={"accuracy": 0.9})
        since = live.log_offset()
        now = await client.fetch_result(name, cache_dir=cache)
    assert live.requests(since) == [("GET", f"/api/v1/models/by-name/{name}/files", 304)]
    assert (now.cached, now.bytes_transferred, now.version, now.model_id) == (True, 0, "v1.1", second_push.model_id)
    assert now.path == cache / "snapshots" / name / "v1.1" and files_under(now.path) == digests
    assert files_under(first.path) == digests
    async with AsyncModelServiceClient(live.url) as client:
        pinned = await client.fetch_result(name, "v1.0", cache_dir=cache)
        latest = await client.fetch_result(name, cache_dir=cache)
    assert (pinned.cached, pinned.path) == (True, first.path)
    assert (latest.cached, latest.path) == (True, now.path)


def test_within_refuses_a_path_that_a_symlink_leads_out_of_the_folder(tmp_path):
    folder, victim = tmp_path / "folder", tmp_path / "victim"
    folder.mkdir()
    victim.mkdir()
    (folder / "sub").symlink_to(victim)
    assert rules.within(folder, "a/b.json") == folder.resolve() / "a" / "b.json"
    with pytest.raises(ProtocolError):
        rules.within(folder, "sub/x.json")
    with pytest.raises(ProtocolError):
        rules.within(folder, "../victim/x.json")  # were the path rules ever skipped
