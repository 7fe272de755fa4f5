"""Request bodies of batch lines, checked against the API's own OpenAPI request schemas.

The schemas are a cut of the official OpenAPI description shipped with the package
(schemas/openai-batch-request-bodies.openapi.yaml; its source and quirks are in
/shared/openai-spec/README.md). `check_body` answers what the real endpoint would:
None for a body it accepts, else a 400 `RequestError` naming the `param` the way the
API does (`messages[0].role`).

Two validators of the same JSON Schema 2020-12: jsonschema-rs (Rust) answers "valid?"
for every line, jsonschema (Python) explains only the lines that are not. Measured on a
busy 2-core machine, 50,000 chat bodies took 52 s with jsonschema alone, all inside the
world's lock (every client request waits), and 0.05 s with jsonschema-rs; jsonschema's
error tree (each union branch's errors) is what `_narrow` needs to name the param the
API names. Both are imported on first use only, so batchplan's start-up never pays for
them; the YAML is read once per process (about 0.1 s with the C loader).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import yaml

from reconciler.sandbox.line_errors import RequestError

SCHEMA_FILE = Path(__file__).parent / "schemas" / "openai-batch-request-bodies.openapi.yaml"
TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a decimal", "boolean": "a boolean",
              "array": "an array", "object": "an object", "null": "null"}
TAG_KEYS = ("role", "type")  # the properties a union's branches are told apart by (the discriminators)


@functools.cache
def request_schemas() -> dict:
    """The shipped OpenAPI document, its component schemas turned into plain JSON Schema 2020-12."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SCHEMA_FILE.open("rb") as fh:
        document = yaml.load(fh, Loader=loader)
    schemas = document["components"]["schemas"]
    document["components"]["schemas"] = {name: _to_json_schema(schema, name) for name, schema in schemas.items()}
    return document


def _to_json_schema(node: object, name: str) -> object:
    """Rewrite the OpenAPI-only keywords of one component schema into JSON Schema 2020-12.

    - `nullable: true` (OpenAPI 3.0, still used in 42 places) means "or null"; JSON Schema
      ignores it, so `max_tokens: null` would be refused. It becomes a type union (and
      `None` joins an `enum`), or an `anyOf` with `{"type": "null"}` when there is no `type`.
    - `oneOf` becomes `anyOf`. The API's unions are discriminated (`discriminator`, which
      JSON Schema ignores) and their branches overlap: a `/v1/responses` input message with
      content parts matches both `EasyInputMessage` and `InputMessage`, so "exactly one"
      would refuse bodies the API accepts. The API picks a branch; "at least one" is the
      JSON Schema that says so.
    - `$recursiveRef: "#"` (draft 2019-09, in `CompoundFilter`) is a plain `$ref` to the
      schema itself in 2020-12, so nested filters are checked instead of accepted blindly.
    """
    if isinstance(node, list):
        return [_to_json_schema(item, name) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _to_json_schema(value, name) for key, value in node.items() if key != "$recursiveAnchor"}
    if "oneOf" in node:
        node["anyOf"] = node.pop("oneOf")
    if node.get("$recursiveRef") == "#":
        del node["$recursiveRef"]
        node["$ref"] = f"#/components/schemas/{name}"
    if node.pop("nullable", False) is True:
        node = _or_null(node)
    return node


def _or_null(node: dict) -> dict:
    if isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
        return node
    return {"anyOf": [node, {"type": "null"}]}


def body_schema_name(endpoint: str) -> str:
    """`CreateChatCompletionRequest` for `/v1/chat/completions`: the JSON body of that POST."""
    operation = request_schemas()["paths"][endpoint.removeprefix("/v1")]["post"]
    return operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]


def _root_schema(endpoint: str) -> dict:
    # The whole document is the root, so `#/components/schemas/...` references resolve in it.
    return {"$ref": f"#/components/schemas/{body_schema_name(endpoint)}",
            "components": request_schemas()["components"]}


@functools.cache
def _fast_validator(endpoint: str):
    import jsonschema_rs

    return jsonschema_rs.validator_for(_root_schema(endpoint))


@functools.cache
def _explaining_validator(endpoint: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_root_schema(endpoint))


def check_body(endpoint: str, body: object) -> RequestError | None:
    """None when the endpoint accepts `body`, else the 400 it answers (the first problem found)."""
    if _fast_validator(endpoint).is_valid(body):
        return None
    from jsonschema.exceptions import best_match

    error = best_match(_explaining_validator(endpoint).iter_errors(body))
    return None if error is None else _describe(_narrow(error))  # None: the two validators disagree


# --- from a jsonschema error to the API's sentence ---

def _narrow(error):
    """Inside a failed union, follow the branch the value was meant for, as the API reports it.

    A branch was meant when the value's tag (`role`, `type`) fits it; a message with
    `role: "wizard"` fits none, and is reported as a bad `role`.
    """
    from jsonschema.exceptions import best_match

    while error.validator == "anyOf" and error.context:
        branches: dict[int, list] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        meant = [errors for errors in branches.values() if not any(_is_tag_error(e) for e in errors)]
        if not meant:
            return _TagError(error, [e for errors in branches.values() for e in errors if _is_tag_error(e)])
        if all(_is_type_error(errors) for errors in meant):
            return _TypesError(error, [e.validator_value for errors in meant for e in errors])
        error = best_match(e for errors in meant for e in errors)
    return error


def _is_tag_error(error) -> bool:
    path = list(error.relative_path)
    return len(path) == 1 and path[0] in TAG_KEYS and error.validator in ("enum", "const")


def _is_type_error(errors: list) -> bool:
    return len(errors) == 1 and errors[0].validator == "type" and not errors[0].relative_path


class _TagError:
    """Every branch of a union refused the value's tag: list what the tag may be."""

    validator = "enum"

    def __init__(self, union, tag_errors: list):
        self.absolute_path = [*union.absolute_path, tag_errors[0].relative_path[0]]
        self.instance = tag_errors[0].instance
        values = []
        for e in tag_errors:
            values += e.validator_value if e.validator == "enum" else [e.validator_value]
        self.validator_value = list(dict.fromkeys(values))


class _TypesError:
    """Every branch of a union refused the value's type: list the types it may have."""

    validator = "type"

    def __init__(self, union, types: list):
        self.absolute_path, self.instance = union.absolute_path, union.instance
        flat = []
        for value in types:
            flat += value if isinstance(value, list) else [value]
        self.validator_value = list(dict.fromkeys(flat))


def _describe(error) -> RequestError:
    param = _param(error.absolute_path)
    describe = _DESCRIBERS.get(error.validator, _describe_other)
    return describe(error, param)


def _param(path: Iterable) -> str | None:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _joined(param: str | None, name: str) -> str:
    return f"{param}.{name}" if param else name


def _describe_required(error, param: str | None) -> RequestError:
    missing = next(name for name in error.validator_value if name not in error.instance)
    if missing == "model" and param is None:
        return RequestError(400, "you must provide a model parameter")
    name = _joined(param, missing)
    return RequestError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")


def _describe_type(error, param: str | None) -> RequestError:
    expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    words = " or ".join(TYPE_WORDS.get(t, t) for t in expected if t != "null")
    return RequestError(400, f"Invalid type for '{param or 'body'}': expected {words}, but got "
                             f"{TYPE_WORDS[_json_type(error.instance)]} instead.", param=param, code="invalid_type")


def _describe_enum(error, param: str | None) -> RequestError:
    allowed = error.validator_value if error.validator == "enum" else [error.validator_value]
    listed = [f"'{value}'" for value in allowed if value is not None]
    supported = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + f", and {listed[-1]}"
    return RequestError(400, f"Invalid value: '{error.instance}'. Supported values are: {supported}.",
                        param=param, code="invalid_value")


def _describe_min_items(error, param: str | None) -> RequestError:
    if not error.instance:
        return RequestError(400, f"Invalid '{param}': empty array. Expected an array with minimum length "
                                 f"{error.validator_value}, but got an empty array instead.",
                            param=param, code="empty_array")
    return RequestError(400, f"Invalid '{param}': array too short. Expected an array with minimum length "
                             f"{error.validator_value}, but got an array with length {len(error.instance)} instead.",
                        param=param, code="array_below_min_length")


def _describe_bound(error, param: str | None) -> RequestError:
    declared = error.schema.get("type")
    kind = "integer" if declared == "integer" or "integer" in (declared or []) else "decimal"
    above = error.validator in ("maximum", "exclusiveMaximum")
    sign = {"maximum": "<=", "exclusiveMaximum": "<", "minimum": ">=", "exclusiveMinimum": ">"}[error.validator]
    where = "above maximum" if above else "below minimum"
    return RequestError(400, f"Invalid '{param}': {kind} {where} value. Expected a value {sign} "
                             f"{error.validator_value}, but got {error.instance} instead.",
                        param=param, code=f"{kind}_{'above_max' if above else 'below_min'}_value")


def _describe_extra(error, param: str | None) -> RequestError:
    known = error.schema.get("properties", {})
    extra = sorted(key for key in error.instance if key not in known)[0]
    return RequestError(400, f"Unrecognized request argument supplied: {extra}", param=_joined(param, extra),
                        code="unknown_parameter")


def _describe_other(error, param: str | None) -> RequestError:
    return RequestError(400, f"Invalid '{param or 'body'}': {error.message}.", param=param, code="invalid_value")


_DESCRIBERS = {
    "required": _describe_required,
    "type": _describe_type,
    "enum": _describe_enum,
    "const": _describe_enum,
    "minItems": _describe_min_items,
    "maximum": _describe_bound,
    "minimum": _describe_bound,
    "exclusiveMaximum": _describe_bound,
    "exclusiveMinimum": _describe_bound,
    "additionalProperties": _describe_extra,
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "array", dict: "object"}.get(type(value), "object")
