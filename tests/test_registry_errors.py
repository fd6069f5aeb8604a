"""HTTP contract of the registry API (/api/v1/models): every way a request is refused.

Each refusal must answer ``{"error": {"code": ..., "message": ...}}`` with the
right status, name the offending field or rule where the specification asks
for it, and leave the registry exactly as it was. Query parameters must only
ever be literal values. Runs on both storage backends.
"""

from __future__ import annotations

import json

import pytest

from tests.api_helpers import (
    MODELS,
    expect_error,
    get_model,
    json_of,
    listing,
    model_url,
    register,
    snapshot,
    unused_id,
)
from tests.transfer_helpers import Part, multipart

ONE_MIB = 1024 * 1024


@pytest.fixture
async def seeded(client) -> dict:
    """Three models (two versions of seed_a, one seed_b) and a snapshot of every document."""
    a1 = await register(client, "seed_a", "random_forest", hyperparameters={"n_estimators": 10},
                        metrics={"accuracy": 0.9}, dataset_info={"name": "ds"}, tags=["t1"], description="first",
                        created_by="alice")
    a2 = await register(client, "seed_a", "random_forest", metrics={"accuracy": 0.91}, tags=["t2"])
    b1 = await register(client, "seed_b", "svm", tags=["other"])
    return {
        "a1": a1["model_id"],
        "a2": a2["model_id"],
        "b1": b1["model_id"],
        "snapshot": await snapshot(client),
    }


async def assert_unchanged(client, seeded: dict) -> None:
    assert await snapshot(client) == seeded["snapshot"], "a rejected request changed the registry"


def _valid_registration(**overrides) -> dict:
    return {"name": "fresh_model", "algorithm": "random_forest", **overrides}


# ---------------------------------------------------------------------------
# Ids: malformed 400, unknown 404
# ---------------------------------------------------------------------------


def _id_requests(model_id: str):
    """Every endpoint that takes a model id, as (method, path, json body)."""
    return [
        ("GET", model_url(model_id), None),
        ("PUT", model_url(model_id), {"status": "archived"}),
        ("DELETE", model_url(model_id), None),
        ("POST", model_url(model_id, "/versions"), {"metrics": {"accuracy": 0.5}}),
        ("GET", model_url(model_id, "/versions"), None),
    ]


@pytest.mark.parametrize("bad_id", [
    "123",
    "z" * 24,                       # 24 characters, not hexadecimal
    "abcdefghijkl",                 # 12 characters: a valid ObjectId byte string, not a hex id
    "0" * 25,
    "64b7f0c2a1e4d3f5b6a7c8d",      # 23 hex digits
    "64b7f0c2a1e4d3f5b6a7c8d9 ",    # trailing space
    "$ne",
    "not-an-id",
])
async def test_malformed_id_is_400(client, seeded, bad_id):
    for method, path, body in _id_requests(bad_id):
        resp = await client.request(method, path, json=body)
        await expect_error(resp, 400)
    await assert_unchanged(client, seeded)


async def test_unknown_id_is_404(client, seeded):
    missing = unused_id()
    for method, path, body in _id_requests(missing):
        resp = await client.request(method, path, json=body)
        await expect_error(resp, 404)
    await assert_unchanged(client, seeded)


async def test_deleted_id_is_404_everywhere(client, seeded):
    await json_of(await client.delete(model_url(seeded["b1"])), 200)
    for method, path, body in _id_requests(seeded["b1"]):
        resp = await client.request(method, path, json=body)
        await expect_error(resp, 404)
    after = await snapshot(client)
    assert after == [d for d in seeded["snapshot"] if d["id"] != seeded["b1"]]


# ---------------------------------------------------------------------------
# Bodies: malformed JSON, size
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    "{",
    '{"name": }',
    '{"name": "x", "algorithm": "y",}',
    "{'name': 'x', 'algorithm': 'y'}",
    "not json",
    "",
    "   ",
    "[]",
    '[{"name": "x", "algorithm": "y"}]',
    '"text"',
    "null",
    "42",
    '{"name": "x", "algorithm": "y"} trailing',
    '{"name": "x", "algorithm": "y", "metrics": {"accuracy": NaN}}',
])
async def test_malformed_json_body_is_400(client, seeded, raw):
    targets = [("POST", MODELS), ("PUT", model_url(seeded["a1"])), ("POST", model_url(seeded["a1"], "/versions"))]
    for method, path in targets:
        resp = await client.request(method, path, data=raw.encode(), headers={"Content-Type": "application/json"})
        await expect_error(resp, 400)
    await assert_unchanged(client, seeded)


def _sized_body(size: int) -> bytes:
    """A valid registration body of exactly ``size`` bytes."""
    head = json.dumps({"name": "big_model", "algorithm": "svm", "hyperparameters": {"blob": ""}})
    pad = size - len(head)
    assert pad > 0
    body = json.dumps({"name": "big_model", "algorithm": "svm", "hyperparameters": {"blob": "a" * pad}})
    assert len(body) == size
    return body.encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_json_body_over_1_mib_is_413(client, seeded, chunked):
    body = _sized_body(ONE_MIB + 1)
    targets = [("POST", MODELS), ("PUT", model_url(seeded["a1"])), ("POST", model_url(seeded["a1"], "/versions"))]
    for method, path in targets:
        if chunked:
            async def gen():
                for i in range(0, len(body), 64 * 1024):
                    yield body[i:i + 64 * 1024]
            data = gen()
        else:
            data = body
        resp = await client.request(method, path, data=data, headers={"Content-Type": "application/json"})
        await expect_error(resp, 413)
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("size", [100_000, ONE_MIB], ids=["100kB", "exactly-1MiB"])
async def test_json_body_up_to_1_mib_is_accepted(client, size):
    body = _sized_body(size)
    resp = await client.post(MODELS, data=body, headers={"Content-Type": "application/json"})
    answer = await json_of(resp, 201)
    doc = await get_model(client, answer["model_id"])
    assert doc["name"] == "big_model"
    assert doc["hyperparameters"] == json.loads(body)["hyperparameters"]


# ---------------------------------------------------------------------------
# Registration: required fields, the name rule, field types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("body, field", [
    ({}, "name"),
    ({"algorithm": "random_forest"}, "name"),
    ({"name": "no_algorithm"}, "algorithm"),
    ({"name": "no_algorithm", "metrics": {"accuracy": 0.9}}, "algorithm"),
])
async def test_missing_required_field_is_400_naming_it(client, seeded, body, field):
    await expect_error(await client.post(MODELS, json=body), 400, field)
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("name, stripped", [
    ("bad name!", "badname"),
    ("has space", "hasspace"),
    (" leading", "leading"),
    ("trailing ", "trailing"),
    ("slash/name", "slashname"),
    ("semi;colon", "semicolon"),
    ("tab\tname", "tabname"),
    ("new\nline", "newline"),
    ("modèle", "modle"),
    ("名前", None),
    ("$ne", "ne"),
    ("a+b", "ab"),
    ("", None),
    ("x" * 101, None),
])
async def test_name_outside_the_rule_is_400_naming_the_rule(client, seeded, name, stripped):
    err = await expect_error(await client.post(MODELS, json=_valid_registration(name=name)), 400, "name", "100")
    assert "a-z" in err["message"].lower() or "alphanumeric" in err["message"].lower(), err
    await assert_unchanged(client, seeded)
    if stripped:
        # Not silently cleaned up and stored under another name.
        await expect_error(await client.get(f"{MODELS}/by-name/{stripped}"), 404)


@pytest.mark.parametrize("field, value", [
    ("name", 123),
    ("name", None),
    ("name", ["seed_a"]),
    ("name", {"$ne": None}),
    ("algorithm", 5),
    ("algorithm", None),
    ("algorithm", {"$ne": None}),
    ("algorithm", ["svm"]),
    ("hyperparameters", [1, 2]),
    ("hyperparameters", "n_estimators=10"),
    ("hyperparameters", 10),
    ("metrics", "high"),
    ("metrics", [0.9]),
    ("metrics", {"accuracy": "0.9"}),
    ("metrics", {"accuracy": True}),
    ("metrics", {"accuracy": None}),
    ("metrics", {"accuracy": {"value": 0.9}}),
    ("metrics", {"accuracy": [0.9]}),
    ("dataset_info", "customer_data"),
    ("dataset_info", ["a"]),
    ("tags", "churn,production"),
    ("tags", [1, 2]),
    ("tags", ["ok", None]),
    ("tags", {"a": "b"}),
    ("tags", ["ok", {"$ne": 1}]),
    ("status", "retired"),
    ("status", "ACTIVE"),
    ("status", 1),
    ("description", 5),
    ("description", ["text"]),
    ("created_by", 7),
    ("created_by", {"$gt": ""}),
    ("format", 1),
    ("version", 1.0),
    ("version", "1.0"),
    ("version", "v1"),
    ("version", "v1.0.0"),
    ("breaking_changes", "yes"),
    ("breaking_changes", 1),
])
async def test_registration_field_of_the_wrong_type_is_400_naming_it(client, seeded, field, value):
    resp = await client.post(MODELS, json=_valid_registration(**{field: value}))
    await expect_error(resp, 400, field)
    await assert_unchanged(client, seeded)


# ---------------------------------------------------------------------------
# Keys MongoDB would read as operators or paths
# ---------------------------------------------------------------------------

OPERATOR_KEYS = [
    ("hyperparameters", {"$where": "sleep(1000)"}),
    ("hyperparameters", {"learning.rate": 0.1}),
    ("hyperparameters", {"optimizer": {"$set": {"lr": 1}}}),
    ("hyperparameters", {"layers": [{"units": 64}, {"$inc": 1}]}),
    ("hyperparameters", {"a": {"b": {"c.d": 1}}}),
    ("hyperparameters", {"a": [[{"$x": 1}]]}),
    ("metrics", {"$gt": 0.5}),
    ("metrics", {"test.accuracy": 0.9}),
    ("dataset_info", {"$set": {"name": "x"}}),
    ("dataset_info", {"features": [{"age.years": 1}]}),
    ("dataset_info", {"source": {"$ref": "users", "$id": 1}}),
]


@pytest.mark.parametrize("field, value", OPERATOR_KEYS)
async def test_dollar_or_dotted_keys_are_400(client, seeded, field, value):
    resp = await client.post(MODELS, json=_valid_registration(**{field: value}))
    await expect_error(resp, 400, field)
    resp = await client.put(model_url(seeded["a1"]), json={field: value})
    await expect_error(resp, 400, field)
    resp = await client.post(model_url(seeded["a1"], "/versions"), json={field: value})
    await expect_error(resp, 400, field)
    await assert_unchanged(client, seeded)


# ---------------------------------------------------------------------------
# Update and new version: immutable fields, field types, duplicate versions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("id", "0123456789abcdef01234567"),
    ("name", "renamed"),
    ("version", "v9.9"),
    ("created_at", "2020-01-01T00:00:00.000Z"),
    ("download_count", 1000),
    ("file_metadata", {"file_id": "0123456789abcdef01234567", "size_bytes": 1}),
])
async def test_put_of_an_immutable_field_is_400_naming_it(client, seeded, field, value):
    alone = await client.put(model_url(seeded["a1"]), json={field: value})
    await expect_error(alone, 400, field)
    # Together with a valid change: nothing at all is applied.
    mixed = await client.put(model_url(seeded["a1"]), json={"status": "archived", "tags": ["x"], field: value})
    await expect_error(mixed, 400, field)
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("field, value", [
    ("hyperparameters", [1]),
    ("hyperparameters", "x"),
    ("metrics", "x"),
    ("metrics", {"accuracy": "0.9"}),
    ("metrics", {"accuracy": False}),
    ("dataset_info", 5),
    ("tags", "x"),
    ("tags", [1]),
    ("status", "gone"),
    ("status", None),
    ("description", 5),
])
async def test_put_field_of_the_wrong_type_is_400_naming_it(client, seeded, field, value):
    resp = await client.put(model_url(seeded["a2"]), json={field: value})
    await expect_error(resp, 400, field)
    mixed = await client.put(model_url(seeded["a2"]), json={"description": "changed", field: value}
                             if field != "description" else {"status": "archived", field: value})
    await expect_error(mixed, 400, field)
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("field, value", [
    ("metrics", "x"),
    ("metrics", {"accuracy": "high"}),
    ("tags", [1]),
    ("status", "bad"),
    ("hyperparameters", []),
    ("version", "2.0"),
    ("version", 2),
    ("breaking_changes", "true"),
])
async def test_new_version_field_of_the_wrong_type_is_400_naming_it(client, seeded, field, value):
    resp = await client.post(model_url(seeded["a1"], "/versions"), json={field: value})
    await expect_error(resp, 400, field)
    await assert_unchanged(client, seeded)


async def test_duplicate_explicit_version_is_409(client, seeded):
    for version in ("v1.0", "v1.1"):
        resp = await client.post(MODELS, json=_valid_registration(name="seed_a", version=version))
        await expect_error(resp, 409)
        resp = await client.post(model_url(seeded["b1"], "/versions"), json={"version": "v1.0"})
        await expect_error(resp, 409)
        resp = await client.post(model_url(seeded["a2"], "/versions"), json={"version": version})
        await expect_error(resp, 409)
    await assert_unchanged(client, seeded)


# Numbers with a leading zero would rank equal to another spelling (v01.0 and
# v1.0): two names for one version. Refused wherever a version is accepted.
LEADING_ZEROS = ["v01.0", "v1.01", "v00.0", "v0.00", "v01.01", "v001.1"]


@pytest.mark.parametrize("version", LEADING_ZEROS)
async def test_a_version_with_a_leading_zero_is_refused_everywhere(client, seeded, version):
    resp = await client.post(MODELS, json=_valid_registration(version=version))
    await expect_error(resp, 400, "version")
    body, ctype = multipart([Part("metadata", json.dumps(_valid_registration(version=version)).encode(),
                                  content_type="application/json"),
                             Part("file", b"weights", filename="m.bin")])
    resp = await client.post(MODELS, data=body, headers={"Content-Type": ctype})
    await expect_error(resp, 400, "version")
    resp = await client.post(model_url(seeded["a1"], "/versions"), json={"version": version})
    await expect_error(resp, 400, "version")
    for path in (f"{MODELS}/by-name/seed_a", f"{MODELS}/by-name/seed_a/download"):
        resp = await client.get(path, params={"version": version})
        assert (await expect_error(resp, 400, "version"))["code"] == "invalid_parameter"
        resp = await client.head(path, params={"version": version})
        assert resp.status == 400, path
    await assert_unchanged(client, seeded)
    # The same requests with the number spelt without zeros are not refused.
    plain = "v" + ".".join(str(int(n)) for n in version[1:].split("."))
    resp = await client.get(f"{MODELS}/by-name/seed_a", params={"version": plain})
    assert resp.status in (200, 404), await resp.text()
    resp = await client.post(MODELS, json=_valid_registration(version=plain))
    assert (await json_of(resp, 201))["version"] == plain


# ---------------------------------------------------------------------------
# Listing parameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("param, value", [
    ("page", "0"),
    ("page", "-1"),
    ("page", "abc"),
    ("page", "1.5"),
    ("page", "1e3"),
    ("page", '{"$gt": 0}'),
    ("limit", "0"),
    ("limit", "-5"),
    ("limit", "101"),
    ("limit", "1000000"),
    ("limit", "abc"),
    ("limit", "2.5"),
    ("sort", "foo"),
    ("sort", "updated_at"),
    ("sort", "_id"),
    ("sort", "status"),
    ("sort", "-"),
    ("sort", "--name"),
    ("sort", "metrics"),
    ("sort", "metrics."),
    ("sort", "metrics.$gt"),
    ("sort", "$natural"),
    ("sort", '{"name": 1}'),
    ("sort", "name;drop"),
])
async def test_bad_paging_or_sort_is_400_naming_the_parameter(client, seeded, param, value):
    for path in (MODELS, f"{MODELS}/search"):
        resp = await client.get(path, params={param: value})
        await expect_error(resp, 400, param)
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("params", [
    {"algorithm": '{"$ne": null}'},
    {"algorithm": '{"$ne":null}'},
    {"algorithm": '{"$regex": ".*"}'},
    {"created_by": '{"$gt": ""}'},
    {"created_by": "$ne"},
    {"tags": '{"$exists": true}'},
    {"tags": "$ne"},
    {"q": '{"$regex": ".*"}'},
    {"q": "$where"},
    {"algorithm": "random_forest' OR '1'='1"},
    {"q": "' OR 1=1 --"},
    {"tags": "t1') OR 1=1 --"},
])
async def test_operator_looking_values_are_literals_matching_nothing(client, seeded, params):
    for path in (MODELS, f"{MODELS}/search"):
        body = await listing(client, path, **params)
        assert body["models"] == [], params
        assert body["pagination"]["total"] == 0
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("params", [
    {"name[$ne]": "x"},
    {"algorithm[$ne]": "random_forest"},
    {"status[$ne]": "active"},
    {"tags[$in]": "other"},
    {"created_by[$exists]": "true"},
    {"q[$regex]": "seed_b"},
    {"$where": "this.name == 'seed_b'"},
])
async def test_bracket_parameters_do_not_inject(client, seeded, params):
    everything = {d["id"] for d in seeded["snapshot"]}
    resp = await client.get(MODELS, params=params)
    if resp.status == 200:
        # Ignored as unknown parameters: the unfiltered listing.
        body = await json_of(resp, 200)
        assert {m["id"] for m in body["models"]} == everything, params
        assert body["pagination"]["total"] == len(everything)
    else:
        await expect_error(resp, 400)
    await assert_unchanged(client, seeded)


async def test_q_is_a_literal_substring_not_a_regex(client):
    dotted = await register(client, "iris.v2", "svm")
    plain = await register(client, "irisXv2", "svm")
    paren = await register(client, "paren_model", "svm", description="uses (parenthesised) notes")
    star = await register(client, "star_model", "svm", description="matches a*b literally")
    ids = {"dotted": dotted["model_id"], "plain": plain["model_id"], "paren": paren["model_id"],
           "star": star["model_id"]}

    async def found(q: str) -> set[str]:
        body = await listing(client, q=q, limit=100)
        return {m["id"] for m in body["models"]}

    assert await found(".*") == set()
    assert await found(".") == {ids["dotted"]}
    assert await found("iris.v2") == {ids["dotted"]}
    assert await found("(") == {ids["paren"]}
    assert await found("(parenthesised)") == {ids["paren"]}
    assert await found("a*b") == {ids["star"]}
    assert await found("a*") == {ids["star"]}
    assert await found(")") == {ids["paren"]}
    for q in ("[", "\\", "a|b", "^", "$", "?", "+", "{", "^iris", "v2$", "iris|svm", "i.is", "[a-z]+"):
        assert await found(q) == set(), q
    # The same through the search alias.
    body = await listing(client, f"{MODELS}/search", q=".*")
    assert body["models"] == [] and body["pagination"]["total"] == 0


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/api/v1/nothing",
    "/api/v2/models",
    "/api/v1/model",
    "/api/v1/models/0123456789abcdef01234567/nothing-here",
    "/api/v1/models/0123456789abcdef01234567/versions/extra",
    "/api/v1/models/by-name/",
    "/api/v1/models/by-name/seed_a/extra",
])
async def test_unknown_route_is_404(client, seeded, path):
    await expect_error(await client.get(path), 404)
    await assert_unchanged(client, seeded)


@pytest.mark.parametrize("method, path", [
    ("PATCH", "/api/v1/models/{id}"),
    ("POST", "/api/v1/models/{id}"),
    ("DELETE", "/api/v1/models"),
    ("PUT", "/api/v1/models"),
    ("PATCH", "/api/v1/models"),
    ("DELETE", "/api/v1/models/{id}/versions"),
    ("PUT", "/api/v1/models/{id}/versions"),
    ("POST", "/api/v1/models/by-name/seed_a"),
    ("DELETE", "/api/v1/models/by-name/seed_a"),
    ("POST", "/api/v1/models/search"),
])
async def test_wrong_method_is_405(client, seeded, method, path):
    resp = await client.request(method, path.format(id=seeded["a1"]), json={"status": "archived"})
    await expect_error(resp, 405)
    assert resp.headers.get("Allow"), "a 405 says which methods are allowed"
    await assert_unchanged(client, seeded)
