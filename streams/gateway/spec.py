"""The REST gateway's OpenAPI document (``openapi.yaml`` next to this file, shipped as
package data; ``docs/openapi.yaml`` links to it) and request-body validation against it.

The document is the one description of the bodies: ``problem`` checks a body with
jsonschema against the named schema of ``components/schemas`` (``$ref`` resolved inside the
document), and turns the first violation into a message naming the field. OpenAPI 3.0's
schema object is a subset of JSON Schema draft 4 (``integer`` excludes 2.0, ``number`` and
``integer`` exclude booleans), so the draft-4 validator reads it as written; the request
schemas use none of OpenAPI's own keywords (``nullable``, ``discriminator``)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator, ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT4

PATH = Path(__file__).with_name("openapi.yaml")
_URI = "urn:clipstream:gateway:openapi"

#: the order in which violations of one body are reported: the body's shape first
_RANK = {"type": 0, "required": 1, "additionalProperties": 2, "anyOf": 3}


@cache
def document() -> dict[str, Any]:
    """The parsed OpenAPI document."""
    return yaml.safe_load(PATH.read_text(encoding="utf-8"))


def schema(name: str) -> dict[str, Any]:
    """``components/schemas/<name>`` as written."""
    return document()["components"]["schemas"][name]


@cache
def validator(name: str) -> Draft4Validator:
    registry = Registry().with_resource(_URI, DRAFT4.create_resource(document()))
    return Draft4Validator({"$ref": f"{_URI}#/components/schemas/{name}"}, registry=registry)


def problem(name: str, body: Any) -> str | None:
    """Why ``body`` does not conform to schema ``name``, naming the field, or None."""
    errors = list(validator(name).iter_errors(body))
    if not errors:
        return None
    first = min(
        errors,
        key=lambda e: (len(e.path), _RANK.get(str(e.validator), 9), [str(p) for p in e.path]),
    )
    return _message(first)


def _json(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ARTICLES = {"object": "a JSON object", "array": "an array", "integer": "an integer"}


def _kind(type_: Any) -> str:
    types = type_ if isinstance(type_, list) else [type_]
    return " or ".join(_ARTICLES.get(t, f"a {t}") for t in types)


def _message(error: ValidationError) -> str:
    """A message for one violation, in the gateway's words."""
    path = list(error.path)
    where = "body" if not path else repr(str(path[0])) if len(path) == 1 else None
    if where is None:
        where = repr(str(path[0]) + "".join(f"[{p}]" for p in path[1:]))
    keyword, value, instance = error.validator, error.validator_value, error.instance
    sub = error.schema
    if keyword == "type":
        return f"{where} must be {_kind(value)}, got {_json(instance)}"
    if keyword == "required":
        missing = [name for name in value if name not in instance]
        return f"{where} lacks required field {missing[0] if missing else value!r}"
    if keyword == "additionalProperties":
        unknown = sorted(set(instance) - set(sub.get("properties", {})))
        return f"unknown fields: {unknown} (allowed: {sorted(sub.get('properties', {}))})"
    if keyword == "anyOf" and all(set(s) == {"required"} for s in value):
        names = [" and ".join(repr(n) for n in s["required"]) for s in value]
        either = "both" if len(names) == 2 else "more than one"
        return f"{where} must give {' or '.join(names)} (or {either})"
    if keyword in ("oneOf", "anyOf") and all(set(s) == {"type"} for s in value):
        return f"{where} must be {_kind([s['type'] for s in value])}, got {_json(instance)}"
    if keyword == "minLength" and value == 1:
        return f"{where} must be a non-empty string"
    if keyword == "minItems":
        return f"{where} must have at least {value} item{'s' * (value != 1)}"
    if keyword == "minimum":
        return f"{where} must be at least {value}, got {_json(instance)}"
    if keyword == "maximum":
        return f"{where} must be at most {value}, got {_json(instance)}"
    return f"{where}: {error.message}"
