"""A JSON Schema check for the keywords pydantic emits, so the CLI output is checked against the
checked-in schemas/*.schema.json themselves without a jsonschema dependency.

A keyword it does not know fails the check: a regenerated schema with a new keyword cannot pass
by being ignored.
"""
from __future__ import annotations

import re
from typing import Any

_ANNOTATIONS = {"title", "description", "default", "$defs", "examples"}
_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def errors(value: Any, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema`` ([] when it conforms)."""
    root = root if root is not None else schema
    out: list[str] = []
    for key, rule in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            assert rule.startswith("#/$defs/"), rule
            out += errors(value, root["$defs"][rule[len("#/$defs/"):]], root, path)
        elif key == "type":
            if not _TYPES[rule](value):
                out.append(f"{path}: {value!r} is not of type {rule}")
        elif key == "const":
            if value != rule:
                out.append(f"{path}: {value!r} != {rule!r}")
        elif key == "enum":
            if value not in rule:
                out.append(f"{path}: {value!r} not in {rule}")
        elif key == "pattern":
            if isinstance(value, str) and not re.search(rule, value):
                out.append(f"{path}: {value!r} does not match {rule}")
        elif key == "minimum":
            if _TYPES["number"](value) and value < rule:
                out.append(f"{path}: {value!r} < {rule}")
        elif key == "anyOf":
            if all(errors(value, alt, root, path) for alt in rule):
                out.append(f"{path}: {value!r} matches none of anyOf")
        elif key == "required":
            if isinstance(value, dict):
                out += [f"{path}: missing {k!r}" for k in rule if k not in value]
        elif key == "properties":
            if isinstance(value, dict):
                for k, sub in rule.items():
                    if k in value:
                        out += errors(value[k], sub, root, f"{path}.{k}")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                extra = [k for k in value if k not in schema.get("properties", {})]
                if rule is False:
                    out += [f"{path}: unexpected key {k!r}" for k in extra]
                elif isinstance(rule, dict):
                    for k in extra:
                        out += errors(value[k], rule, root, f"{path}.{k}")
        elif key == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    out += errors(item, rule, root, f"{path}[{i}]")
        else:
            raise AssertionError(f"schema keyword {key!r} at {path} is not checked here: teach schema_check.py")
    return out
