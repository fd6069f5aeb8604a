"""Fixtures: a real MongoDB wire-protocol server, both storage backends, an HTTP client.

The MongoDB half uses MONGODB_URL when it is set, otherwise the FerretDB test
server this repo builds (testkit/mongo_server.py). With CI=true a missing
server fails the run; elsewhere the MongoDB tests are skipped with a message
saying how to enable them.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest
from pymongo import MongoClient

from app.config import Settings
from app.server import create_app
from app.storage import make_storage
from testkit.mongo_server import MongoTestServer, ServerUnavailable
from tests.support.prerequisites import cannot_run

BACKENDS = ("embedded", "mongodb")


class MongoTarget:
    """Where the MongoDB tests connect, and (for our own server) how to stop it."""

    def __init__(self, url: str, server: MongoTestServer | None) -> None:
        self.url = url
        self.server = server

    def sync_client(self) -> MongoClient:
        return MongoClient(self.url, serverSelectionTimeoutMS=5000)


@pytest.fixture(scope="session")
def mongo() -> Iterator[MongoTarget]:
    url = os.environ.get("MONGODB_URL")
    if url:
        yield MongoTarget(url, None)
        return
    try:
        server = MongoTestServer()
        server.start()
    except ServerUnavailable as e:
        message = (
            f"MongoDB tests need a MongoDB server: {e}\n"
            "Install Go (the test server builds itself) or set MONGODB_URL=mongodb://..."
        )
        print("\n" + "!" * 78 + "\nNO MONGODB TESTS: " + message + "\n" + "!" * 78)
        cannot_run(message)
    try:
        yield MongoTarget(server.url, server)
    finally:
        server.close()


@pytest.fixture
def mongo_server(mongo: MongoTarget) -> Iterator[MongoTestServer]:
    """The repo's own MongoDB test server, for tests that stop it for real; running again afterwards."""
    if mongo.server is None:
        cannot_run("this test stops and restarts the database, which needs the repo's own MongoDB test "
                   "server; MONGODB_URL names another server, which the tests must not stop "
                   "(unset MONGODB_URL to run it)")
    yield mongo.server
    mongo.server.start()


@pytest.fixture(scope="module")
def mongo_db_name(request, mongo: MongoTarget) -> Iterator[str]:
    """A fresh database per test module, dropped afterwards (FerretDB scans, so keep them small)."""
    name = f"t_{request.module.__name__.rsplit('.', 1)[-1][:30]}_{uuid.uuid4().hex[:8]}"
    yield name
    if mongo.server is None or mongo.server.running:
        with mongo.sync_client() as c:
            c.drop_database(name)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def settings(request, backend: str, tmp_path) -> Iterator[Settings]:
    if backend == "embedded":
        yield Settings(data_dir=str(tmp_path / "data"), mongodb_timeout_ms=2000)
        return
    mongo: MongoTarget = request.getfixturevalue("mongo")
    db_name = request.getfixturevalue("mongo_db_name")
    yield Settings(mongodb_url=mongo.url, mongodb_db=db_name, gridfs_bucket="models", mongodb_timeout_ms=2000)
    # Tests of a module share its database; leave the next one an empty registry.
    if mongo.server is None or mongo.server.running:
        with mongo.sync_client() as c:
            for coll in c[db_name].list_collection_names():
                c[db_name][coll].delete_many({})


@pytest.fixture
async def storage(settings: Settings):
    """A storage backend opened on its own, for tests below the HTTP layer."""
    store = make_storage(settings)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def client(aiohttp_client, settings: Settings):
    """A real HTTP client against the app; the app's storage is client.app[STORAGE]."""
    return await aiohttp_client(create_app(settings))
