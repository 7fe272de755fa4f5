"""The models the sandbox knows: a request for any other is answered 404 `model_not_found`.

By default they are every model id the shipped request schemas enumerate (the `model`
fields are `anyOf` a free string and an enum of known ids, so the schema alone never
refuses a misspelled name). A fine-tuned model (`ft:<known model>:...`) is known too.

To use your own list (a model of your organisation, a newer one), give `Emulator(models=...)`
or point `BATCHPLAN_SANDBOX_MODELS` at a file of model ids, one a line (`#` starts a
comment); `batchplan sandbox serve` and `--sandbox` read it. The list replaces the default.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.sandbox.line_errors import RequestError

MODELS_ENV = "BATCHPLAN_SANDBOX_MODELS"


@functools.cache
def schema_models() -> frozenset[str]:
    """Every model id an enum of a request body's `model` field lists."""
    from reconciler.sandbox.bodies import request_schemas

    schemas = request_schemas()["components"]["schemas"]
    found: set[str] = set()
    for schema in schemas.values():
        for part in [schema, *schema.get("allOf", [])]:
            model = part.get("properties", {}).get("model") if isinstance(part, dict) else None
            if model is not None:
                found |= _enum_values(model, schemas)
    return frozenset(found)


def _enum_values(node: object, schemas: dict) -> set[str]:
    while isinstance(node, dict) and "$ref" in node:
        node = schemas[node["$ref"].rsplit("/", 1)[1]]
    if not isinstance(node, dict):
        return set()
    values = {v for v in node.get("enum", []) if isinstance(v, str)}
    for branch in node.get("anyOf", []) + node.get("allOf", []):
        values |= _enum_values(branch, schemas)
    return values


def read_models_file(path: Path) -> frozenset[str]:
    """Model ids from a file, one a line; blank lines and `#` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the sandbox models file {path}: {exc}; give a text file of model ids, "
                          "one a line") from exc
    models = {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}
    if not models:
        raise ConfigError(f"the sandbox models file {path} names no model; put one model id on each line")
    return frozenset(models)


def models_from_env() -> frozenset[str] | None:
    """The list `BATCHPLAN_SANDBOX_MODELS` points at, or None (the default list) when unset."""
    path = os.environ.get(MODELS_ENV, "").strip()
    return read_models_file(Path(path)) if path else None


def model_error(model: object, known: Iterable[str] | None) -> RequestError | None:
    """The real API's 404 for a model it does not serve; None for a known one (or no model at all,
    which the body schema judges)."""
    if not isinstance(model, str):
        return None
    known = schema_models() if known is None else known
    base = model.split(":")[1] if model.startswith("ft:") else model
    if model in known or base in known:
        return None
    return RequestError(404, f"The model `{model}` does not exist or you do not have access to it.",
                        code="model_not_found")
