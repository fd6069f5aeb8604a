"""The client as its own distribution (client/, package tensorfleet_client).

Its modules import one another in one direction and use no other module's
private names; installed alone in a fresh virtualenv it brings none of the
server's dependencies and can push, pull and fetch against a running service.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit.files import sha256_of, write_random
from testkit.live_service import service_on
from testkit.mongo_server import REPO

CLIENT = REPO / "client"
PACKAGE = CLIENT / "tensorfleet_client"

# Each module may import only the modules before it.
LAYERS = ["errors", "rules", "fileio", "manifest", "transport", "splice", "download", "sessions", "snapshot", "cache",
          "core", "sync", "cli", "__init__", "__main__"]

SERVER_ONLY = {"pymongo", "prometheus-client", "uvloop", "aiohttp-cors", "tensorfleet-model-service"}


def import_problems(package: Path, layers: list[str]) -> list[str]:
    """Imports against ``layers`` (cycles included), of the server, or of another module's private names."""
    problems = []
    for path in sorted(package.glob("*.py")):
        me = path.stem
        if me not in layers:
            problems.append(f"{me}: not in the layers")
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{me}: imports {a.name}" for a in node.names if a.name.split(".")[0] == "app"]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    if (node.module or "").split(".")[0] == "app":
                        problems.append(f"{me}: imports from {node.module}")
                    continue
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    if target not in layers or layers.index(target) >= layers.index(me):
                        problems.append(f"{me}: imports {target}, which is not below it")
                problems += [f"{me}: imports {a.name} from {node.module or '.'}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
        for node in ast.walk(tree):
            # A private name reached through anything but self/cls: another module's (`dl._x`), another object's.
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                problems.append(f"{me}:{node.lineno}: uses {ast.unparse(node)}")
    return problems


def test_client_modules_import_in_one_direction_without_private_names():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(LAYERS)
    assert import_problems(PACKAGE, LAYERS) == []


def test_the_checker_finds_a_cycle_a_private_name_and_the_server(tmp_path):
    """import_problems is not a check that cannot fail."""
    (tmp_path / "errors.py").write_text("from .rules import name\n")
    (tmp_path / "rules.py").write_text("from .errors import _hidden\nimport app.config\n")
    (tmp_path / "transport.py").write_text("from . import rules as r\nr._inner()\nx = other._send()\n")
    assert sorted(import_problems(tmp_path, LAYERS)) == [
        "errors: imports rules, which is not below it",
        "rules: imports _hidden from errors",
        "rules: imports app.config",
        "transport:2: uses r._inner",
        "transport:3: uses other._send",
    ]


def pip_names(python: Path) -> set[str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=60, check=True)
    return {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}


FETCH = """
import importlib.util, json, sys
from tensorfleet_client import ModelServiceClient

name, cache = sys.argv[1], sys.argv[2]
with ModelServiceClient() as client:  # MODEL_SERVICE_URL
    first = client.fetch_result(name, cache_dir=cache)
    again = client.fetch_result(name, cache_dir=cache)
print(json.dumps({"path": str(first.path), "downloaded": first.bytes_transferred, "again_cached": again.cached,
                  "same": again.path == first.path,
                  "importable": [m for m in ("app", "pymongo", "prometheus_client", "uvloop")
                                 if importlib.util.find_spec(m)]}))
"""


@pytest.mark.slow
def test_the_client_alone_installs_without_the_server_and_pushes_pulls_fetches(request, tmp_path):
    started = time.monotonic()
    # A copy, so that pip's build leaves nothing in the work tree.
    source = tmp_path / "client-src"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    installed = pip_names(python)
    assert "tensorfleet-client" in installed and {"aiohttp", "orjson", "filelock", "tqdm"} <= installed
    assert installed & SERVER_ONLY == set()
    install_seconds = time.monotonic() - started

    src = tmp_path / "model.bin"
    digest = write_random(src, 3_000_000)
    away = tmp_path / "elsewhere"  # not the repository: `app` must not be importable from the current folder
    away.mkdir()
    (tmp_path / "service").mkdir()
    with service_on(request, "embedded", tmp_path / "service", "t_clientpkg") as (service, *_):
        env = {"PATH": str(venv / "bin"), "MODEL_SERVICE_URL": service.url, "HOME": str(tmp_path)}

        def run(*args: str) -> dict:
            proc = subprocess.run(args, cwd=away, env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        pushed = run("tensorfleet-client", "push", str(src), "--name", "alone", "--algorithm", "x", "--json")
        assert pushed["checksum"] == f"sha256:{digest}"
        pulled = run("tensorfleet-client", "pull", "alone", "-o", str(away / "pulled.bin"), "--json")
        assert pulled["model_id"] == pushed["model_id"] and sha256_of(away / "pulled.bin") == digest
        fetched = run(str(python), "-c", FETCH, "alone", str(tmp_path / "cache"))
    assert fetched["importable"] == []
    assert fetched["downloaded"] == 3_000_000 and fetched["again_cached"] and fetched["same"]
    assert sha256_of(Path(fetched["path"])) == digest
    print(f"install {install_seconds:.1f} s, all {time.monotonic() - started:.1f} s")


# What a command line may load before it knows which command it runs, and what a pull of one file loads:
# start-up is paid by every pull (a fifth of a small pull's CPU was modules it never ran).
STARTUP_PROBE = """
import sys
{setup}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tqdm", "aiohttp", "app", "tensorfleet_client"))
print("\\n".join(loaded))
"""


def loaded_after(setup: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", STARTUP_PROBE.format(setup=setup)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    return set(proc.stdout.split())


@pytest.mark.parametrize("setup", [
    "import tensorfleet_client",
    "from tensorfleet_client.cli import main",
    "from app.cli import build_parser; build_parser()",
])
def test_a_command_line_starts_without_the_client_or_server_machinery(setup):
    heavy = {m for m in loaded_after(setup)
             if m.split(".")[0] in ("tqdm", "aiohttp")
             or m in ("app.storage", "app.logs", "app.registry", "app.server", "tensorfleet_client.core",
                      "tensorfleet_client.download", "tensorfleet_client.snapshot", "tensorfleet_client.cache")}
    assert heavy == set()


def test_a_pull_of_one_file_loads_neither_the_folder_nor_the_cache_code_nor_a_progress_bar():
    loaded = loaded_after("from tensorfleet_client.sync import ModelServiceClient")
    assert "tensorfleet_client.download" in loaded  # the probe sees what a pull loads
    assert not loaded & {"tqdm", "tensorfleet_client.snapshot", "tensorfleet_client.cache"}


def test_the_package_still_exports_every_name_lazily():
    import tensorfleet_client

    for name in tensorfleet_client.__all__:
        assert getattr(tensorfleet_client, name) is not None, name
    assert "ModelServiceClient" in dir(tensorfleet_client)
    with pytest.raises(AttributeError):
        tensorfleet_client.NoSuchName  # noqa: B018
