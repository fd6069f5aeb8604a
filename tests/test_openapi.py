"""The OpenAPI 3.1 document at /api/v1/openapi.json, and the /docs page made from it.

Kept honest three ways: the document validates as OpenAPI 3.1; its operations
and the application's router match in both directions; and real responses
(bodies, statuses, headers, error codes) validate against what it documents.
"""

from __future__ import annotations

import hashlib
import os
import re

import aiohttp
import jsonschema
import pytest
import referencing
import referencing.jsonschema
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from app import downloads, errors, openapi
from app.appkeys import SETTINGS
from app.config import Rate, Settings
from app.errors import ApiError
from app.handlers.docs import DOCUMENT
from app.logs import REQUEST_ID_HEADER
from app.server import create_app
from app.ui import session as ui_session
from tests.api_helpers import MODELS, register, unused_id

# Routes the document describes that are not in the router yet, because they
# are being added in parallel. Empty now: /health/detailed and
# /api/v1/models/batch, the two that were pending, have landed. Add an entry
# here only for a route whose handler is being written; the coverage test
# fails once it exists and is still listed, so this list can only shrink.
PENDING_ROUTES: set[tuple[str, str]] = set()

embedded_only = pytest.mark.parametrize("backend", ["embedded"])
DOC_URI = "urn:tensorfleet:openapi"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@pytest.fixture(scope="module")
def doc() -> dict:
    return openapi.build(Settings())


def _app(tmp_path, **settings):
    return create_app(Settings(data_dir=str(tmp_path / "data"), **settings))


# --------------------------------------------------------------------------- the document itself

def test_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_every_component_schema_is_valid_json_schema(doc):
    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            pytest.fail(f"components.schemas.{name}: {e.message}")


def test_errors_are_raised_by_their_declaration():
    """A raise names a declared error (app/errors.py); a bare status and code are refused."""
    error = ApiError(errors.NOT_FOUND, "no model with id x")
    assert (error.status, error.code, error.message) == (404, "not_found", "no model with id x")
    with pytest.raises(TypeError):
        ApiError(404, "not_found", "no model with id x")
    with pytest.raises(ValueError, match="declared twice"):
        errors.declare("not_found", 404, "again")


def test_every_declared_error_is_in_the_documents_table(doc):
    rows = {line.split("|")[1].strip(" `"): line for line in doc["info"]["description"].splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(errors.REGISTRY)
    for code, declared in errors.REGISTRY.items():
        assert f"| {declared.status} | {declared.description} |" in rows[code]


def test_documented_error_codes_keep_their_status(doc):
    shared = doc["components"]["responses"]
    checked = 0
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if "$ref" in response:
                    response = shared[response["$ref"].rsplit("/", 1)[1]]
                for code in response.get("x-error-codes", []):
                    assert errors.REGISTRY[code].status == int(status), (method, path, code)
                    checked += 1
    assert checked > 50


def test_download_304_documents_every_header_it_repeats(doc):
    # /download repeats a file's headers, or a snapshot tar's.
    tar = set(downloads.NOT_MODIFIED_HEADERS) | set(downloads.TAR_NOT_MODIFIED_HEADERS)
    for template, repeated in ((MODELS + "/{id}/download", tar), (MODELS + "/by-name/{name}/download", tar),
                               (MODELS + "/{id}/files/{path}", set(downloads.NOT_MODIFIED_HEADERS)),
                               (MODELS + "/by-name/{name}/files/{path}", set(downloads.NOT_MODIFIED_HEADERS))):
        for method in ("get", "head"):
            documented = set(doc["paths"][template][method]["responses"]["304"]["headers"])
            assert documented - {REQUEST_ID_HEADER} == repeated, (method, template)


def test_limits_follow_the_settings():
    small = openapi.build(Settings(max_page_size=25, max_file_size=1000))
    limit = small["components"]["parameters"]["Limit"]["schema"]
    assert limit["maximum"] == 25 and limit["default"] == 10
    assert small["components"]["schemas"]["FileMetadata"]["properties"]["size_bytes"]["maximum"] == 1000


# --------------------------------------------------------------------------- document <-> router

def _template(resource) -> str:
    # aiohttp writes constrained parameters as {name:regex}; OpenAPI has only {name}.
    return re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", resource.canonical)


def _is_cors_preflight(route) -> bool:
    return route.method == "OPTIONS" and getattr(route.handler, "__module__", "").startswith("aiohttp_cors")


def router_operations(app) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(every method+path the router answers, the same without HEADs aiohttp added for GETs and CORS preflights)."""
    every, own = set(), set()
    for route in app.router.routes():
        if route.resource is None:
            continue
        key = (route.method, _template(route.resource))
        every.add(key)
        if _is_cors_preflight(route):
            continue
        if route.method == "HEAD" and any(r.method == "GET" and r.handler is route.handler
                                          for r in route.resource):
            continue  # add_get's automatic HEAD
        own.add(key)
    return every, own


def documented_operations(doc) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m.upper() in METHODS}


@pytest.mark.parametrize("cors", [(), ("https://example.org",)], ids=["plain", "cors"])
def test_router_and_document_match(tmp_path, cors):
    app = _app(tmp_path, cors_origins=cors)
    documented = documented_operations(app[DOCUMENT])
    every, own = router_operations(app)
    # The web UI's pages are HTML for people (README, "Web UI"), not API operations.
    own = {(method, path) for method, path in own if not ui_session.owns(path)}

    undocumented = own - documented
    assert not undocumented, f"routes missing from the OpenAPI document: {sorted(undocumented)}"

    missing = documented - every - PENDING_ROUTES
    assert not missing, f"documented operations with no route: {sorted(missing)}"

    landed = PENDING_ROUTES & every
    assert not landed, f"{sorted(landed)} exist now: remove them from PENDING_ROUTES"
    assert PENDING_ROUTES <= documented, "PENDING_ROUTES lists routes the document does not describe"


def test_the_served_document_is_the_settings_document(tmp_path):
    settings = Settings(data_dir=str(tmp_path / "data"), max_page_size=7)
    assert create_app(settings)[DOCUMENT] == openapi.build(settings)


# --------------------------------------------------------------------------- checking real responses

def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Contract:
    """Checks real responses against what the document says about their operation."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        resource = referencing.jsonschema.DRAFT202012.create_resource(doc)
        self.registry = referencing.Registry().with_resource(DOC_URI, resource)

    def response(self, method: str, path: str, status: int) -> tuple[dict, tuple[str, ...]]:
        """The documented response object, and the JSON pointer parts leading to it."""
        item = self.doc["paths"].get(path)
        assert item is not None, f"{path} is not documented"
        operation = item.get(method.lower())
        assert operation is not None, f"{method} {path} is not documented"
        assert str(status) in operation["responses"], (
            f"{method} {path} answered {status}, documented: {sorted(operation['responses'])}")
        parts: tuple[str, ...] = ("paths", path, method.lower(), "responses", str(status))
        resp = operation["responses"][str(status)]
        if "$ref" in resp:
            parts = tuple(resp["$ref"][2:].split("/"))
            resp = self.doc["components"]["responses"][parts[-1]]
        return resp, parts

    def validate_json(self, body, pointer: str) -> None:
        validator = jsonschema.Draft202012Validator(
            {"$ref": DOC_URI + pointer}, registry=self.registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])

    def schema(self, name: str, body) -> None:
        self.validate_json(body, _pointer("components", "schemas", name))

    async def check(self, method: str, path: str, resp, expect_status: int | None = None):
        """Status documented, documented headers present, body valid; returns the JSON body (or None)."""
        if expect_status is not None:
            assert resp.status == expect_status, f"{resp.status}: {(await resp.read())[:300]!r}"
        documented, parts = self.response(method, path, resp.status)
        for name, header in documented.get("headers", {}).items():
            if "$ref" in header:
                header = self.doc["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
            if header.get("required"):
                assert name in resp.headers, f"{method} {path} {resp.status}: no {name} header"
        content = documented.get("content")
        raw = await resp.read()
        if not content:
            assert method == "HEAD" or resp.status == 304 or not raw, f"undocumented body: {raw[:200]!r}"
            return None
        # "*/*": a file of a snapshot, whose type is the one the manifest names.
        assert resp.content_type in content or "*/*" in content, (
            f"content type {resp.content_type} not in {sorted(content)}")
        if resp.content_type != "application/json" or "application/json" not in content:
            return raw
        body = await resp.json()
        self.validate_json(body, _pointer(*parts, "content", "application/json", "schema"))
        return body


@pytest.fixture
def contract(doc) -> Contract:
    return Contract(doc)


M_ID = MODELS + "/{id}"


@embedded_only
async def test_registry_responses_match_the_document(client, contract):
    # Registration, without and then with a file.
    resp = await client.post(MODELS, json={"name": "churn", "algorithm": "xgboost", "metrics": {"accuracy": 0.9},
                                           "tags": ["prod"], "dataset_info": {"rows": [1, {"a": None}]}})
    answer = await contract.check("POST", MODELS, resp, 201)
    contract.schema("RegistrationAnswer", answer)
    model_id = answer["model_id"]

    resp = await client.get(f"{MODELS}/{model_id}")
    model = await contract.check("GET", M_ID, resp, 200)
    assert "file_metadata" not in model and "model_size" not in model
    contract.schema("Model", model)

    content = os.urandom(3000)
    resp = await client.put(f"{MODELS}/{model_id}/upload?filename=model.pkl", data=content,
                            headers={"X-Checksum-Sha256": hashlib.sha256(content).hexdigest()})
    uploaded = await contract.check("PUT", M_ID + "/upload", resp, 201)
    contract.schema("UploadAnswer", uploaded)

    resp = await client.get(f"{MODELS}/{model_id}")
    model = await contract.check("GET", M_ID, resp, 200)
    assert model["file_metadata"]["size_bytes"] == 3000 and model["model_size"] == "3.0 KB"
    contract.schema("Model", model)
    resp = await client.get(f"{MODELS}/{model_id}", headers={"If-None-Match": resp.headers["ETag"]})
    await contract.check("GET", M_ID, resp, 304)

    resp = await client.get(f"{MODELS}/{model_id}/info")
    await contract.check("GET", M_ID + "/info", resp, 200)

    # Multipart registration with its file.
    form = aiohttp.FormData()
    form.add_field("metadata", '{"name": "churn", "algorithm": "xgboost", "breaking_changes": true}',
                   content_type="application/json")
    form.add_field("file", content, filename="model.pkl", content_type="application/octet-stream")
    resp = await client.post(MODELS, data=form)
    second = await contract.check("POST", MODELS, resp, 201)
    assert second["version"] == "v2.0"

    # Versions, update, listings, by name.
    resp = await client.post(f"{MODELS}/{model_id}/versions", json={"description": "retrained"})
    await contract.check("POST", M_ID + "/versions", resp, 201)
    resp = await client.get(f"{MODELS}/{model_id}/versions")
    versions = await contract.check("GET", M_ID + "/versions", resp, 200)
    assert [v["version"] for v in versions["versions"]] == ["v2.1", "v2.0", "v1.0"]
    resp = await client.put(f"{MODELS}/{model_id}", json={"status": "deprecated", "tags": ["a", "b"]})
    updated = await contract.check("PUT", M_ID, resp, 200)
    contract.schema("Model", updated["model"])
    for path in (MODELS, MODELS + "/search"):
        resp = await client.get(path, params={"q": "churn", "sort": "-metrics.accuracy", "limit": "2"})
        listing = await contract.check("GET", path, resp, 200)
        assert listing["pagination"] == {"page": 1, "limit": 2, "total": 3, "pages": 2}
        contract.schema("ModelList", listing)
    for path in ("/popular", "/recent"):
        resp = await client.get(MODELS + path, params={"limit": "5"})
        await contract.check("GET", MODELS + path, resp, 200)
    resp = await client.get(MODELS + "/by-name/churn", params={"version": "v1.0"})
    assert (await contract.check("GET", MODELS + "/by-name/{name}", resp, 200))["id"] == model_id
    resp = await client.get(MODELS + "/by-name/churn", headers={"If-None-Match": "*"})
    await contract.check("GET", MODELS + "/by-name/{name}", resp, 304)

    # Statistics under both paths, batch, delete.
    for path in (MODELS + "/statistics", "/api/v1/statistics"):
        stats = await contract.check("GET", path, await client.get(path), 200)
        contract.schema("Statistics", stats)
        assert stats["total_models"] == 3
    resp = await client.post(MODELS + "/batch", json={"operation": "add_tags", "ids": [model_id, unused_id(), "x"],
                                                      "tags": ["t"]})
    batch = await contract.check("POST", MODELS + "/batch", resp, 200)
    assert batch["summary"] == {"ok": 1, "not_found": 1, "invalid_id": 1}
    resp = await client.delete(f"{MODELS}/{second['model_id']}")
    await contract.check("DELETE", M_ID, resp, 200)


@embedded_only
async def test_error_responses_match_the_document(client, contract):
    model_id = (await register(client, "errs", "lgbm"))["model_id"]
    missing = unused_id()
    metadata_only = aiohttp.FormData(default_to_multipart=True)
    metadata_only.add_field("metadata", '{"name": "m", "algorithm": "x"}', content_type="application/json")
    cases = [
        ("GET", M_ID, f"{MODELS}/nothex", {}, 400, "invalid_id"),
        ("GET", M_ID, f"{MODELS}/{missing}", {}, 404, "not_found"),
        ("PUT", M_ID, f"{MODELS}/{model_id}", {"json": {"name": "x"}}, 400, "immutable_field"),
        ("PUT", M_ID, f"{MODELS}/{model_id}", {"json": {"nope": 1}}, 400, "unknown_field"),
        ("PUT", M_ID, f"{MODELS}/{model_id}", {"data": b"[1]"}, 400, "invalid_json"),
        ("PUT", M_ID, f"{MODELS}/{model_id}", {"data": b" " * (1024 * 1024 + 1)}, 413, "payload_too_large"),
        ("DELETE", M_ID, f"{MODELS}/{missing}", {}, 404, "not_found"),
        ("POST", MODELS, MODELS, {"json": {"name": "bad name", "algorithm": "x"}}, 400, "validation_error"),
        ("POST", MODELS, MODELS, {"json": {"name": "errs", "algorithm": "x", "version": "v1.0"}}, 409,
         "version_exists"),
        ("POST", MODELS, MODELS, {"data": metadata_only}, 400, "missing_file"),
        ("GET", MODELS, MODELS + "?limit=0", {}, 400, "invalid_parameter"),
        ("GET", MODELS + "/popular", MODELS + "/popular?limit=x", {}, 400, "invalid_parameter"),
        ("GET", MODELS + "/by-name/{name}", MODELS + "/by-name/errs?version=2", {}, 400, "invalid_parameter"),
        ("GET", MODELS + "/by-name/{name}", MODELS + "/by-name/nobody", {}, 404, "not_found"),
        ("GET", M_ID + "/info", f"{MODELS}/{model_id}/info", {}, 404, "no_file"),
        ("GET", M_ID + "/download", f"{MODELS}/{model_id}/download", {}, 404, "no_file"),
        ("PUT", M_ID + "/upload", f"{MODELS}/{model_id}/upload?sha256=abc", {"data": b"x"}, 400,
         "invalid_checksum"),
        ("POST", M_ID + "/upload", f"{MODELS}/{model_id}/upload?sha256=" + "0" * 64, {"data": b"x"}, 422,
         "checksum_mismatch"),
        ("PUT", M_ID + "/upload", f"{MODELS}/{missing}/upload", {"data": b"x"}, 404, "not_found"),
        ("POST", M_ID + "/versions", f"{MODELS}/{model_id}/versions", {"json": {"name": "other"}}, 400,
         "immutable_field"),
        ("POST", MODELS + "/batch", MODELS + "/batch", {"json": {"operation": "explode", "ids": ["x"]}}, 400,
         "validation_error"),
    ]
    for method, template, url, kwargs, status, code in cases:
        resp = await client.request(method, url, **kwargs)
        body = await contract.check(method, template, resp, status)
        contract.schema("Error", body)
        assert body["error"]["code"] == code, (method, url, body)

    # A code the route does not document fails the check: the enums are not decorative.
    _, parts = contract.response("GET", M_ID, 404)
    with pytest.raises(AssertionError):
        contract.validate_json({"error": {"code": "no_file", "message": "x"}},
                               _pointer(*parts, "content", "application/json", "schema"))


@embedded_only
async def test_download_responses_match_the_document(client, contract):
    model_id = (await register(client, "dl", "xgboost"))["model_id"]
    content = os.urandom(10_000)
    await client.put(f"{MODELS}/{model_id}/upload", data=content)
    by_id, by_name = f"{MODELS}/{model_id}/download", f"{MODELS}/by-name/dl/download"
    for url, template in ((by_id, M_ID + "/download"), (by_name, MODELS + "/by-name/{name}/download")):
        resp = await client.get(url)
        assert await contract.check("GET", template, resp, 200) == content
        etag = resp.headers["ETag"]
        resp = await client.get(url, headers={"Range": "bytes=10-19"})
        assert await contract.check("GET", template, resp, 206) == content[10:20]
        assert resp.headers["Content-Range"] == "bytes 10-19/10000"
        resp = await client.get(url, headers={"Range": "bytes=0-1,-2"})
        await contract.check("GET", template, resp, 206)
        assert resp.content_type == "multipart/byteranges"
        resp = await client.get(url, headers={"If-None-Match": etag})
        await contract.check("GET", template, resp, 304)
        resp = await client.get(url, headers={"If-Match": '"other"'})
        await contract.check("GET", template, resp, 412)
        resp = await client.get(url, headers={"Range": "bytes=20000-"})
        await contract.check("GET", template, resp, 416)
        assert resp.headers["Content-Range"] == "bytes */10000"
        resp = await client.head(url)
        await contract.check("HEAD", template, resp, 200)
        assert resp.headers["Content-Length"] == "10000"
        resp = await client.head(url, headers={"If-Match": '"other"'})
        await contract.check("HEAD", template, resp, 412)


@embedded_only
async def test_upload_session_responses_match_the_document(client, contract):
    uploads, session = "/api/v1/uploads", "/api/v1/uploads/{upload_id}"
    data = os.urandom(3000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    opened = await contract.check("POST", uploads, await client.post(uploads, json={"size_bytes": 3000}), 202)
    contract.schema("UploadSessionAnswer", opened)
    url = f"{uploads}/{opened['id']}"
    await contract.check("GET", session, await client.get(url), 200)
    resp = await client.patch(url, data=data[:1000], headers={"Content-Range": "bytes 0-999/3000"})
    assert (await contract.check("PATCH", session, resp, 202))["offset"] == 1000
    await contract.check("HEAD", session, await client.head(url), 200)
    resp = await client.patch(url, data=data[:10], headers={"Content-Range": "bytes 0-9/3000"})
    assert (await contract.check("PATCH", session, resp, 416))["error"]["offset"] == 1000
    for headers in ({"Content-Range": "bytes x"}, {"Content-Digest": "sha-256=1"}):
        await contract.check("PATCH", session, await client.patch(url, data=data[1000:], headers=headers), 400)
    resp = await client.patch(url, data=data[1000:], headers={"Content-Digest": f"sha-256=:{'A' * 43}=:"})
    await contract.check("PATCH", session, resp, 422)
    await contract.check("PUT", session, await client.put(url, params={"digest": digest}), 422)
    await contract.check("PUT", session, await client.put(url, params={"digest": "x"}), 400)
    resp = await client.put(url, params={"digest": digest}, data=data[1000:])
    contract.schema("BlobAnswer", await contract.check("PUT", session, resp, 201))
    await contract.check("GET", session, await client.get(url), 404)
    await contract.check("HEAD", session, await client.head(url), 404)
    await contract.check("POST", uploads, await client.post(uploads, json={"checksum": digest}), 201)
    await contract.check("POST", uploads, await client.post(uploads, json={"size_bytes": -1}), 400)
    await contract.check("POST", uploads, await client.post(uploads, json={"size_bytes": 10**12}), 413)
    doomed = (await (await client.post(uploads)).json())["id"]
    await contract.check("DELETE", session, await client.delete(f"{uploads}/{doomed}"), 204)
    await contract.check("DELETE", session, await client.delete(f"{uploads}/{doomed}"), 404)
    model_id = (await register(client, "attached"))["model_id"]
    resp = await client.post(f"{MODELS}/{model_id}/upload", params={"digest": digest})
    await contract.check("POST", M_ID + "/upload", resp, 201)
    resp = await client.put(f"{MODELS}/{model_id}/upload", params={"digest": "sha256:" + "0" * 64})
    await contract.check("PUT", M_ID + "/upload", resp, 422)


@embedded_only
async def test_snapshot_responses_match_the_document(client, contract):
    files = {"config.json": b'{"a": 1}', "w/weights.bin": os.urandom(5000)}
    for data in files.values():
        resp = await client.put(f"/api/v1/blobs/sha256:{hashlib.sha256(data).hexdigest()}", data=data)
        assert resp.status == 201
    resp = await client.post(MODELS, json={"name": "snap", "algorithm": "x", "files": [
        {"path": p, "checksum": "sha256:" + hashlib.sha256(d).hexdigest(), "size_bytes": len(d)}
        for p, d in files.items()]})
    model_id = (await resp.json())["model_id"]
    named = MODELS + "/by-name/{name}"
    for prefix, template in ((f"{MODELS}/{model_id}", M_ID), (f"{MODELS}/by-name/snap", named)):
        resp = await client.get(prefix + "/files")
        manifest = await contract.check("GET", template + "/files", resp, 200)
        contract.schema("SnapshotManifest", manifest)
        resp = await client.get(prefix + "/files", headers={"If-None-Match": resp.headers["ETag"]})
        await contract.check("GET", template + "/files", resp, 304)
        await contract.check("HEAD", template + "/files", await client.head(prefix + "/files"), 200)
        file_template = template + "/files/{path}"
        resp = await client.get(prefix + "/files/config.json")
        assert await contract.check("GET", file_template, resp, 200) == files["config.json"]
        resp = await client.get(prefix + "/files/w/weights.bin", headers={"Range": "bytes=0-1,-2"})
        await contract.check("GET", file_template, resp, 206)
        resp = await client.get(prefix + "/files/w/weights.bin", headers={"If-None-Match": resp.headers["ETag"]})
        await contract.check("GET", file_template, resp, 304)
        await contract.check("GET", file_template, await client.get(prefix + "/files/w/bad."), 400)
        await contract.check("GET", file_template, await client.get(prefix + "/files/nothere"), 404)
        await contract.check("HEAD", file_template, await client.head(prefix + "/files/config.json"), 200)
        tar = await client.get(prefix + "/download")
        assert (await contract.check("GET", template + "/download", tar, 200))[:11] == b"config.json"
        resp = await client.get(prefix + "/download", headers={"Range": "bytes=10-19"})
        await contract.check("GET", template + "/download", resp, 206)
        resp = await client.get(prefix + "/download", headers={"If-None-Match": tar.headers["ETag"]})
        await contract.check("GET", template + "/download", resp, 304)
    resp = await client.get(f"{MODELS}/{unused_id()}/files")
    await contract.check("GET", M_ID + "/files", resp, 404)


@embedded_only
async def test_operational_responses_match_the_document(client, contract):
    health = await contract.check("GET", "/health", await client.get("/health"), 200)
    contract.schema("Health", health)
    resp = await client.get("/health/detailed")
    # 503 is documented too (a test machine may be short of disk); either way the body must match.
    contract.schema("DetailedHealth", await contract.check("GET", "/health/detailed", resp))
    await contract.check("GET", "/metrics", await client.get("/metrics"), 200)
    served = await contract.check("GET", "/api/v1/openapi.json", await client.get("/api/v1/openapi.json"), 200)
    assert served == openapi.build(client.app[SETTINGS])
    await contract.check("GET", "/docs", await client.get("/docs"), 200)


async def test_auth_and_rate_limit_responses_match_their_document(aiohttp_client, tmp_path):
    """With API keys and rate limits on, the document grows 401/403/429, and they are what the service sends."""
    settings = Settings(data_dir=str(tmp_path / "data"), enable_auth=True, api_keys="rk:read:reader,wk:write:ci",
                        rate_limit=Rate(8, 3600))
    client = await aiohttp_client(create_app(settings))
    doc = client.app[DOCUMENT]
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["security"] and doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"][MODELS + "/batch"]["post"]["x-required-scope"] == "admin"
    contract = Contract(doc)

    resp = await client.get(MODELS)
    await contract.check("GET", MODELS, resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.head(f"{MODELS}/{unused_id()}/download")
    await contract.check("HEAD", M_ID + "/download", resp, 401)
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a"}, headers={"X-API-Key": "rk"})
    await contract.check("POST", MODELS, resp, 403)
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a"}, headers={"Authorization": "Bearer wk"})
    body = await contract.check("POST", MODELS, resp, 201)
    resp = await client.get(f"{MODELS}/{body['model_id']}", headers={"X-API-Key": "rk"})
    assert (await contract.check("GET", M_ID, resp, 200))["created_by"] == "ci"
    resp = await client.delete(f"{MODELS}/{body['model_id']}", headers={"X-API-Key": "wk"})
    await contract.check("DELETE", M_ID, resp, 403)
    for _ in range(8):
        resp = await client.get(MODELS, headers={"X-API-Key": "rk"})
        if resp.status == 429:
            break
        await contract.check("GET", MODELS, resp, 200)
    await contract.check("GET", MODELS, resp, 429)
    assert int(resp.headers["Retry-After"]) > 0
    # Open paths stay open and are not rate limited.
    await contract.check("GET", "/health", await client.get("/health"), 200)


def test_document_without_auth_or_limits_has_no_401_403_429(doc):
    """Without auth or rate limits, a 429 is only an upload's per-client cap (on by default), or the
    cap on a key's upload sessions."""
    assert "security" not in doc and "securitySchemes" not in doc["components"]
    uploads = 0
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert not {"401", "403"} & set(responses), (method, path)
            if (method, path) == ("post", "/api/v1/uploads"):
                assert responses["429"]["x-error-codes"] == ["too_many_upload_sessions"]
            elif "429" in responses:
                assert responses["429"]["x-error-codes"] == ["too_many_client_uploads"], (method, path)
                assert responses["503"]["$ref"].endswith("/UploadUnavailable"), (method, path)
                uploads += 1
    # POST /models, POST and PUT .../{id}/upload, PUT /blobs/{digest}, PATCH and PUT /uploads/{upload_id}
    assert uploads == 6


# --------------------------------------------------------------------------- /docs

@embedded_only
async def test_docs_page_lists_every_operation_and_needs_no_network(client, doc):
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    for method, path in documented_operations(doc):
        assert path in page, f"/docs does not mention {path}"
        anchor = f"op-{method.lower()}-" + re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")
        assert f'id="{anchor}"' in page, f"/docs has no section for {method} {path}"
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    # Nothing fetched from elsewhere: no scripts, no stylesheets or images by URL, no absolute links.
    assert "<script" not in page.lower() and "<link" not in page.lower() and "<img" not in page.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert 'href="/api/v1/openapi.json"' in page
