"""The report's JSON Schema (``report_schema.json``) and its validation.

``jsonschema`` validates when it is installed; otherwise a small built-in validator checks
the subset of JSON Schema the report schema uses (type, properties, required,
additionalProperties, items, minItems, minimum, enum, const, pattern, anyOf, local ``$ref``).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


class ReportValidationError(ValueError):
    """The report does not match its schema; the message lists every problem with its path."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The report schema shipped with the package."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _resolve(root: dict, ref: str) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported; got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def builtin_errors(instance: Any, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    """Problems of ``instance`` against ``schema`` using the built-in subset validator."""
    root = schema if root is None else root
    if "$ref" in schema:
        return builtin_errors(instance, _resolve(root, schema["$ref"]), root, path)
    errors: list[str] = []
    if "anyOf" in schema:
        branches = [builtin_errors(instance, branch, root, path) for branch in schema["anyOf"]]
        if all(branches):
            errors.append(f"{path}: matches none of anyOf ({'; '.join(b[0] for b in branches)})")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: {instance!r} is not {schema['const']!r}")
    if "enum" in schema and not any(
        instance == option and type(instance) is type(option) for option in schema["enum"]
    ):
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']!r}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[name](instance) for name in types):
            return errors + [f"{path}: {instance!r} is not of type {' or '.join(types)}"]
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance!r} is less than the minimum of {schema['minimum']}")
    if isinstance(instance, str) and "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{path}: {instance!r} does not match {schema['pattern']!r}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: expected at least {schema['minItems']} items, got {len(instance)}")
        if "items" in schema:
            for index, item in enumerate(instance):
                errors += builtin_errors(item, schema["items"], root, f"{path}[{index}]")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                errors.append(f"{path}: '{name}' is a required property")
        extra = schema.get("additionalProperties", True)
        for name, value in instance.items():
            if name in properties:
                errors += builtin_errors(value, properties[name], root, f"{path}.{name}")
            elif extra is False:
                errors.append(f"{path}: additional property '{name}' is not allowed")
            elif isinstance(extra, dict):
                errors += builtin_errors(value, extra, root, f"{path}.{name}")
    return errors


def report_errors(report: dict[str, Any], use_jsonschema: bool | None = None) -> list[str]:
    """Every problem of ``report`` against the schema (jsonschema when installed, unless told)."""
    schema = load_schema()
    if use_jsonschema is None or use_jsonschema:
        try:
            import jsonschema
        except ImportError:
            if use_jsonschema:
                raise
        else:
            validator = jsonschema.Draft202012Validator(schema)
            return [
                f"$.{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
                for error in validator.iter_errors(report)
            ]
    return builtin_errors(report, schema)


def validate_report(report: dict[str, Any], use_jsonschema: bool | None = None) -> None:
    """Raise :class:`ReportValidationError` listing what does not match the schema."""
    errors = report_errors(report, use_jsonschema)
    if errors:
        raise ReportValidationError("profile report does not match its schema:\n  " + "\n  ".join(errors))
