"""The model's shape is declared once (app/schemas.py): what validation accepts
is what the published JSON Schema accepts, and no module reaches into another's
private names to stay in step."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from app import openapi, validation
from app.config import Settings
from app.errors import ApiError

APP = Path(validation.__file__).parent


def _app_modules() -> set[str]:
    return {p.stem for p in APP.rglob("*.py")} | {p.name for p in APP.iterdir() if p.is_dir()}


def test_no_module_reads_another_modules_private_names():
    modules = _app_modules()
    offences = []
    for path in APP.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                imported |= {a.asname or a.name for a in node.names if a.name in modules}
                offences += [f"{path.relative_to(APP)}: from ... import {a.name}"
                             for a in node.names if a.name.startswith("_")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported):
                offences.append(f"{path.relative_to(APP)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, offences


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator of the served document's ``components.schemas.<name>``."""
    registry = Registry().with_resource("urn:doc", DRAFT202012.create_resource(openapi.build(Settings())))
    return jsonschema.Draft202012Validator({"$ref": f"urn:doc#/components/schemas/{name}"}, registry=registry)


_OK = {"name": "m", "algorithm": "rf"}
BODIES = [
    _OK, {}, {"name": "m"}, {**_OK, "name": 1}, {**_OK, "name": "bad name"}, {**_OK, "name": "x" * 101},
    {**_OK, "algorithm": ""}, {**_OK, "algorithm": " \t"}, {**_OK, "algorithm": "x" * 201}, {**_OK, "algorithm": 5},
    {**_OK, "description": "d" * 10_000}, {**_OK, "description": "d" * 10_001}, {**_OK, "format": "f" * 51},
    {**_OK, "hyperparameters": {"a": {"b": [1, {"c": None}]}}}, {**_OK, "hyperparameters": [1]},
    {**_OK, "hyperparameters": {"$where": 1}}, {**_OK, "dataset_info": {"a": [{"b.c": 1}]}},
    {**_OK, "metrics": {"accuracy": 0.9, "n": 3}}, {**_OK, "metrics": {"accuracy": "0.9"}},
    {**_OK, "metrics": {"accuracy": True}}, {**_OK, "metrics": {"$gt": 1}},
    {**_OK, "tags": ["a", "b"]}, {**_OK, "tags": ["a", ""]}, {**_OK, "tags": ["x"] * 101}, {**_OK, "tags": "a"},
    {**_OK, "status": "archived"}, {**_OK, "status": "gone"}, {**_OK, "status": None},
    {**_OK, "version": "v2.10"}, {**_OK, "version": "2.1"}, {**_OK, "version": "v01.0"},
    {**_OK, "breaking_changes": True}, {**_OK, "breaking_changes": 1},
    {**_OK, "created_by": "alice"}, {**_OK, "created_by": {"$gt": ""}},
    {**_OK, "id": "0" * 24}, {**_OK, "unknown": 1},
]


@pytest.mark.parametrize("operation, component", [
    (validation.registration, "ModelRegistration"),
    (validation.new_version, "NewVersion"),
    (validation.update, "ModelUpdate"),
])
@pytest.mark.parametrize("body", BODIES, ids=[str(i) for i in range(len(BODIES))])
def test_validation_accepts_what_the_published_schema_accepts(operation, component, body):
    if operation is not validation.registration:
        body = {k: v for k, v in body.items() if k != "name" and (component == "NewVersion" or k != "algorithm")}
    try:
        operation(body)
        accepted = True
    except ApiError:
        accepted = False
    errors = [e.message for e in _validator(component).iter_errors(body)]
    assert accepted == (not errors), (body, errors)
