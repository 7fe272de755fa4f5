"""Tokens of an input file: input tokens counted offline and exactly, output tokens bounded.

Each request is counted with its model's own tokenizer (o200k_base for the gpt-4o, gpt-4.1,
gpt-5 and o-series families, cl100k_base for gpt-4, gpt-3.5 and the embedding models; a
model we do not know is counted with o200k_base, and the count says so). The tokenizer is
`toktok` (package toktok-rs): its encodings are compiled into its wheel, so nothing is
downloaded at run time, and tests/test_tokens.py checks it against OpenAI's `tiktoken`.

Only the text a model reads is tokenized, never the whole JSON line:
- chat: every message costs TOKENS_PER_MESSAGE plus its role and content, a `name` costs
  its tokens plus TOKENS_PER_NAME, and REPLY_PRIMING tokens start the reply, as OpenAI
  documents it (cookbook "How to count tokens with tiktoken");
- responses: the same format for `instructions` (a developer message), a string `input`
  (a user message) and input messages (OpenAI documents no other overhead for it);
- embeddings and completions: every string of `input` / `prompt`, no overhead; token
  arrays count as given.
Images, audio, files, tools, schemas and stored prompts are not counted: their text
parts are, and the count is then a lower bound (`uncounted` says what was left out).

The output bound of a request is its `max_completion_tokens` / `max_tokens` /
`max_output_tokens` (times `n` choices); a request that sets none has no bound unless the
caller passes a default. Embeddings produce no output tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import toktok
from pydantic import BaseModel, ConfigDict

from .inputs import CacheFile, hash_file, load_line

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
FALLBACK_ENCODING = "o200k_base"
# The API's default for /v1/completions (openai-batch-request-bodies.openapi.yaml, max_tokens).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Model name prefixes, after any "ft:" and checked longest first, as tiktoken.model maps them.
ENCODING_BY_PREFIX = {
    "gpt-5": "o200k_base", "gpt-4.5": "o200k_base", "gpt-4.1": "o200k_base", "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base", "gpt-oss": "o200k_base", "o1": "o200k_base", "o3": "o200k_base",
    "o4-mini": "o200k_base", "codex-mini": "o200k_base",
    "gpt-4": "cl100k_base", "gpt-3.5": "cl100k_base", "gpt-35": "cl100k_base",
    "text-embedding-3": "cl100k_base", "text-embedding-ada-002": "cl100k_base",
    "davinci-002": "cl100k_base", "babbage-002": "cl100k_base",
}
_PREFIXES_LONGEST_FIRST = sorted(ENCODING_BY_PREFIX, key=len, reverse=True)

# What a request can hold that is billed as input but not counted here, by content part or
# item type; any other non-text part is "other content".
_UNCOUNTED_PARTS = {
    "image_url": "images", "input_image": "images", "input_audio": "audio", "file": "files",
    "input_file": "files",
}
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


class InputTokens(BaseModel):
    """What the requests of one model in one input file cost in tokens.

    `input_tokens` is exact unless `uncounted` names something left out (images, tools, ...):
    then it is a lower bound. `output_tokens_max` is the sum of the requests' output bounds,
    None when a request has none (and no default was given). `known_model` is False when the
    model is not one we know, and `encoding` (o200k_base) was a guess.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    encoding: str
    known_model: bool
    requests: int
    input_tokens: int
    output_tokens_max: int | None
    uncounted: tuple[str, ...] = ()

    @property
    def lower_bound(self) -> bool:
        return bool(self.uncounted)


class FileTokens(BaseModel):
    """The tokens of one input file: one InputTokens per model, sorted by model name.

    A valid batch uses one model; a file with several is counted per model all the same.
    `sha256` is the content that was counted (hashed in the same read).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str
    endpoint: str
    models: tuple[InputTokens, ...]

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.models)

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.models)

    @property
    def lower_bound(self) -> bool:
        return any(m.lower_bound for m in self.models)

    @property
    def unknown_models(self) -> list[str]:
        return [m.model for m in self.models if not m.known_model]

    def notes(self) -> list[str]:
        """Sentences for people: guessed tokenizers and what was not counted."""
        notes = [f"model {m.model!r} is not known to batchplan: counted with {m.encoding}"
                 for m in self.models if not m.known_model]
        notes += [f"{m.model}: {', '.join(m.uncounted)} not counted; input tokens are a lower bound"
                  for m in self.models if m.uncounted]
        return notes


def encoding_for_model(model: str) -> tuple[str, bool]:
    """(encoding name, whether the model is known); unknown models get FALLBACK_ENCODING."""
    base = model.removeprefix("ft:")
    for prefix in _PREFIXES_LONGEST_FIRST:
        if base.startswith(prefix):
            return ENCODING_BY_PREFIX[prefix], True
    return FALLBACK_ENCODING, False


class _Tally:
    """Running totals for one model while a file is read; also what TokenCache keeps."""

    __slots__ = ("model", "encoding", "requests", "input_tokens", "output_bound", "unbounded",
                 "uncounted", "texts")

    def __init__(self, model: str):
        self.model = model
        self.encoding = encoding_for_model(model)[0]
        self.requests = self.input_tokens = self.output_bound = self.unbounded = 0
        self.uncounted: set[str] = set()
        self.texts: list[str] = []  # the current request's text, tokenized once it is read

    def end_request(self, bound: int | None) -> None:
        self.requests += 1
        if bound is None:
            self.unbounded += 1
        else:
            self.output_bound += bound
        # threads=1: one core already counts faster than the plan reads (see bench_tokens.py)
        self.input_tokens += sum(toktok.batch_count(self.texts, self.encoding, threads=1))
        self.texts.clear()

    def result(self, default_max_output: int | None) -> InputTokens:
        output_max: int | None = self.output_bound
        if self.unbounded:
            output_max = None if default_max_output is None else output_max + self.unbounded * default_max_output
        return InputTokens(model=self.model, encoding=self.encoding, known_model=encoding_for_model(self.model)[1],
                           requests=self.requests, input_tokens=self.input_tokens, output_tokens_max=output_max,
                           uncounted=tuple(sorted(self.uncounted)))

    def to_json(self) -> dict:
        return {"model": self.model, "encoding": self.encoding, "requests": self.requests,
                "input_tokens": self.input_tokens, "output_bound": self.output_bound,
                "unbounded": self.unbounded, "uncounted": sorted(self.uncounted)}

    @classmethod
    def from_json(cls, data: dict) -> _Tally:
        """A cached tally; KeyError/TypeError/ValueError when the entry is not one we wrote."""
        tally = cls(data["model"])
        if tally.encoding != data["encoding"]:
            raise ValueError("counted with another encoding")
        tally.requests, tally.input_tokens = int(data["requests"]), int(data["input_tokens"])
        tally.output_bound, tally.unbounded = int(data["output_bound"]), int(data["unbounded"])
        tally.uncounted = set(map(str, data["uncounted"]))
        return tally


# --- reading the text out of request bodies: one reader per endpoint --------------------------

def _bound(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _add_content(content: object, tally: _Tally) -> None:
    """A message's content: a string, or a list of parts of which only the text is counted."""
    if type(content) is str:
        tally.texts.append(content)
    elif type(content) is list:
        for part in content:
            kind = part.get("type") if type(part) is dict else None
            text = part.get(_TEXT_PARTS[kind]) if kind in _TEXT_PARTS else None
            if type(text) is str:
                tally.texts.append(text)
            else:
                tally.uncounted.add(_UNCOUNTED_PARTS.get(kind, "other content"))


def _add_tool_call(call: object, tally: _Tally) -> None:
    """The name and arguments of a tool call; its framing is not documented, so not counted."""
    tally.uncounted.add("tools")
    if type(call) is dict:
        function = call.get("function") or call.get("custom") or call
        for key in ("name", "arguments", "input", "output"):
            value = function.get(key) if type(function) is dict else None
            if type(value) is str:
                tally.texts.append(value)


def _add_message(message: object, tally: _Tally) -> None:
    if type(message) is not dict:
        return
    tally.input_tokens += TOKENS_PER_MESSAGE
    role, name = message.get("role"), message.get("name")
    if type(role) is str:
        tally.texts.append(role)
    if type(name) is str:
        tally.texts.append(name)
        tally.input_tokens += TOKENS_PER_NAME
    _add_content(message.get("content"), tally)
    for call in message.get("tool_calls") or ():
        _add_tool_call(call, tally)
    if message.get("function_call"):
        _add_tool_call(message["function_call"], tally)
    if message.get("audio"):
        tally.uncounted.add("audio")


def _add_strings_or_tokens(value: object, tally: _Tally) -> None:
    """An embeddings `input` / completions `prompt`: a string, strings, or token arrays as given."""
    if type(value) is str:
        tally.texts.append(value)
    elif type(value) is list:
        for item in value:
            if type(item) is str:
                tally.texts.append(item)
            elif type(item) is int:
                tally.input_tokens += 1
            elif type(item) is list:
                tally.input_tokens += len(item)


def _add_schema(response_format: object, tally: _Tally) -> None:
    if type(response_format) is dict and response_format.get("type") == "json_schema":
        tally.uncounted.add("response schema")


def _read_chat(body: dict, tally: _Tally) -> int | None:
    messages = body.get("messages")
    for message in messages if type(messages) is list else ():
        _add_message(message, tally)
    tally.input_tokens += REPLY_PRIMING
    if body.get("tools") or body.get("functions"):
        tally.uncounted.add("tools")
    _add_schema(body.get("response_format"), tally)
    bound = _bound(body.get("max_completion_tokens"))
    bound = _bound(body.get("max_tokens")) if bound is None else bound
    choices = _bound(body.get("n")) or 1
    return None if bound is None else bound * choices


def _add_item(item: object, tally: _Tally) -> None:
    """One item of a Responses `input` list: a message, a tool call or output, or a reference."""
    if type(item) is not dict:
        return
    kind = item.get("type", "message")
    if type(kind) is not str:
        return
    if kind == "message":
        _add_message(item, tally)
    elif kind in ("item_reference", "reasoning"):  # text we cannot see, or billed its own way
        tally.uncounted.add("stored or reasoning items")
    else:  # function_call, function_call_output, web_search_call, mcp_list_tools, ...
        _add_tool_call(item, tally)


def _read_responses(body: dict, tally: _Tally) -> int | None:
    instructions, given = body.get("instructions"), body.get("input")
    if type(instructions) is str:
        _add_message({"role": "developer", "content": instructions}, tally)
    if type(given) is str:
        _add_message({"role": "user", "content": given}, tally)
    for item in given if type(given) is list else ():
        _add_item(item, tally)
    tally.input_tokens += REPLY_PRIMING
    if body.get("tools"):
        tally.uncounted.add("tools")
    text = body.get("text")
    _add_schema(text.get("format") if type(text) is dict else None, tally)
    if body.get("prompt") or body.get("previous_response_id") or body.get("conversation"):
        tally.uncounted.add("stored prompts")
    return _bound(body.get("max_output_tokens"))


def _read_embeddings(body: dict, tally: _Tally) -> int | None:
    _add_strings_or_tokens(body.get("input"), tally)
    return 0


def _read_completions(body: dict, tally: _Tally) -> int | None:
    _add_strings_or_tokens(body.get("prompt"), tally)
    bound = _bound(body.get("max_tokens"))
    choices = max(_bound(body.get("n")) or 1, _bound(body.get("best_of")) or 1)
    return (COMPLETIONS_DEFAULT_MAX_TOKENS if bound is None else bound) * choices


READERS: dict[str, Callable[[dict, _Tally], int | None]] = {
    "/v1/chat/completions": _read_chat,
    "/v1/responses": _read_responses,
    "/v1/embeddings": _read_embeddings,
    "/v1/completions": _read_completions,
}
COUNTED_ENDPOINTS = frozenset(READERS)


# --- files ------------------------------------------------------------------------------------

def _count_tallies(path: Path, endpoint: str,
                   byte_range: tuple[int, int] | None = None) -> tuple[str, dict[str, _Tally]]:
    """(sha256, tallies by model) of one file, or of its bytes [start, end), in one streaming read.

    Lines that are not a request with a JSON object body are skipped: the validator reports
    them, and a file with problems is never sent.
    """
    read = READERS[endpoint]
    tallies: dict[str, _Tally] = {}
    digest = hashlib.sha256()
    from .shards import open_lines

    with open_lines(path, byte_range) as fh:
        for line in fh:
            digest.update(line)
            try:
                request = load_line(line)
            except ValueError:  # orjson's JSONDecodeError too
                continue
            body = request.get("body") if type(request) is dict else None
            if type(body) is not dict:
                continue
            model = body.get("model")
            model = model if type(model) is str else ""
            tally = tallies.get(model) or tallies.setdefault(model, _Tally(model))
            tally.end_request(read(body, tally))
    return digest.hexdigest(), tallies


def _file_tokens(sha256: str, endpoint: str, tallies: list[_Tally], default_max_output: int | None) -> FileTokens:
    models = sorted((t.result(default_max_output) for t in tallies), key=lambda m: m.model)
    return FileTokens(sha256=sha256, endpoint=endpoint, models=tuple(models))


def count_file(path: Path, endpoint: str, default_max_output: int | None = None) -> FileTokens:
    """Count the tokens of one JSONL input file (no cache; see TokenCache).

    `endpoint` must be one of COUNTED_ENDPOINTS (a caller's mistake otherwise: KeyError).
    `default_max_output` bounds the output of requests that set no maximum themselves.
    OSError is left to the caller, who knows which spec the file belongs to.
    """
    sha256, tallies = _count_tallies(path, endpoint)
    return _file_tokens(sha256, endpoint, list(tallies.values()), default_max_output)


class TokenCache(CacheFile):
    """Token counts of input files by content hash and endpoint, in `state/tokens.json`.

    A sibling of the input hash cache (`state/cache.json`), per machine and git-ignored.
    Keyed by content, so an entry never goes stale; it keeps the raw counts, so a different
    `default_max_output` needs no recount. Never precious: a damaged or foreign file or entry
    is ignored and rebuilt. `counted` says how many files were really read (tests, benches).
    """

    VERSION = 1
    SAVES = "counting tokens again"

    def __init__(self, path: Path | None):
        super().__init__(path)
        self.counted = 0

    def count(self, path: Path, endpoint: str, sha256: str | None = None,
              default_max_output: int | None = None, byte_range: tuple[int, int] | None = None) -> FileTokens:
        """The tokens of one file, or of its bytes [start, end) (a shard): from the cache when
        their content is known there, else counted.

        `sha256` is the hash of those bytes when the caller has it (plan does); else the file's
        is computed, which costs a small part of a count. What is counted is cached under the
        hash of what was read, which the result carries: a shard's tokens under the shard's hash.
        """
        sha256 = sha256 or hash_file(path)
        tallies = self._cached(f"{sha256} {endpoint}")
        if tallies is None:
            self.counted += 1
            sha256, counted = _count_tallies(path, endpoint, byte_range)
            tallies = list(counted.values())
            self.entries[f"{sha256} {endpoint}"] = [t.to_json() for t in tallies]
            self.dirty = True
        return _file_tokens(sha256, endpoint, tallies, default_max_output)

    def _cached(self, key: str) -> list[_Tally] | None:
        try:
            return [_Tally.from_json(entry) for entry in self.entries[key]]
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
