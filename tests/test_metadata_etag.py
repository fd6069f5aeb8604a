"""ETags on model documents: a poller's unchanged GET costs a 304 and no body."""


async def test_model_and_by_name_revalidate_with_304(client):
    resp = await client.post("/api/v1/models", json={"name": "poll", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    for path in (f"/api/v1/models/{model_id}", "/api/v1/models/by-name/poll"):
        resp = await client.get(path)
        assert resp.status == 200
        etag = resp.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"')
        resp = await client.get(path, headers={"If-None-Match": etag})
        assert resp.status == 304
        assert await resp.read() == b""
        assert resp.headers["ETag"] == etag
        resp = await client.get(path, headers={"If-None-Match": '"something-else"'})
        assert resp.status == 200

    # A change to the document changes its ETag.
    resp = await client.get("/api/v1/models/by-name/poll")
    old = resp.headers["ETag"]
    await client.put(f"/api/v1/models/{model_id}", json={"tags": ["new"]})
    resp = await client.get("/api/v1/models/by-name/poll", headers={"If-None-Match": old})
    assert resp.status == 200 and resp.headers["ETag"] != old
    # A new version is a new latest: the by-name poller sees it.
    old = resp.headers["ETag"]
    await client.post("/api/v1/models", json={"name": "poll", "algorithm": "a"})
    resp = await client.get("/api/v1/models/by-name/poll", headers={"If-None-Match": old})
    assert resp.status == 200
    assert (await resp.json())["version"] == "v1.1"
