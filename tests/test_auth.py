"""API keys and scopes (ENABLE_AUTH=true)."""

import dataclasses
import subprocess
import sys

import aiohttp
import pytest

from app import auth, openapi, routes
from app.config import ConfigError, Settings
from app.server import create_app
from testkit.mongo_server import REPO

READ, WRITE, ADMIN = "reader-key-1", "writer-key-2", "admin-key-3"


@pytest.fixture
async def authed(aiohttp_client, settings, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        "# sha256 scope name\n"
        f"{auth.hash_key(READ)} read dashboard\n"
        f"\n{auth.hash_key(WRITE)} write trainer\n"
    )
    s = dataclasses.replace(settings, enable_auth=True, api_keys_file=str(keys_file), api_keys=f"{ADMIN}:admin:ops")
    return await aiohttp_client(create_app(s))


def h(key):
    return {"X-API-Key": key}


async def test_missing_and_unknown_keys_are_401_with_a_challenge(authed):
    for headers in ({}, h("nope"), {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        resp = await authed.get("/api/v1/models", headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_scopes(authed):
    # read: GET and HEAD only
    assert (await authed.get("/api/v1/models", headers=h(READ))).status == 200
    for key in (READ, WRITE, ADMIN):
        assert (await authed.head("/api/v1/models", headers=h(key))).status == 200, key
    resp = await authed.post("/api/v1/models", json={"name": "m", "algorithm": "a"}, headers=h(READ))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"

    # write: register, update, upload, versions; not delete or batch
    resp = await authed.post("/api/v1/models", json={"name": "m", "algorithm": "a"},
                             headers={"Authorization": f"Bearer {WRITE}"})
    assert resp.status == 201
    model_id = (await resp.json())["model_id"]
    assert (await authed.put(f"/api/v1/models/{model_id}", json={"tags": ["t"]}, headers=h(WRITE))).status == 200
    assert (await authed.put(f"/api/v1/models/{model_id}/upload", data=b"x", headers=h(WRITE))).status == 201
    assert (await authed.post(f"/api/v1/models/{model_id}/versions", json={}, headers=h(WRITE))).status == 201
    assert (await authed.delete(f"/api/v1/models/{model_id}", headers=h(WRITE))).status == 403
    batch = {"operation": "delete", "ids": [model_id]}
    assert (await authed.post("/api/v1/models/batch", json=batch, headers=h(WRITE))).status == 403
    assert (await authed.get(f"/api/v1/models/{model_id}/download", headers=h(READ))).status == 200
    for key in (READ, WRITE, ADMIN):
        for path in (f"/api/v1/models/{model_id}", f"/api/v1/models/{model_id}/download"):
            assert (await authed.head(path, headers=h(key))).status == 200, (key, path)

    # admin: everything
    assert (await authed.post("/api/v1/models/batch", json=batch, headers=h(ADMIN))).status == 200
    assert (await authed.get(f"/api/v1/models/{model_id}", headers=h(ADMIN))).status == 404


# Requests no API route takes: the key is checked first, against the scope the
# method needs, or the fixed path's own routes' scope when that is stricter.
UNROUTED = [
    ("GET", "/api/v1/nowhere", READ, 404),
    ("POST", "/api/v1/nowhere", READ, 403),
    ("POST", "/api/v1/nowhere", WRITE, 404),
    ("DELETE", "/api/v1/nowhere", WRITE, 403),
    ("DELETE", "/api/v1/nowhere", ADMIN, 404),
    ("PATCH", "/api/v1/models/0123456789abcdef01234567", WRITE, 405),
    ("PUT", "/api/v1/models/statistics", READ, 403),
    ("PUT", "/api/v1/models/statistics", WRITE, 405),
    ("PUT", "/api/v1/models/batch", WRITE, 403),
    ("PUT", "/api/v1/models/batch", ADMIN, 405),
    ("POST", "/api/v1/models/batch/", WRITE, 403),
    ("POST", "/api/v1/models/batch/", ADMIN, 404),
    ("POST", "/api/v1/models/", WRITE, 404),
    ("POST", "/health/", READ, 403),
    ("POST", "/health/", WRITE, 404),
]


@pytest.mark.parametrize("method,path,key,status", UNROUTED)
async def test_requests_no_route_takes_need_the_scope_of_their_method_or_path(authed, method, path, key, status):
    resp = await authed.request(method, path, headers=h(key))
    assert resp.status == status, await resp.text()


def test_the_documented_scopes_are_the_route_tables():
    doc = openapi.build(Settings(enable_auth=True, api_keys="k:read:n"))
    checked = 0
    for route in routes.API:
        for method, op_id in route.methods():
            operation = doc["paths"][route.template][method.lower()] if op_id is not None else {"security": []}
            if operation.get("security") != []:  # [] on the open paths, /health and /metrics
                assert operation["x-required-scope"] == route.scope, op_id
                checked += 1
    assert checked > 20


async def created_by_of(authed, resp):
    assert resp.status == 201, await resp.text()
    doc = await (await authed.get(f"/api/v1/models/{(await resp.json())['model_id']}", headers=h(READ))).json()
    return doc["created_by"]


async def test_created_by_is_the_key_name_unless_an_admin_sets_it(authed):
    post = authed.post
    assert await created_by_of(authed, await post("/api/v1/models", json={"name": "m", "algorithm": "a"},
                                                  headers=h(WRITE))) == "trainer"
    assert await created_by_of(authed, await post("/api/v1/models", json={"name": "m", "algorithm": "a",
                                                                          "created_by": "trainer"},
                                                  headers=h(WRITE))) == "trainer"
    resp = await post("/api/v1/models", json={"name": "m", "algorithm": "a", "created_by": "someone"},
                      headers=h(WRITE))
    assert resp.status == 403 and "created_by" in (await resp.json())["error"]["message"]
    form = aiohttp.FormData()
    form.add_field("metadata", '{"name": "m", "algorithm": "a", "created_by": "someone"}',
                   content_type="application/json")
    form.add_field("file", b"x" * 100, filename="m.bin")
    assert (await post("/api/v1/models", data=form, headers=h(WRITE))).status == 403
    listed = await (await authed.get("/api/v1/models", headers=h(READ))).json()
    assert listed["pagination"]["total"] == 2  # the refused ones left nothing

    # An admin may record another creator (an import, a migration).
    resp = await post("/api/v1/models", json={"name": "imported", "algorithm": "a", "created_by": "someone"},
                      headers=h(ADMIN))
    imported = (await resp.json())["model_id"]
    assert await created_by_of(authed, resp) == "someone"

    # A new version is the caller's, whoever made the one it comes from.
    versions = f"/api/v1/models/{imported}/versions"
    assert await created_by_of(authed, await post(versions, json={}, headers=h(WRITE))) == "trainer"
    resp = await post(versions, json={"created_by": "someone"}, headers=h(WRITE))
    assert resp.status == 403
    assert await created_by_of(authed, await post(versions, json={"created_by": "someone"},
                                                  headers=h(ADMIN))) == "someone"
    # An update cannot change it at all.
    resp = await authed.put(f"/api/v1/models/{imported}", json={"created_by": "trainer"}, headers=h(ADMIN))
    assert resp.status == 400


async def test_the_bearer_scheme_is_case_insensitive(authed):
    # RFC 9110 section 11.1: auth-scheme names are case-insensitive.
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        resp = await authed.get("/api/v1/models", headers={"Authorization": f"{scheme} {READ}"})
        assert resp.status == 200, scheme
    resp = await authed.get("/api/v1/models", headers={"Authorization": f"Basic {READ}"})
    assert resp.status == 401


async def test_health_and_metrics_stay_open(authed):
    assert (await authed.get("/health")).status == 200
    assert (await authed.get("/metrics")).status == 200
    assert (await authed.get("/health/detailed")).status == 401


def test_keys_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "keys"
    bad.write_text(f"{auth.hash_key('k')} read ok\nnot-a-hash write ci\n")
    with pytest.raises(ConfigError, match=r"keys:2"):
        auth.load_keys(str(bad), None)
    bad.write_text(f"{auth.hash_key('k')} superuser ci\n")
    with pytest.raises(ConfigError, match="scope"):
        auth.load_keys(str(bad), None)
    with pytest.raises(ConfigError, match="API_KEYS_FILE"):
        auth.load_keys(str(tmp_path / "missing"), None)
    with pytest.raises(ConfigError, match="API_KEYS entry 1"):
        auth.load_keys(None, "justakey")
    with pytest.raises(ConfigError, match="ENABLE_AUTH"):
        create_app(Settings(data_dir=str(tmp_path), enable_auth=True))


def test_identify_checks_every_key():
    keys = auth.load_keys(None, "a:read:x,b:write:y")
    assert auth.identify(keys, "b").name == "y"
    assert auth.identify(keys, "a").scope == "read"
    assert auth.identify(keys, "c") is None


def test_keys_create_prints_a_working_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--name", "ci", "--scope", "write"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    key = lines[1]
    keys_line = lines[3]
    assert key.startswith("tfms_") and len(key) > 40
    (tmp_path / "keys").write_text(keys_line + "\n")
    [entry] = auth.load_keys(str(tmp_path / "keys"), None)
    assert (entry.scope, entry.name) == ("write", "ci")
    assert auth.identify((entry,), key) == entry
    assert key not in keys_line


def test_auth_off_warns_once_at_start_up(tmp_path):
    from testkit.live_service import LiveService

    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": ""}, tmp_path / "log")
    service.start()
    service.stop()
    assert service.log().count("authentication is off") == 1
