"""The web UI through HTTP (no browser): pages, escaping, sign-in sessions, CSRF, scopes.

The browser half is tests/test_ui_browser.py. These run on both backends: the
pages read through the same storage calls as the API.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from app import clock
from app.config import Rate, Settings
from app.server import create_app
from app.ui.session import COOKIE
from tests.api_helpers import MODELS
from tests.snapshot_helpers import commit, sha

KEYS = {"read": "read-key-abcdefghijkl", "write": "write-key-abcdefghijkl", "admin": "admin-key-abcdefghijkl"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


async def register(client, headers=None, **fields) -> str:
    body = {"name": "churn", "algorithm": "xgboost", **fields}
    resp = await client.post(MODELS, json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["model_id"]


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "the page has no CSRF field"
    return m.group(1)


@pytest.fixture
async def auth_client(aiohttp_client, settings: Settings):
    keys = ",".join(f"{key}:{scope}:{scope}-user" for scope, key in KEYS.items())
    return await aiohttp_client(create_app(dataclasses.replace(settings, enable_auth=True, api_keys=keys)))


async def sign_in(client, key: str):
    page = await client.get("/ui/sign-in")
    resp = await client.post("/ui/sign-in", data={"api_key": key, "csrf": csrf_of(await page.text()),
                                                   "next": "/ui"}, allow_redirects=False)
    return resp


# -- pages ------------------------------------------------------------------------

async def test_root_redirects_to_the_ui(client):
    resp = await client.get("/", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/ui"


async def test_models_page_lists_filters_and_pages(client):
    for i in range(3):
        await register(client, name=f"alpha{i}", metrics={"accuracy": 0.5 + i / 10}, tags=["t"])
    await register(client, name="beta", algorithm="bert", status="deprecated")
    resp = await client.get("/ui")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert all(f">alpha{i}<" in html for i in range(3)) and ">beta<" in html
    assert "1–4 of 4" in html

    html = await (await client.get("/ui", params={"q": "alpha", "min_accuracy": "0.6"})).text()
    assert ">alpha1<" in html and ">alpha2<" in html and ">alpha0<" not in html and ">beta<" not in html
    assert 'value="alpha"' in html  # the form shows the query it answered

    html = await (await client.get("/ui", params={"status": "deprecated"})).text()
    assert ">beta<" in html and ">alpha0<" not in html

    html = await (await client.get("/ui", params={"sort": "name", "limit": "2", "page": "2"})).text()
    assert ">alpha2<" in html and ">beta<" in html and ">alpha0<" not in html
    assert "Page 2 of 2" in html
    assert 'href="/ui?sort=name&amp;limit=2&amp;page=1"' in html


async def test_bad_listing_parameter_is_a_readable_page(client):
    resp = await client.get("/ui", params={"status": "<gone>"})
    assert resp.status == 400
    html = await resp.text()
    assert resp.content_type == "text/html"
    assert "status must be one of active, deprecated, archived" in html


async def test_model_page_shows_metadata_versions_and_files(client):
    first = await register(client, hyperparameters={"depth": 6}, dataset_info={"rows": 1000},
                           description="first one", created_by="alice")
    resp = await client.post(f"{MODELS}/{first}/versions", json={"metrics": {"accuracy": 0.9}})
    second = (await resp.json())["model_id"]
    body = b"model bytes " * 100
    assert (await client.put(f"{MODELS}/{second}/upload?filename=m.pkl", data=body)).status == 201
    html = await (await client.get(f"/ui/models/{second}")).text()
    assert "v1.1" in html and f'href="/ui/models/{first}">v1.0</a>' in html  # timeline and lineage
    assert "depth" in html and "rows" in html and "alice" in html and "accuracy" in html
    assert "m.pkl" in html and f"/ui/models/{second}/download" in html
    assert f"curl -fOJ http://127.0.0.1:{client.port}/api/v1/models/{second}/download" in html
    assert f"model-service pull {second} --url http://127.0.0.1:{client.port}" in html

    resp = await client.get(f"/ui/models/{second}/download")
    assert resp.status == 200 and await resp.read() == body
    missing = await client.get("/ui/models/" + "0" * 24)
    assert missing.status == 404 and "no model with id" in await missing.text()
    nowhere = await client.get("/ui/nowhere/<b>")
    assert nowhere.status == 404 and nowhere.content_type == "text/html"
    assert "There is no page at /ui/nowhere/&lt;b&gt;." in await nowhere.text()
    form_only = await client.get(f"/ui/models/{second}/status")
    assert form_only.status == 405 and form_only.headers["Allow"] == "POST"


async def test_model_page_of_a_snapshot_lists_each_file_and_serves_it(client):
    files = {"config.json": b'{"layers": 12}', "weights/model part.bin": b"w" * 5000}
    model_id = await commit(client, "bert", files)
    html = await (await client.get(f"/ui/models/{model_id}")).text()
    for path, data in files.items():
        assert path in html and sha(data) in html
    assert f'href="/ui/models/{model_id}/files/weights/model%20part.bin"' in html
    assert "one tar of its 2 files" in html
    assert f"model-service pull {model_id} -o bert-v1.0 --url" in html
    resp = await client.get(f"/ui/models/{model_id}/files/weights/model%20part.bin")
    assert resp.status == 200 and await resp.read() == files["weights/model part.bin"]
    tar = await client.get(f"/ui/models/{model_id}/download")
    assert tar.status == 200 and tar.content_type == "application/x-tar"


async def test_user_values_are_escaped(client):
    model_id = await register(client, name="xss", algorithm="<img src=x onerror=alert(2)>",
                              description="<script>alert(1)</script>", tags=["<b>t</b>"],
                              metrics={"<i>m</i>": 1.0}, hyperparameters={"k": "</dd><script>x()</script>"})
    for path in ("/ui", f"/ui/models/{model_id}", "/ui/statistics"):
        html = await (await client.get(path)).text()
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>t</b>" not in html, path
        assert "<i>m</i>" not in html and "<script>x()" not in html, path
    html = await (await client.get(f"/ui/models/{model_id}")).text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_statistics_page_counts_downloads_per_hour(client):
    model_id = await register(client, algorithm="bert")
    assert (await client.put(f"{MODELS}/{model_id}/upload", data=b"x" * 10)).status == 201
    for _ in range(2):
        assert (await client.get(f"{MODELS}/{model_id}/download")).status == 200
    from app import registry
    from app.appkeys import COUNTS, STORAGE

    await client.app[COUNTS].settle()  # read beside the service: its counts written first (app/counts.py)
    stats = await registry.statistics(client.app[STORAGE])
    this_hour = clock.now().replace(minute=0, second=0, microsecond=0)
    assert stats.downloads_by_hour == {this_hour: 2}
    assert stats.downloads_since == 2
    html = await (await client.get("/ui/statistics")).text()
    assert f"{this_hour:%H}:00 2" in html  # the chart's text alternative
    assert "bert 1" in html and "<svg" in html


async def test_pages_carry_security_headers(client):
    resp = await client.get("/ui")
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ui"


async def test_write_actions_need_the_csrf_token(client):
    model_id = await register(client)
    html = await (await client.get(f"/ui/models/{model_id}")).text()
    token = csrf_of(html)
    resp = await client.post(f"/ui/models/{model_id}/status", data={"status": "archived"}, allow_redirects=False)
    assert resp.status == 403 and "security token" in await resp.text()
    resp = await client.post(f"/ui/models/{model_id}/status", data={"status": "archived", "csrf": token + "x"},
                             allow_redirects=False)
    assert resp.status == 403
    assert (await (await client.get(f"{MODELS}/{model_id}")).json())["status"] == "active"

    resp = await client.post(f"/ui/models/{model_id}/status", data={"status": "archived", "csrf": token},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/ui/models/{model_id}"
    resp = await client.post(f"/ui/models/{model_id}/tags", data={"tags": "a, b ,", "csrf": token},
                             allow_redirects=False)
    assert resp.status == 303
    doc = await (await client.get(f"{MODELS}/{model_id}")).json()
    assert doc["status"] == "archived" and doc["tags"] == ["a", "b"]

    resp = await client.post(f"/ui/models/{model_id}/status", data={"status": "gone", "csrf": token})
    assert resp.status == 400 and "status" in await resp.text()


# -- with ENABLE_AUTH=true ----------------------------------------------------------

async def test_without_a_session_the_ui_shows_sign_in_and_no_data(auth_client):
    model_id = await register(auth_client, headers={"X-API-Key": KEYS["write"]}, name="secret-model")
    for path in ("/ui", f"/ui/models/{model_id}", "/ui/statistics", f"/ui/models/{model_id}/download"):
        resp = await auth_client.get(path)  # follows to the sign-in page
        html = await resp.text()
        assert resp.status == 200 and resp.url.path == "/ui/sign-in", path
        assert "secret-model" not in html and 'name="api_key"' in html
    # The API itself still wants a key.
    assert (await auth_client.get(MODELS)).status == 401


async def test_sign_in_wrong_key_and_sign_out(auth_client):
    resp = await sign_in(auth_client, "not-a-key")
    assert resp.status == 401 and "not valid" in await resp.text()
    assert (await auth_client.get("/ui", allow_redirects=False)).status == 303

    resp = await sign_in(auth_client, KEYS["read"])
    assert resp.status == 303 and resp.headers["Location"] == "/ui"
    cookie = resp.cookies[COOKIE]
    assert KEYS["read"] not in cookie.value and cookie["httponly"] and cookie["samesite"] == "Strict"
    page = await auth_client.get("/ui", allow_redirects=False)
    assert page.status == 200 and "read-user" in await page.text()

    stolen = cookie.value
    resp = await auth_client.post("/ui/sign-out", data={"csrf": csrf_of(await page.text())}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/sign-in"
    assert (await auth_client.get("/ui", allow_redirects=False)).status == 303
    # The ended session stays ended even when its cookie is replayed.
    auth_client.session.cookie_jar.clear()
    auth_client.session.cookie_jar.update_cookies({COOKIE: stolen})
    assert (await auth_client.get("/ui", allow_redirects=False)).status == 303


async def test_sign_in_needs_the_csrf_token_and_refuses_other_sites(auth_client):
    await auth_client.get("/ui/sign-in")
    resp = await auth_client.post("/ui/sign-in", data={"api_key": KEYS["read"]}, allow_redirects=False)
    assert resp.status == 403
    page = await auth_client.get("/ui/sign-in")
    resp = await auth_client.post("/ui/sign-in", data={"api_key": KEYS["read"], "csrf": csrf_of(await page.text()),
                                                       "next": "//evil.example/ui"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui"


async def test_forged_or_tampered_session_is_no_session(auth_client):
    resp = await sign_in(auth_client, KEYS["admin"])
    value = resp.cookies[COOKIE].value
    payload, stamp, signature = value.split(".")
    jar = auth_client.session.cookie_jar
    jar.clear()
    jar.update_cookies({COOKIE: value})
    assert (await auth_client.get("/ui", allow_redirects=False)).status == 200
    for forged in (f"{payload}.{stamp}.{signature[::-1]}", f"{payload[:-1]}x.{stamp}.{signature}", "garbage"):
        jar.clear()
        jar.update_cookies({COOKIE: forged})
        assert (await auth_client.get("/ui", allow_redirects=False)).status == 303, forged


@pytest.mark.parametrize("scope, status_change, delete", [
    ("read", 403, 403),
    ("write", 303, 403),
    ("admin", 303, 303),
])
async def test_scopes_decide_what_the_ui_may_change(auth_client, scope, status_change, delete):
    model_id = await register(auth_client, headers={"X-API-Key": KEYS["write"]})
    await sign_in(auth_client, KEYS[scope])
    html = await (await auth_client.get(f"/ui/models/{model_id}")).text()
    assert ("Set status" in html) == (scope != "read")
    assert ("Delete this version" in html) == (scope == "admin")
    token = csrf_of(html)  # the sign-out form's: the session's token
    resp = await auth_client.post(f"/ui/models/{model_id}/status", data={"status": "deprecated", "csrf": token},
                                  allow_redirects=False)
    assert resp.status == status_change
    if status_change == 403:
        assert "scope is read; this action needs write" in await resp.text()
    resp = await auth_client.post(f"/ui/models/{model_id}/delete", data={"csrf": token}, allow_redirects=False)
    assert resp.status == delete
    api = await auth_client.get(f"{MODELS}/{model_id}", headers={"X-API-Key": KEYS["read"]})
    assert api.status == (404 if delete == 303 else 200)
    if delete != 303:
        assert (await api.json())["status"] == ("deprecated" if status_change == 303 else "active")


async def test_ui_requests_are_rate_limited_per_key(aiohttp_client, settings):
    keys = ",".join(f"{key}:{scope}:{scope}-user" for scope, key in KEYS.items())
    app = create_app(dataclasses.replace(settings, enable_auth=True, api_keys=keys, rate_limit=Rate(2, 60)))
    client = await aiohttp_client(app)
    assert (await sign_in(client, KEYS["read"])).status == 303  # two requests of this address
    # From here the session's key is the client, as with X-API-Key: a bucket of its own.
    assert (await client.get("/ui", allow_redirects=False)).status == 200
    assert (await client.get("/ui", allow_redirects=False)).status == 200
    assert (await client.get("/ui", allow_redirects=False)).status == 429
