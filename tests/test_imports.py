"""Every module of the service imports on its own, whichever is imported first (no import cycle breaks it)."""

import ast
import pathlib
import pkgutil
import subprocess
import sys

import app
from testkit.mongo_server import REPO

# One interpreter loads the libraries once, then forks a child per module that
# imports that module first, as a process starting with it would.
SCRIPT = """
import importlib, os, sys
import aiohttp.web, aiohttp_cors, aiohttp_jinja2, jinja2, orjson, prometheus_client, pymongo, bson, yarl
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_every_module_imports_first():
    names = [m.name for m in pkgutil.walk_packages(app.__path__, "app.") if not m.name.endswith("__main__")]
    assert "app.routes" in names and "app.handlers.docs" in names
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *names], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and not proc.stdout, proc.stdout + proc.stderr


# What app/http/ may import from the service: declarations, and itself. Application
# state (app keys, metrics, clock, storage, registry, leases, slots...) stays out.
HTTP_MAY_IMPORT = {"app.errors", "app.http"}


def _service_imports(path, package: str) -> set[str]:
    """The app.* modules a file imports, relative imports resolved against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # ``from .. import errors`` imports app.errors: name each imported module.
            found |= {f"{module}.{a.name}" for a in node.names} if node.module is None else {module}
    return {m for m in found if m == "app" or m.startswith("app.")}


def _allowed(module: str) -> bool:
    return any(module == ok or module.startswith(ok + ".") for ok in HTTP_MAY_IMPORT)


def test_http_mechanics_import_no_application_state():
    http_dir = pathlib.Path(REPO) / "app" / "http"
    files = sorted(http_dir.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "fileresponse.py", "ranges.py", "sendfile.py"}
    imported = {p.name: _service_imports(p, "app.http") for p in files}
    assert "app.errors" in imported["json.py"]  # the scan sees relative imports
    bad = {name: sorted(m for m in mods if not _allowed(m)) for name, mods in imported.items()}
    assert not any(bad.values()), bad


def _imported_modules(path, package: str) -> set[str]:
    """The absolute names of the modules a file imports, relative imports resolved against its package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_handler_modules_do_not_import_each_other():
    """What handlers share lives in app.handlers.common; no handler module imports another one."""
    folder = pathlib.Path(REPO, "app", "handlers")
    handlers = {f"app.handlers.{p.stem}" for p in folder.glob("*.py")} - {"app.handlers.__init__",
                                                                         "app.handlers.common"}
    assert {"app.handlers.files", "app.handlers.models"} <= handlers
    crossings = {name: sorted(_imported_modules(folder / f"{name.rsplit('.', 1)[1]}.py", "app.handlers")
                              & (handlers - {name}))
                 for name in sorted(handlers)}
    assert not any(crossings.values()), crossings


def test_bench_does_not_import_tests():
    """What bench/ shares with the tests lives in testkit/; bench imports nothing from tests/."""
    files = sorted(pathlib.Path(REPO, "bench").glob("*.py"))
    assert files
    found = {p.name: sorted(n for n in _imported_modules(p, "bench") if n == "tests" or n.startswith("tests."))
             for p in files}
    assert not any(found.values()), found
