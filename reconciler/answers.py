"""Server answers: what batchplan reads in a batch, a file and a list page, checked at the Api boundary.

A server that says `"status": null`, leaves out a created batch's `id`, or lists `data`
that is not a list would otherwise fail far away (a KeyError in the planner, a pydantic
error about the state). Api checks every JSON answer here as it arrives, and a wrong one
is one BadAnswer naming the request and the field (`GET /batches: data[3].created_at is
null, where an integer belongs`).

Only the fields batchplan reads are checked, and they are checked strictly (a "7" is not
a 7); the API adds fields over time, so unknown ones are allowed. The real API sends
`null` in optional fields the OpenAPI schema types as non-null (see the spec's README),
so every field batchplan can do without accepts null.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError

from .errors import BadAnswer


class _Answer(BaseModel):
    # allow, not forbid: the server's objects carry fields batchplan does not read, and gain new ones
    model_config = ConfigDict(extra="allow")


class BatchAnswer(_Answer):
    """A batch object: what BatchRecord.from_api, the planner and apply read."""

    id: StrictStr
    status: StrictStr
    created_at: StrictInt
    input_file_id: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = None
    request_counts: dict[StrictStr, StrictInt] | None = None
    output_file_id: StrictStr | None = None
    error_file_id: StrictStr | None = None
    errors: dict | None = None


class FileAnswer(_Answer):
    """A file object: what the uploader and download read."""

    id: StrictStr
    bytes: StrictInt
    filename: StrictStr
    status: StrictStr | None = None


class _Page(_Answer):
    data: list[dict]
    has_more: StrictBool = False


_BATCH = TypeAdapter(BatchAnswer)
_FILE = TypeAdapter(FileAnswer)
_PAGE = TypeAdapter(_Page)
KINDS = {"batch": _BATCH, "file": _FILE}


def checked(answer: dict, kind: str, request: str) -> dict:
    """`answer` itself when it is a good `kind` ("batch" or "file"); else BadAnswer naming the field."""
    _validate(KINDS[kind], answer, request, ())
    return answer


def checked_page(answer: dict, kind: str, request: str) -> tuple[list[dict], bool]:
    """A list page's items (each a good `kind`) and whether more follow; else BadAnswer."""
    _validate(_PAGE, answer, request, ())
    adapter = KINDS[kind]
    for index, item in enumerate(answer["data"]):
        _validate(adapter, item, request, ("data", index))
    return answer["data"], answer.get("has_more", False)


def _validate(adapter: TypeAdapter, answer: dict, request: str, where: tuple) -> None:
    try:
        adapter.validate_python(answer)
    except ValidationError as exc:
        raise BadAnswer(request, _problem(exc.errors()[0], where)) from None


def _problem(error: dict, where: tuple) -> str:
    """`data[3].created_at is null, where an integer belongs`."""
    loc = (*where, *error["loc"])
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "the answer"
    value = error.get("input")
    if error["type"] == "missing":
        return f"{field} is missing"
    wanted = {"string_type": "a string", "int_type": "an integer", "bool_type": "true or false",
              "list_type": "a list", "dict_type": "an object", "model_type": "an object"}.get(error["type"])
    given = "null" if value is None else repr(value) if len(repr(value)) <= 40 else type(value).__name__
    return f"{field} is {given}, where {wanted} belongs" if wanted else f"{field}: {error['msg']}"
