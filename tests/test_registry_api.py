"""HTTP contract of the registry API (/api/v1/models): the successful paths.

Every test runs against the real app on both storage backends (the ``client``
fixture is parametrized over "embedded" and "mongodb"). Error answers are in
test_registry_errors.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from app.appkeys import STORAGE
from app.server import create_app
from tests.api_helpers import (
    FULL_FIELDS,
    MODELS,
    OBJECT_ID_RE,
    all_pages,
    expect_error,
    get_model,
    insert_model_doc,
    json_of,
    listed_ids,
    listing,
    model_url,
    parse_ts,
    register,
    total_models,
)

EXAMPLE = {
    "name": "customer_churn_rf_v1",
    "algorithm": "random_forest",
    "hyperparameters": {"n_estimators": 150, "max_depth": 12, "criterion": "gini", "bootstrap": True,
                        "class_weight": None, "layers": [64, 32]},
    "metrics": {"accuracy": 0.9234, "f1_score": 0.9038, "epochs": 30},
    "dataset_info": {"name": "customer_data_2024", "features": ["age", "tenure"], "rows": 120000},
    "tags": ["churn-prediction", "production"],
}


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _tick() -> None:
    """Let the clock move past the millisecond timestamps the service keeps."""
    await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


async def test_register_answers_201_and_stores_the_full_document(client):
    before = _now() - timedelta(seconds=2)
    resp = await client.post(MODELS, json=EXAMPLE)
    answer = await json_of(resp, 201)
    after = _now() + timedelta(seconds=2)

    assert answer["success"] is True
    assert answer["message"] == "Model registered successfully"
    assert answer["version"] == "v1.0"
    model_id = answer["model_id"]
    assert isinstance(model_id, str) and OBJECT_ID_RE.match(model_id), model_id
    assert answer["download_url"] == f"/api/v1/models/{model_id}/download"

    doc = await get_model(client, model_id)
    for field in FULL_FIELDS:
        assert field in doc, f"GET /models/{{id}} lacks {field!r}: {sorted(doc)}"
    assert doc["id"] == model_id
    assert doc["name"] == EXAMPLE["name"]
    assert doc["algorithm"] == EXAMPLE["algorithm"]
    assert doc["hyperparameters"] == EXAMPLE["hyperparameters"]
    assert doc["metrics"] == EXAMPLE["metrics"]
    assert doc["dataset_info"] == EXAMPLE["dataset_info"]
    assert doc["tags"] == EXAMPLE["tags"]
    assert doc["version"] == "v1.0"
    assert doc["parent_model_id"] is None
    assert doc["status"] == "active"
    assert doc["download_count"] == 0
    created, updated = parse_ts(doc["created_at"]), parse_ts(doc["updated_at"])
    assert before <= created <= after
    assert created == updated


async def test_register_honours_every_optional_field(client):
    answer = await register(
        client, "fraud.detector-v2_B", "xgboost",
        status="deprecated", description="Flags suspicious payments (EU only)", created_by="alice@example.com",
        format="onnx", hyperparameters={"eta": 0.1}, metrics={"auc": 0.97, "n_trees": 400},
        dataset_info={"name": "payments", "nested": {"window_days": 90}}, tags=["fraud"],
    )
    doc = await get_model(client, answer["model_id"])
    assert doc["name"] == "fraud.detector-v2_B"
    assert doc["algorithm"] == "xgboost"
    assert doc["status"] == "deprecated"
    assert doc["description"] == "Flags suspicious payments (EU only)"
    assert doc["created_by"] == "alice@example.com"
    assert doc["format"] == "onnx"
    assert doc["metrics"] == {"auc": 0.97, "n_trees": 400}
    assert doc["dataset_info"] == {"name": "payments", "nested": {"window_days": 90}}


async def test_register_with_only_required_fields_uses_defaults(client):
    answer = await register(client, "minimal", "svm")
    doc = await get_model(client, answer["model_id"])
    assert doc["status"] == "active"
    assert doc["version"] == "v1.0"
    assert doc["tags"] in ([], None)
    assert doc["hyperparameters"] in ({}, None)
    assert doc["metrics"] in ({}, None)
    assert doc["dataset_info"] in ({}, None)
    assert doc["download_count"] == 0


@pytest.mark.parametrize("name", ["a", "x" * 100, "Az09_.-", "model.v1.final", "-leading-dash", "UPPER_lower"])
async def test_register_accepts_every_name_the_rule_allows(client, name):
    answer = await register(client, name)
    doc = await get_model(client, answer["model_id"])
    assert doc["name"] == name  # stored exactly, nothing stripped or changed


async def test_registering_an_existing_name_bumps_the_minor_version_and_links_the_parent(client):
    first = await register(client, "churn")
    second = await register(client, "churn", metrics={"accuracy": 0.93})
    third = await register(client, "churn")
    assert [first["version"], second["version"], third["version"]] == ["v1.0", "v1.1", "v1.2"]
    assert len({first["model_id"], second["model_id"], third["model_id"]}) == 3
    assert (await get_model(client, first["model_id"]))["parent_model_id"] is None
    assert (await get_model(client, second["model_id"]))["parent_model_id"] == first["model_id"]
    assert (await get_model(client, third["model_id"]))["parent_model_id"] == second["model_id"]
    # Another name starts its own numbering.
    other = await register(client, "churn2")
    assert other["version"] == "v1.0"
    assert (await get_model(client, other["model_id"]))["parent_model_id"] is None


async def test_breaking_changes_bump_the_major_version(client):
    v10 = await register(client, "ranker")
    v11 = await register(client, "ranker", breaking_changes=False)
    v20 = await register(client, "ranker", breaking_changes=True)
    v21 = await register(client, "ranker")
    assert [v10["version"], v11["version"], v20["version"], v21["version"]] == ["v1.0", "v1.1", "v2.0", "v2.1"]
    assert (await get_model(client, v20["model_id"]))["parent_model_id"] == v11["model_id"]
    assert (await get_model(client, v21["model_id"]))["parent_model_id"] == v20["model_id"]


async def test_first_registration_is_v1_0_even_with_breaking_changes(client):
    answer = await register(client, "brand_new", breaking_changes=True)
    assert answer["version"] == "v1.0"


async def test_explicit_version_is_honoured_and_a_duplicate_is_409(client):
    first = await register(client, "explicit", version="v3.5")
    assert first["version"] == "v3.5"
    assert (await get_model(client, first["model_id"]))["version"] == "v3.5"
    nxt = await register(client, "explicit")
    assert nxt["version"] == "v3.6"
    assert (await get_model(client, nxt["model_id"]))["parent_model_id"] == first["model_id"]

    count = await total_models(client)
    resp = await client.post(MODELS, json={"name": "explicit", "algorithm": "svm", "version": "v3.5"})
    await expect_error(resp, 409)
    assert await total_models(client) == count
    # The existing v3.5 is untouched.
    assert (await get_model(client, first["model_id"]))["algorithm"] == "random_forest"


async def test_versions_compare_numerically(client):
    v19 = await register(client, "numeric", version="v1.9")
    v110 = await register(client, "numeric", version="v1.10")
    assert (v19["version"], v110["version"]) == ("v1.9", "v1.10")
    auto = await register(client, "numeric")
    assert auto["version"] == "v1.11", "the version after v1.10 is v1.11 (v1.10 > v1.9)"
    assert (await get_model(client, auto["model_id"]))["parent_model_id"] == v110["model_id"]
    v12 = await register(client, "numeric", version="v1.2")

    body = await json_of(await client.get(model_url(v12["model_id"], "/versions")), 200)
    assert body["name"] == "numeric"
    assert [v["version"] for v in body["versions"]] == ["v1.11", "v1.10", "v1.9", "v1.2"]

    latest = await json_of(await client.get(f"{MODELS}/by-name/numeric"), 200)
    assert latest["version"] == "v1.11" and latest["id"] == auto["model_id"]

    # Majors too: v10.0 is after v9.5 and v2.0.
    for v in ("v2.0", "v10.0", "v9.5"):
        await register(client, "majors", version=v)
    assert (await register(client, "majors"))["version"] == "v10.1"
    assert (await register(client, "majors", breaking_changes=True))["version"] == "v11.0"


async def test_concurrent_registrations_of_one_name_get_distinct_versions(client):
    async def one(i: int):
        resp = await client.post(MODELS, json={"name": "racy", "algorithm": "svm", "metrics": {"run": i}})
        return resp.status, await resp.json()

    results = await asyncio.gather(*(one(i) for i in range(10)))
    statuses = [s for s, _ in results]
    assert statuses == [201] * 10, [b for s, b in results if s != 201]
    versions = sorted((b["version"] for _, b in results), key=lambda v: int(v.split(".")[1]))
    assert versions == [f"v1.{i}" for i in range(10)]
    assert len({b["model_id"] for _, b in results}) == 10

    listed = await json_of(await client.get(f"{MODELS}/by-name/racy"), 200)
    assert listed["version"] == "v1.9"
    body = await json_of(await client.get(model_url(results[0][1]["model_id"], "/versions")), 200)
    chain = {v["version"]: v["id"] for v in body["versions"]}
    assert len(body["versions"]) == 10 and set(chain) == set(versions)
    # Each version's parent is the one before it.
    for i in range(1, 10):
        doc = await get_model(client, chain[f"v1.{i}"])
        assert doc["parent_model_id"] == chain[f"v1.{i - 1}"], f"v1.{i}"


# ---------------------------------------------------------------------------
# Read, update, delete
# ---------------------------------------------------------------------------


async def test_get_returns_iso_utc_timestamps_and_object_ids(client):
    parent = await register(client, "stamps")
    child = await register(client, "stamps")
    doc = await get_model(client, child["model_id"])
    assert OBJECT_ID_RE.match(doc["id"])
    assert OBJECT_ID_RE.match(doc["parent_model_id"]) and doc["parent_model_id"] == parent["model_id"]
    parse_ts(doc["created_at"])
    parse_ts(doc["updated_at"])
    for summary in (await listing(client))["models"]:
        assert OBJECT_ID_RE.match(summary["id"])
        if "created_at" in summary:
            parse_ts(summary["created_at"])


async def test_put_updates_the_mutable_fields(client):
    answer = await register(client, EXAMPLE["name"], status="active", description="old text", created_by="alice",
                            **{k: v for k, v in EXAMPLE.items() if k not in ("name", "algorithm")})
    model_id = answer["model_id"]
    before = await get_model(client, model_id)
    await _tick()

    changes = {
        "hyperparameters": {"n_estimators": 300},
        "metrics": {"accuracy": 0.95, "f1_score": 0.94},
        "dataset_info": {"name": "customer_data_2025", "features": ["age"]},
        "tags": ["churn-prediction", "retrained"],
        "status": "deprecated",
        "description": "retrained on 2025 data",
    }
    resp = await client.put(model_url(model_id), json=changes)
    await json_of(resp, 200)

    after = await get_model(client, model_id)
    for field, value in changes.items():
        assert after[field] == value, field
    for field in ("id", "name", "version", "algorithm", "created_by", "created_at", "download_count",
                  "parent_model_id"):
        assert after[field] == before[field], field
    assert parse_ts(after["updated_at"]) > parse_ts(before["updated_at"])
    assert after["created_at"] == before["created_at"]

    # Listings see the new values, not the old ones.
    assert await listed_ids(client, tags="retrained") == [model_id]
    assert await listed_ids(client, tags="production") == []
    assert await listed_ids(client, status="deprecated") == [model_id]
    assert await listed_ids(client, status="active") == []
    assert await listed_ids(client, q="2025 DATA") == [model_id]
    assert await listed_ids(client, min_accuracy="0.945") == [model_id]


async def test_put_of_one_field_leaves_the_others_alone(client):
    answer = await register(client, "partial", **{k: v for k, v in EXAMPLE.items() if k not in ("name",)})
    before = await get_model(client, answer["model_id"])
    await _tick()
    await json_of(await client.put(model_url(answer["model_id"]), json={"status": "archived"}), 200)
    after = await get_model(client, answer["model_id"])
    assert after["status"] == "archived"
    for field in FULL_FIELDS:
        if field not in ("status", "updated_at"):
            assert after[field] == before[field], field
    assert parse_ts(after["updated_at"]) > parse_ts(before["updated_at"])


async def test_delete_removes_the_model(client):
    keep = await register(client, "doomed")
    gone = await register(client, "doomed")
    assert await total_models(client) == 2

    resp = await client.delete(model_url(gone["model_id"]))
    body = await json_of(resp, 200)
    assert body == {"success": True, "message": "Model deleted successfully", "deleted_id": gone["model_id"]}

    await expect_error(await client.get(model_url(gone["model_id"])), 404)
    await expect_error(await client.delete(model_url(gone["model_id"])), 404)
    assert await total_models(client) == 1
    assert await listed_ids(client) == [keep["model_id"]]
    versions = await json_of(await client.get(model_url(keep["model_id"], "/versions")), 200)
    assert [v["id"] for v in versions["versions"]] == [keep["model_id"]]
    # The name's latest is what remains.
    latest = await json_of(await client.get(f"{MODELS}/by-name/doomed"), 200)
    assert latest["id"] == keep["model_id"]


# ---------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------


async def test_create_version_merges_source_metadata_with_the_updates(client):
    source = await register(
        client, "merge_me", "gradient_boosting",
        hyperparameters={"n_estimators": 150, "max_depth": 6}, metrics={"accuracy": 0.88},
        dataset_info={"name": "ds2024", "features": ["a", "b"]}, tags=["baseline"], description="first cut",
        created_by="alice", status="active",
    )
    # A later version of the same name with different metadata: numbering
    # follows it, the content follows the source.
    later = await register(client, "merge_me", "gradient_boosting", hyperparameters={"n_estimators": 999},
                           tags=["other"], created_by="bob")
    await _tick()

    resp = await client.post(model_url(source["model_id"], "/versions"),
                             json={"metrics": {"accuracy": 0.91, "auc": 0.95}, "tags": ["retrained"],
                                   "description": "second cut"})
    answer = await json_of(resp, 201)
    assert answer["success"] is True
    assert answer["message"] == "Model registered successfully"
    assert answer["version"] == "v1.2"
    new_id = answer["model_id"]
    assert OBJECT_ID_RE.match(new_id) and new_id not in (source["model_id"], later["model_id"])
    assert answer["download_url"] == f"/api/v1/models/{new_id}/download"

    src_doc = await get_model(client, source["model_id"])
    doc = await get_model(client, new_id)
    assert doc["name"] == "merge_me"
    assert doc["version"] == "v1.2"
    assert doc["parent_model_id"] == source["model_id"]
    # From the source:
    assert doc["algorithm"] == "gradient_boosting"
    assert doc["hyperparameters"] == {"n_estimators": 150, "max_depth": 6}
    assert doc["dataset_info"] == {"name": "ds2024", "features": ["a", "b"]}
    assert doc["created_by"] == "alice"
    assert doc["status"] == "active"
    # From the body:
    assert doc["metrics"] == {"accuracy": 0.91, "auc": 0.95}
    assert doc["tags"] == ["retrained"]
    assert doc["description"] == "second cut"
    # A new document of its own.
    assert doc["download_count"] == 0
    assert parse_ts(doc["created_at"]) > parse_ts(src_doc["created_at"])
    assert doc["created_at"] == doc["updated_at"]
    # The source is unchanged.
    assert src_doc["metrics"] == {"accuracy": 0.88} and src_doc["tags"] == ["baseline"]


async def test_create_version_with_no_updates_copies_the_source(client):
    source = await register(client, "copy_me", "knn", hyperparameters={"k": 5}, metrics={"accuracy": 0.7},
                            tags=["x"])
    answer = await json_of(await client.post(model_url(source["model_id"], "/versions"), json={}), 201)
    assert answer["version"] == "v1.1"
    src, doc = await get_model(client, source["model_id"]), await get_model(client, answer["model_id"])
    for field in ("name", "algorithm", "hyperparameters", "metrics", "dataset_info", "tags", "status"):
        assert doc[field] == src[field], field
    assert doc["parent_model_id"] == source["model_id"]


async def test_create_version_breaking_and_explicit_versions(client):
    v10 = await register(client, "lineage")
    major = await json_of(await client.post(model_url(v10["model_id"], "/versions"),
                                            json={"breaking_changes": True}), 201)
    assert major["version"] == "v2.0"
    minor = await json_of(await client.post(model_url(major["model_id"], "/versions"), json={}), 201)
    assert minor["version"] == "v2.1"
    # From an old version, still numbered after the name's latest.
    again = await json_of(await client.post(model_url(v10["model_id"], "/versions"), json={}), 201)
    assert again["version"] == "v2.2"
    assert (await get_model(client, again["model_id"]))["parent_model_id"] == v10["model_id"]

    explicit = await json_of(await client.post(model_url(minor["model_id"], "/versions"),
                                               json={"version": "v5.7"}), 201)
    assert explicit["version"] == "v5.7"
    assert (await get_model(client, explicit["model_id"]))["parent_model_id"] == minor["model_id"]

    count = await total_models(client)
    dup = await client.post(model_url(v10["model_id"], "/versions"), json={"version": "v2.1"})
    await expect_error(dup, 409)
    assert await total_models(client) == count


async def test_latest_listing_shows_each_name_once_at_its_highest_version(client):
    first = await register(client, "rowed", metrics={"accuracy": 0.8})
    await _tick()
    second = await register(client, "rowed", metrics={"accuracy": 0.9})
    await _tick()
    lower = await register(client, "rowed", version="v0.5")  # explicit, below the latest
    await _tick()
    other = await register(client, "single")
    assert await listed_ids(client, latest="true", sort="name") == [second["model_id"], other["model_id"]]
    assert await listed_ids(client, latest="false", sort="name") == await listed_ids(client, sort="name")
    assert len(await listed_ids(client, sort="name")) == 4
    # Filters apply to the latest versions: the older 0.8 model does not stand in for its name.
    assert await listed_ids(client, latest="true", min_accuracy="0.85") == [second["model_id"]]
    assert await listed_ids(client, latest="true", min_accuracy="0.1", q="rowed") == [second["model_id"]]

    # Deleting the latest makes the next highest version the name's row.
    await json_of(await client.delete(model_url(second["model_id"])), 200)
    assert await listed_ids(client, latest="true", q="rowed") == [first["model_id"]]
    await json_of(await client.delete(model_url(first["model_id"])), 200)
    assert await listed_ids(client, latest="true", q="rowed") == [lower["model_id"]]
    # A new version from an older one is the latest as soon as it exists.
    newer = await json_of(await client.post(model_url(lower["model_id"], "/versions"), json={}), 201)
    assert await listed_ids(client, latest="true", q="rowed") == [newer["model_id"]]
    # The bookkeeping is not part of the document.
    assert "superseded" not in await get_model(client, lower["model_id"])


async def test_latest_listing_after_concurrent_registrations_has_one_row(client):
    results = await asyncio.gather(*(client.post(MODELS, json={"name": "racy2", "algorithm": "svm"})
                                     for _ in range(8)))
    assert [r.status for r in results] == [201] * 8
    latest = await json_of(await client.get(f"{MODELS}/by-name/racy2"), 200)
    assert await listed_ids(client, latest="true", q="racy2") == [latest["id"]]


async def test_gc_marks_the_latest_versions_of_a_store_written_before_the_mark(client):
    from app import registry

    storage = client.server.app[STORAGE]
    # Inserted below the registry, as a store from before the mark holds them.
    old = [await insert_model_doc(storage, "legacy", v) for v in ("v1.0", "v1.2", "v1.1")]
    assert sorted(await listed_ids(client, latest="true", q="legacy")) == sorted(old)
    assert await registry.settle_all_latest(storage, page=2) == 1
    assert await listed_ids(client, latest="true", q="legacy") == [old[1]]
    assert await registry.settle_all_latest(storage, page=2) == 0  # nothing left to change


async def test_latest_must_be_true_or_false(client):
    err = await expect_error(await client.get(MODELS, params={"latest": "yes"}), 400, "latest must be true or false")
    assert err["code"] == "invalid_parameter"


async def test_list_versions_newest_first_for_the_whole_name(client):
    ids = {}
    for v in ("v1.0", "v1.1", "v2.0", "v1.9", "v1.10"):
        ids[v] = (await register(client, "family", version=v))["model_id"]
    await register(client, "family_other")
    await register(client, "famil")

    for any_id in (ids["v1.0"], ids["v1.10"]):
        body = await json_of(await client.get(model_url(any_id, "/versions")), 200)
        assert body["name"] == "family"
        assert [v["version"] for v in body["versions"]] == ["v2.0", "v1.10", "v1.9", "v1.1", "v1.0"]
        assert [v["id"] for v in body["versions"]] == [ids[v] for v in ("v2.0", "v1.10", "v1.9", "v1.1", "v1.0")]
        assert all(v["name"] == "family" for v in body["versions"])


async def test_by_name_returns_the_latest_or_the_requested_version(client):
    v10 = await register(client, "byname", metrics={"accuracy": 0.8})
    v11 = await register(client, "byname", metrics={"accuracy": 0.85})
    v20 = await register(client, "byname", breaking_changes=True, metrics={"accuracy": 0.9})
    v21 = await register(client, "byname", metrics={"accuracy": 0.91})

    latest = await json_of(await client.get(f"{MODELS}/by-name/byname"), 200)
    assert latest["id"] == v21["model_id"] and latest["version"] == "v2.1"
    for field in FULL_FIELDS:
        assert field in latest, field
    assert latest["metrics"] == {"accuracy": 0.91}

    for answer, version in ((v10, "v1.0"), (v11, "v1.1"), (v20, "v2.0"), (v21, "v2.1")):
        resp = await client.get(f"{MODELS}/by-name/byname", params={"version": version})
        doc = await json_of(resp, 200)
        assert (doc["id"], doc["version"]) == (answer["model_id"], version)

    await expect_error(await client.get(f"{MODELS}/by-name/byname", params={"version": "v2.2"}), 404)
    await expect_error(await client.get(f"{MODELS}/by-name/nobody"), 404)
    await expect_error(await client.get(f"{MODELS}/by-name/nobody", params={"version": "v1.0"}), 404)
    # Exact names only: neither a prefix nor another case.
    await expect_error(await client.get(f"{MODELS}/by-name/bynam"), 404)
    await expect_error(await client.get(f"{MODELS}/by-name/BYNAME"), 404)


# ---------------------------------------------------------------------------
# Listing: filters and search
# ---------------------------------------------------------------------------

CATALOG = {
    "churn_rf": dict(algorithm="random_forest", tags=["churn-prediction", "production"], created_by="alice",
                     metrics={"accuracy": 0.92, "f1_score": 0.90}, description="Customer churn model"),
    "churn_xgb": dict(algorithm="xgboost", tags=["churn-prediction", "staging"], created_by="bob",
                      metrics={"accuracy": 0.99, "test_accuracy": 0.5}, description="Gradient boosted trees"),
    "fraud_detector": dict(algorithm="xgboost", status="deprecated", tags=["fraud", "production"],
                           created_by="alice", metrics={"accuracy": 0.5, "test_accuracy": 0.97},
                           description="Flags suspicious payments"),
    "sales_forecast": dict(algorithm="linear_regression", tags=["forecasting"], created_by="carol",
                           metrics={"r2": 0.81}, description="Quarterly revenue"),
    "image_cnn": dict(algorithm="cnn", status="archived", tags=["vision", "Production-Candidate"], created_by="bob",
                      metrics={"accuracy": 0.9}, description="Detects DEFECTS in photos"),
    "spam_nb": dict(algorithm="naive_bayes", tags=[], created_by="carol", metrics={"accuracy": 0.85},
                    hyperparameters={"note": "churn"}, dataset_info={"name": "churn_emails"}),
    "Recommender": dict(algorithm="matrix_factorization", tags=["recsys"], created_by="alice",
                        metrics={"accuracy": 0.91, "test_accuracy": 0.93}),
    "ranker_tf": dict(algorithm="lambdamart", created_by="dave", metrics={"test_accuracy": 0.96}),
}


@pytest.fixture
async def catalog(client) -> dict[str, str]:
    ids = {}
    for name, fields in CATALOG.items():
        ids[name] = (await register(client, name, **fields))["model_id"]
    return ids


async def _names(client, path=MODELS, **params) -> set[str]:
    body = await listing(client, path, limit=100, **params)
    names = [m["name"] for m in body["models"]]
    assert len(names) == body["pagination"]["total"]
    return set(names)


async def test_listing_without_filters_returns_everything(client, catalog):
    body = await listing(client, limit=100)
    assert {m["id"] for m in body["models"]} == set(catalog.values())
    assert body["pagination"] == {"page": 1, "limit": 100, "total": len(CATALOG), "pages": 1}
    for m in body["models"]:
        assert m["id"] == catalog[m["name"]]
        assert m["version"] == "v1.0"


@pytest.mark.parametrize("params, expected", [
    ({"algorithm": "xgboost"}, {"churn_xgb", "fraud_detector"}),
    ({"algorithm": "cnn"}, {"image_cnn"}),
    ({"algorithm": "xgb"}, set()),  # an exact value, not a substring
    ({"status": "active"}, {"churn_rf", "churn_xgb", "sales_forecast", "spam_nb", "Recommender", "ranker_tf"}),
    ({"status": "deprecated"}, {"fraud_detector"}),
    ({"status": "archived"}, {"image_cnn"}),
    ({"created_by": "alice"}, {"churn_rf", "fraud_detector", "Recommender"}),
    ({"created_by": "nobody"}, set()),
    ({"tags": "production"}, {"churn_rf", "fraud_detector"}),
    ({"tags": "fraud,vision"}, {"fraud_detector", "image_cnn"}),
    ({"tags": "production,forecasting,nonexistent"}, {"churn_rf", "fraud_detector", "sales_forecast"}),
    ({"tags": "prod"}, set()),  # whole tags, not substrings
    ({"tags": "nonexistent"}, set()),
])
async def test_each_filter_on_its_own(client, catalog, params, expected):
    assert await _names(client, **params) == expected


@pytest.mark.parametrize("q, expected", [
    ("churn", {"churn_rf", "churn_xgb"}),          # name/description/tags; not hyperparameters or dataset_info
    ("CHURN_R", {"churn_rf"}),                      # name, case-insensitive
    ("recommender", {"Recommender"}),               # name, case-insensitive the other way
    ("FOREST", {"churn_rf"}),                       # algorithm
    ("regression", {"sales_forecast"}),             # algorithm
    ("REVENUE", {"sales_forecast"}),                # description only
    ("defects", {"image_cnn"}),                     # description, case-insensitive
    ("boost", {"churn_xgb", "fraud_detector"}),     # algorithm and description
    ("vision", {"image_cnn"}),                      # tag only
    ("production", {"churn_rf", "fraud_detector", "image_cnn"}),  # tag substring, any case
    ("staging", {"churn_xgb"}),
    ("alice", set()),                               # created_by is not searched
    ("emails", set()),                              # dataset_info is not searched
    ("zzz", set()),
])
async def test_q_searches_name_description_algorithm_and_tags(client, catalog, q, expected):
    assert await _names(client, q=q) == expected


async def test_min_accuracy_prefers_test_accuracy(client, catalog):
    # churn_xgb: test_accuracy 0.5, accuracy 0.99 -> never matches 0.9.
    # fraud_detector: test_accuracy 0.97, accuracy 0.5 -> matches.
    # image_cnn: accuracy exactly 0.9 -> the minimum is inclusive.
    # ranker_tf: only test_accuracy 0.96.  sales_forecast: no accuracy at all -> never matches.
    assert await _names(client, min_accuracy="0.9") == {"churn_rf", "fraud_detector", "image_cnn", "Recommender",
                                                        "ranker_tf"}
    assert await _names(client, min_accuracy="0.95") == {"fraud_detector", "ranker_tf"}
    assert await _names(client, min_accuracy="0.965") == {"fraud_detector"}
    assert await _names(client, min_accuracy="0.6") == {"churn_rf", "fraud_detector", "image_cnn", "spam_nb",
                                                        "Recommender", "ranker_tf"}
    assert await _names(client, min_accuracy="0.4") == {"churn_rf", "churn_xgb", "fraud_detector", "image_cnn",
                                                        "spam_nb", "Recommender", "ranker_tf"}
    assert await _names(client, min_accuracy="0.98") == set()
    assert await _names(client, min_accuracy="0") == set(CATALOG) - {"sales_forecast"}


@pytest.mark.parametrize("params, expected", [
    ({"algorithm": "xgboost", "status": "active"}, {"churn_xgb"}),
    ({"created_by": "alice", "tags": "production"}, {"churn_rf", "fraud_detector"}),
    ({"created_by": "alice", "min_accuracy": "0.95"}, {"fraud_detector"}),
    ({"q": "churn", "min_accuracy": "0.9"}, {"churn_rf"}),
    ({"status": "active", "tags": "churn-prediction,recsys", "created_by": "bob"}, {"churn_xgb"}),
    ({"algorithm": "xgboost", "min_accuracy": "0.9"}, {"fraud_detector"}),
    ({"q": "production", "status": "archived"}, {"image_cnn"}),
    ({"algorithm": "random_forest", "status": "active", "tags": "production", "q": "CHURN", "min_accuracy": "0.9",
      "created_by": "alice"}, {"churn_rf"}),
    ({"algorithm": "random_forest", "status": "active", "tags": "production", "q": "CHURN", "min_accuracy": "0.9",
      "created_by": "bob"}, set()),
    ({"algorithm": "xgboost", "status": "archived"}, set()),
])
async def test_filters_combine_with_and(client, catalog, params, expected):
    assert await _names(client, **params) == expected


@pytest.mark.parametrize("params", [
    {},
    {"q": "churn"},
    {"algorithm": "xgboost", "min_accuracy": "0.9"},
    {"tags": "production,vision", "sort": "name"},
    {"status": "active", "sort": "-metrics.accuracy", "limit": "2", "page": "2"},
])
async def test_search_is_an_alias_of_the_listing(client, catalog, params):
    plain = await listing(client, MODELS, **params)
    alias = await listing(client, f"{MODELS}/search", **params)
    assert alias == plain
    assert alias["pagination"]["total"] == len(await _names(client, **{k: v for k, v in params.items()
                                                                       if k not in ("limit", "page", "sort")}))


# ---------------------------------------------------------------------------
# Listing: order and pages
# ---------------------------------------------------------------------------


async def test_created_at_orders_newest_first_by_default(client):
    ids = []
    for i in range(5):
        ids.append((await register(client, f"timed_{i}"))["model_id"])
        await _tick()
    assert await listed_ids(client) == ids[::-1]
    assert await listed_ids(client, sort="-created_at") == ids[::-1]
    assert await listed_ids(client, sort="created_at") == ids


async def test_sort_by_metric_is_numeric(client):
    values = {"m_a": 9, "m_b": 10, "m_c": 2.5, "m_d": 0.75, "m_e": 100}
    for name, loss in values.items():
        await register(client, name, metrics={"loss": loss})
    up = [m["name"] for m in (await listing(client, sort="metrics.loss"))["models"]]
    assert up == ["m_d", "m_c", "m_a", "m_b", "m_e"]
    down = [m["name"] for m in (await listing(client, sort="-metrics.loss"))["models"]]
    assert down == ["m_e", "m_b", "m_a", "m_c", "m_d"]


async def test_sort_by_downloads(client):
    storage = client.app[STORAGE]
    counts = {"dl_a": 5, "dl_b": 0, "dl_c": 120, "dl_d": 3, "dl_e": 17}
    ids = {name: await insert_model_doc(storage, name, download_count=n) for name, n in counts.items()}
    body = await listing(client, sort="-download_count")
    assert [m["id"] for m in body["models"]] == [ids[n] for n in ("dl_c", "dl_e", "dl_a", "dl_d", "dl_b")]
    for m in body["models"]:
        if "download_count" in m:
            assert m["download_count"] == counts[m["name"]]


@pytest.fixture
async def ties(client) -> dict[str, dict]:
    """Eleven models with many equal sort keys: the same names, metrics and download counts."""
    accuracies = [0.9, 0.9, 0.8, 0.9, 0.7, 0.8, None, 1, 0.9, 0.8, None]
    names = ["alpha", "alpha", "alpha", "bravo", "bravo", "bravo", "charlie", "charlie", "delta", "echo", "foxtrot"]
    docs = {}
    for name, acc in zip(names, accuracies):
        metrics = {"f1_score": 0.5} if acc is None else {"accuracy": acc}
        answer = await register(client, name, metrics=metrics)
        docs[answer["model_id"]] = await get_model(client, answer["model_id"])
    return docs


def _assert_ordered(keys: list, desc: bool, what: str) -> None:
    present = [k for k in keys if k is not None]
    assert present == sorted(present, reverse=desc), f"{what}: {keys}"
    # Models without the key sit together at one end.
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        n = len(keys)
        assert missing == list(range(len(missing))) or missing == list(range(n - len(missing), n)), \
            f"{what}: models without the key are not together at one end: {keys}"


@pytest.mark.parametrize("limit", [3, 4])
async def test_every_sort_pages_partition_the_result(client, ties, limit):
    sorts = {
        "created_at": lambda d: parse_ts(d["created_at"]),
        "-created_at": lambda d: parse_ts(d["created_at"]),
        "name": lambda d: d["name"],
        "-download_count": lambda d: d["download_count"],
        "metrics.accuracy": lambda d: d["metrics"].get("accuracy"),
        "-metrics.accuracy": lambda d: d["metrics"].get("accuracy"),
    }
    for sort, key in sorts.items():
        models = await all_pages(client, limit, sort=sort)
        ids = [m["id"] for m in models]
        assert len(ids) == len(set(ids)), f"sort={sort}: a model shows on two pages"
        assert set(ids) == set(ties), f"sort={sort}: pages miss models"
        _assert_ordered([key(ties[i]) for i in ids], sort.startswith("-"), f"sort={sort}")
        # Asking again gives the same order (the tie-break is deterministic).
        assert [m["id"] for m in await all_pages(client, limit, sort=sort)] == ids, f"sort={sort}"


async def test_pagination_math(client):
    storage = client.app[STORAGE]
    for i in range(23):
        await insert_model_doc(storage, f"page_{i:02d}")

    default = await listing(client)
    assert default["pagination"] == {"page": 1, "limit": 10, "total": 23, "pages": 3}
    assert len(default["models"]) == 10

    for limit, pages in ((10, 3), (7, 4), (1, 23), (22, 2), (23, 1), (24, 1), (100, 1)):
        body = await listing(client, limit=limit)
        assert body["pagination"] == {"page": 1, "limit": limit, "total": 23, "pages": pages}
        assert len(body["models"]) == min(limit, 23)

    last = await listing(client, limit=7, page=4)
    assert last["pagination"] == {"page": 4, "limit": 7, "total": 23, "pages": 4}
    assert len(last["models"]) == 2

    beyond = await listing(client, limit=10, page=4)
    assert beyond["models"] == []
    assert beyond["pagination"] == {"page": 4, "limit": 10, "total": 23, "pages": 3}

    ids = [m["id"] for m in await all_pages(client, 5, sort="name")]
    assert len(ids) == len(set(ids)) == 23

    # Filters count only what matches.
    filtered = await listing(client, q="page_1", limit=4)
    assert filtered["pagination"] == {"page": 1, "limit": 4, "total": 10, "pages": 3}


async def test_empty_registry_has_no_pages(client):
    body = await listing(client)
    assert body["models"] == []
    assert body["pagination"] == {"page": 1, "limit": 10, "total": 0, "pages": 0}


@pytest.fixture
async def small_pages_client(aiohttp_client, settings):
    """The app configured with MAX_PAGE_SIZE=5."""
    return await aiohttp_client(create_app(dataclasses.replace(settings, max_page_size=5)))


async def test_limit_bound_follows_max_page_size(small_pages_client):
    client = small_pages_client
    for i in range(7):
        await register(client, f"small_{i}")
    body = await listing(client, limit=5)
    assert body["pagination"] == {"page": 1, "limit": 5, "total": 7, "pages": 2}
    assert len(body["models"]) == 5
    resp = await client.get(MODELS, params={"limit": "6"})
    await expect_error(resp, 400, "limit")


async def test_default_limit_never_exceeds_max_page_size(small_pages_client):
    # limit is 1..MAX_PAGE_SIZE; the default of 10 cannot break that bound when MAX_PAGE_SIZE is smaller.
    client = small_pages_client
    for i in range(7):
        await register(client, f"small_{i}")
    default = await listing(client)
    assert default["pagination"]["total"] == 7
    assert default["pagination"]["limit"] <= 5
    assert len(default["models"]) <= 5


async def test_limit_accepts_the_whole_default_range(client):
    await register(client, "one")
    for limit in (1, 50, 100):
        body = await listing(client, limit=limit)
        assert body["pagination"] == {"page": 1, "limit": limit, "total": 1, "pages": 1}
