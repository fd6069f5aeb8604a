"""Every module of the service imports on its own, whichever is imported first (no import cycle breaks it)."""

import pkgutil
import subprocess
import sys

import app
from tests.support.mongo_server import REPO

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
