"""Defects found by the OpenAPI/schemathesis work, each pinned by a test."""

import pytest

from app.appkeys import STORAGE


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n"])
async def test_names_and_versions_with_a_trailing_newline_are_rejected(client, name):
    resp = await client.post("/api/v1/models", json={"name": name, "algorithm": "x"})
    assert resp.status == 400
    resp = await client.post("/api/v1/models", json={"name": "ok", "algorithm": "x", "version": "v1.0\n"})
    assert resp.status == 400
    resp = await client.get("/api/v1/models/by-name/ok", params={"version": "v1.0\n"})
    assert resp.status == 400
    resp = await client.get("/api/v1/models", params={"sort": "metrics.acc\n"})
    assert resp.status == 400


@pytest.mark.parametrize("path", ["statistics", "popular", "recent", "search", "batch"])
async def test_fixed_paths_answer_405_for_methods_they_lack(client, path):
    resp = await client.put(f"/api/v1/models/{path}", json={})
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert resp.headers["Allow"]
    resp = await client.delete(f"/api/v1/models/{path}")
    assert resp.status == 405


@pytest.mark.parametrize("body, content_type", [
    (b"garbage", "multipart/form-data"),
    (b"--xyz\r\nbad header line\r\n\r\ndata\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz"),
])
async def test_malformed_multipart_is_400(client, body, content_type):
    resp = await client.post("/api/v1/models", data=body, headers={"Content-Type": content_type})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_multipart"
    created = await client.post("/api/v1/models", json={"name": "m", "algorithm": "x"})
    model_id = (await created.json())["model_id"]
    resp = await client.put(f"/api/v1/models/{model_id}/upload", data=body, headers={"Content-Type": content_type})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_multipart"


async def test_empty_update_changes_nothing_and_no_stray_fields_are_stored(client):
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "x"})
    model_id = (await resp.json())["model_id"]
    before = await (await client.get(f"/api/v1/models/{model_id}")).json()
    fields_before = set(await client.app[STORAGE].get_model(model_id))
    resp = await client.put(f"/api/v1/models/{model_id}", json={})
    assert resp.status == 200
    assert (await resp.json())["model"]["updated_at"] == before["updated_at"]
    resp = await client.post("/api/v1/models/batch", json={"operation": "update_status", "ids": [model_id],
                                                           "status": "archived"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["results"] == [{"id": model_id, "result": "ok"}]
    resp = await client.put(f"/api/v1/models/{model_id}", json={"tags": ["a"]})
    assert resp.status == 200, await resp.text()
    stored = await client.app[STORAGE].get_model(model_id)
    assert (stored["status"], stored["tags"]) == ("archived", ["a"]), "the two updates were not applied"
    assert set(stored) == fields_before, f"stray fields stored: {set(stored) ^ fields_before}"
    assert "breaking_changes" not in stored
