"""Fake results for batch requests: one deterministic body per endpoint.

Every function here is pure: the same request (custom_id, body) and the same
`created` timestamp give the same bytes, so output files can be compared whole.
Bodies are shaped like the real endpoint's answer (ids, objects, usage), small
enough that a 50,000-request batch still finalizes in about a second.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
import zlib
from typing import Callable

import orjson

EMBEDDING_DIMS = 16
WORDS = ("batch", "plan", "apply", "state", "token", "model", "answer", "result",
         "queue", "window", "output", "input", "review", "diff", "sandbox", "reply")
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors",
    "violence", "violence/graphic",
)
EXPIRED_ERROR = {"code": "batch_expired",
                 "message": "This request could not be executed before the completion window expired."}


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big")


def request_fails(custom_id: str, fail_rate: float) -> bool:
    """Whether the emulator answers this request with an error (stable per custom_id)."""
    return fail_rate > 0 and _seed("fail", custom_id) / 2**64 < fail_rate


def _hex(rng: random.Random, n: int = 24) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _tokens(value: object) -> int:
    """A rough token count (4 bytes a token), enough for plausible usage numbers."""
    return max(1, len(orjson.dumps(value)) // 4)


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _answer_length(rng: random.Random, body: dict) -> int:
    cap = body.get("max_completion_tokens") or body.get("max_output_tokens") or body.get("max_tokens") or 48
    return max(1, min(int(cap), rng.randint(4, 48)))


def batch_usage(input_tokens: int, output_tokens: int, cached: int = 0, reasoning: int = 0) -> dict:
    """Usage in the Batch object's shape, the one `Batch.usage` sums."""
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens}


def add_usage(total: dict | None, usage: dict | None) -> dict | None:
    """Sum two Batch-shaped usages; None means "no usage reported"."""
    if usage is None:
        return total
    if total is None:
        total = batch_usage(0, 0)
    return {
        "input_tokens": total["input_tokens"] + usage["input_tokens"],
        "input_tokens_details": {"cached_tokens": total["input_tokens_details"]["cached_tokens"]
                                 + usage["input_tokens_details"]["cached_tokens"]},
        "output_tokens": total["output_tokens"] + usage["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": total["output_tokens_details"]["reasoning_tokens"]
                                  + usage["output_tokens_details"]["reasoning_tokens"]},
        "total_tokens": total["total_tokens"] + usage["total_tokens"],
    }


# --- one builder per endpoint: (rng, body, created) -> (response body, batch usage or None) ---

def _chat_completion(rng: random.Random, body: dict, created: int) -> tuple[dict, dict]:
    prompt = _tokens(body.get("messages", []))
    choices, completion = [], 0
    for index in range(int(body.get("n") or 1)):
        words = _answer_length(rng, body)
        completion += words
        choices.append({"index": index, "logprobs": None, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": _sentence(rng, words),
                                    "refusal": None, "annotations": []}})
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                           "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
    result = {"id": f"chatcmpl-{_hex(rng)}", "object": "chat.completion", "created": created,
              "model": body.get("model"), "choices": choices, "usage": usage,
              "service_tier": "default", "system_fingerprint": f"fp_{_hex(rng, 10)}"}
    return result, batch_usage(prompt, completion)


def _response(rng: random.Random, body: dict, created: int) -> tuple[dict, dict]:
    prompt = _tokens([body.get("instructions"), body.get("input")])
    words = _answer_length(rng, body)
    message = {"type": "message", "id": f"msg_{_hex(rng, 32)}", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": _sentence(rng, words), "annotations": []}]}
    usage = batch_usage(prompt, words)
    result = {"id": f"resp_{_hex(rng, 32)}", "object": "response", "created_at": created,
              "status": "completed", "error": None, "incomplete_details": None,
              "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
              "model": body.get("model"), "output": [message], "parallel_tool_calls": True,
              "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
              "store": True, "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
              "tool_choice": "auto", "tools": [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
              "usage": usage, "user": None, "metadata": body.get("metadata") or {}}
    return result, usage


def _completion(rng: random.Random, body: dict, created: int) -> tuple[dict, dict]:
    prompt = _tokens(body.get("prompt", ""))
    words = _answer_length(rng, body)
    result = {"id": f"cmpl-{_hex(rng)}", "object": "text_completion", "created": created,
              "model": body.get("model"),
              "choices": [{"text": " " + _sentence(rng, words), "index": 0, "logprobs": None,
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": prompt, "completion_tokens": words, "total_tokens": prompt + words}}
    return result, batch_usage(prompt, words)


def _input_items(value: object) -> list:
    """Embedding/moderation `input`: a string, a token list, or a list of either."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return value
    return [value]


def _vector(rng: random.Random, dims: int, encoding: str | None) -> list[float] | str:
    raw = [rng.uniform(-1, 1) for _ in range(dims)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    vector = [round(v / norm, 6) for v in raw]
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
    return vector


def _embeddings(rng: random.Random, body: dict, created: int) -> tuple[dict, dict]:
    items = _input_items(body.get("input", ""))
    dims = int(body.get("dimensions") or EMBEDDING_DIMS)
    data = [{"object": "embedding", "index": i, "embedding": _vector(rng, dims, body.get("encoding_format"))}
            for i in range(len(items))]
    prompt = sum(_tokens(item) for item in items)
    result = {"object": "list", "data": data, "model": body.get("model"),
              "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
    return result, batch_usage(prompt, 0)


def _moderation(rng: random.Random, body: dict, created: int) -> tuple[dict, None]:
    results = []
    for _ in _input_items(body.get("input", "")):
        scores = {c: round(rng.uniform(0, 0.01), 6) for c in MODERATION_CATEGORIES}
        results.append({"flagged": False, "categories": {c: False for c in MODERATION_CATEGORIES},
                        "category_scores": scores,
                        "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES}})
    result = {"id": f"modr-{_hex(rng)}", "model": body.get("model") or "omni-moderation-latest",
              "results": results}
    return result, None


def tiny_png(rng: random.Random) -> bytes:
    """A valid 1x1 RGB PNG of a random colour: real enough for any image decoder."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixel = zlib.compress(b"\x00" + bytes(rng.randrange(256) for _ in range(3)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel) + chunk(b"IEND", b"")


def _images(rng: random.Random, body: dict, created: int) -> tuple[dict, dict]:
    count = int(body.get("n") or 1)
    prompt = _tokens(body.get("prompt", ""))
    output = 272 * count  # what gpt-image-1 bills for a small low-quality image
    data = [{"b64_json": base64.b64encode(tiny_png(rng)).decode()} for _ in range(count)]
    usage = {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output,
             "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0}}
    return {"created": created, "data": data, "usage": usage}, batch_usage(prompt, output)


def _video(rng: random.Random, body: dict, created: int) -> tuple[dict, None]:
    result = {"id": f"video_{_hex(rng, 32)}", "object": "video", "model": body.get("model") or "sora-2",
              "status": "completed", "progress": 100, "created_at": created, "completed_at": created,
              "expires_at": created + 86400, "size": body.get("size") or "720x1280",
              "seconds": str(body.get("seconds") or "4"), "quality": "standard",
              "remixed_from_video_id": None, "error": None}
    return result, None


BUILDERS: dict[str, Callable[[random.Random, dict, int], tuple[dict, dict | None]]] = {
    "/v1/chat/completions": _chat_completion,
    "/v1/responses": _response,
    "/v1/completions": _completion,
    "/v1/embeddings": _embeddings,
    "/v1/moderations": _moderation,
    "/v1/images/generations": _images,
    "/v1/images/edits": _images,
    "/v1/videos": _video,
}


def success_line(batch_id: str, endpoint: str, custom_id: str, body: dict, created: int) -> tuple[dict, dict | None]:
    """One line of a batch output file, and the usage it adds to the batch."""
    rng = random.Random(_seed(endpoint, custom_id))
    result, usage = BUILDERS[endpoint](rng, body, created)
    line = {"id": f"batch_req_{_hex(random.Random(_seed(batch_id, custom_id)), 32)}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": _hex(rng, 32), "body": result}, "error": None}
    return line, usage


def failure_line(batch_id: str, custom_id: str, status: int, error: dict) -> dict:
    """One line of a batch error file: the request ran and the endpoint answered `status` with `error`."""
    rng = random.Random(_seed(batch_id, custom_id))
    return {"id": f"batch_req_{_hex(rng, 32)}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": _hex(rng, 32), "body": {"error": error}},
            "error": None}


def expired_line(batch_id: str, custom_id: str) -> dict:
    """One line of a batch error file for a request the batch never reached before it expired."""
    rng = random.Random(_seed(batch_id, custom_id))
    return {"id": f"batch_req_{_hex(rng, 32)}", "custom_id": custom_id, "response": None,
            "error": dict(EXPIRED_ERROR)}
