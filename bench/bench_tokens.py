"""Issue 11: counting the tokens of a large input file, next to validating it and a plain sha256 read.

    python bench/bench_tokens.py [--mb 60] [--lines 20000]

A temp dir gets a generated chat JSONL of about --mb MB in --lines lines: every request has
the same system prompt and its own user message of English-like text (words drawn at random
from this checkout's docs and code, so no two messages are alike). Measured, in this process,
best of --repeat runs each:

  plain sha256 read   hashlib over the file in 1 MiB reads: the baseline
  scan_input          batchplan's validator: one pass that hashes and checks every line
  count_file          the token counter: one pass that hashes, parses and tokenizes each
                      request's text (no cache)
  TokenCache, warm    a second plan: a fresh TokenCache loaded from disk, knowing the hash

Then `batchplan plan` of a repo whose one spec sends that file, as a process against a
sandbox server (its own process): with no caches, with only the token cache removed (the
input hashes cached: what counting adds to a plan), and again with both caches (a repeated
plan). The repeated plan must count nothing: state/tokens.json is not rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKOUT, Server, batchplan, cleanup, run, table, verdict, workdir  # noqa: E402

from reconciler.inputs import hash_file, scan_input  # noqa: E402
from reconciler.tokens import TokenCache, count_file  # noqa: E402

ENDPOINT = "/v1/chat/completions"
MB = 1024 * 1024
TARGET_MB_S = 20
SYSTEM_PROMPT = ("You are a careful assistant that grades answers to support questions. Read the question and the "
                 "answer, then reply with a JSON object holding a score from 1 to 5 and one sentence of reasons. "
                 "Be strict about facts, lenient about style, and never invent details that are not given.")


def words() -> list[str]:
    """English-like words with punctuation and numbers: the prose and code of this checkout."""
    texts = [p.read_text() for p in sorted([*CHECKOUT.glob("*.md"), *CHECKOUT.glob("reconciler/*.py")])]
    return " ".join(texts).split()


def generate(path: Path, megabytes: float, lines: int) -> None:
    """`lines` chat requests adding up to about `megabytes` MB, each user message different."""
    pool, rnd = words(), random.Random(11)
    per_line = int(megabytes * MB) // lines
    per_word = sum(len(json.dumps(w)) - 1 for w in pool) / len(pool)  # with its space and JSON escapes
    with path.open("w") as fh:
        for i in range(lines):
            user = " ".join(rnd.choices(pool, k=max(1, int((per_line - 450) / per_word))))
            body = {"model": "gpt-4o-mini", "max_completion_tokens": 300,
                    "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]}
            fh.write(json.dumps({"custom_id": f"req-{i:06d}", "method": "POST", "url": ENDPOINT, "body": body}) + "\n")


def best(func, repeat: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the fastest of `repeat` runs.

    The CPU time shows what the code costs when other work shares the cores (wall time then
    includes the waits).
    """
    runs = []
    for _ in range(repeat):
        started, cpu = time.perf_counter(), time.process_time()
        func()
        runs.append((time.perf_counter() - started, time.process_time() - cpu))
    return min(runs)


def plan_twice(root: Path, path: Path) -> tuple[list[list], bool]:
    """Rows for `batchplan plan` with cold, token-only-cold and warm caches; and whether the
    repeated plan left state/tokens.json untouched (it counted nothing)."""
    repo = root / "repo"
    (repo / "specs").mkdir(parents=True)
    (repo / "data").mkdir()
    path.rename(repo / "data" / "big.jsonl")
    hour_ago = time.time() - 3600  # a checkout that is not brand-new: the hash cache keeps it
    os.utime(repo / "data" / "big.jsonl", (hour_ago, hour_ago))
    (repo / "specs" / "big.yaml").write_text(f"name: big\ninput: ../data/big.jsonl\nendpoint: {ENDPOINT}\n")
    tokens_file = repo / "state" / "tokens.json"
    rows = []
    with Server() as server:
        def plan(label: str) -> None:
            done = run(batchplan("plan", "-C", str(repo)), env=server.env())
            assert "estimate: gpt-4o-mini, " in done.out, done.out  # the plan shows the count
            rows.append([label, done.seconds, done.cpu_seconds, done.max_rss_mb])

        plan("plan, no caches (hash + count)")
        tokens_file.unlink()
        plan("plan, input hash cached (count)")
        before = tokens_file.stat().st_mtime_ns, tokens_file.read_bytes()
        for _ in range(3):
            plan("plan again, both cached (no count)")
        untouched = (tokens_file.stat().st_mtime_ns, tokens_file.read_bytes()) == before
    warm = min(rows[2:], key=lambda row: row[1])
    return [*rows[:2], warm], untouched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=60, help="size of the generated input [60]")
    parser.add_argument("--lines", type=int, default=20_000, help="its number of lines [20000]")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts [3]")
    args = parser.parse_args()

    root = workdir("tokens")
    try:
        path = root / "big.jsonl"
        generate(path, args.mb, args.lines)
        mb = path.stat().st_size / MB
        print(f"batchplan token bench: {mb:.0f} MB, {args.lines:,} chat requests, {os.cpu_count()} CPUs\n", flush=True)

        tokens = count_file(path, ENDPOINT)
        assert tokens.sha256 == hash_file(path) and tokens.requests == args.lines
        plain = best(lambda: hash_file(path), args.repeat)
        scan = best(lambda: scan_input(path, ENDPOINT), args.repeat)
        counting = best(lambda: count_file(path, ENDPOINT), args.repeat)
        cache = TokenCache(root / "tokens.json")
        cache.count(path, ENDPOINT, sha256=tokens.sha256)
        cache.save()
        warm = best(lambda: TokenCache(root / "tokens.json").count(path, ENDPOINT, sha256=tokens.sha256), args.repeat)
        plans, untouched = plan_twice(root, path)
    finally:
        cleanup(root)

    rows = [[label, wall, cpu, mb / wall, mb / cpu, wall / plain[0]] for label, (wall, cpu) in (
        ("plain sha256 read (hashlib)", plain), ("scan_input (validator)", scan),
        ("count_file (token counter, no cache)", counting), ("TokenCache, warm (a second plan)", warm))]
    rows[-1][3:] = ["-", "-", "-"]
    print(table(["", "seconds", "CPU s", "MB/s", "MB/s of CPU", "x plain read"], rows))
    print(f"\nCounted {tokens.input_tokens:,} input tokens ({tokens.input_tokens / tokens.requests:,.0f} a request), "
          f"output bound {tokens.models[0].output_tokens_max:,} tokens.")
    print("\n`batchplan plan` of one spec sending this file (processes; the warm one best of 3):\n")
    print(table(["", "seconds", "CPU s", "peak RSS MB"], plans))
    print("\nTargets:")
    rate = mb / counting[0]
    print(f"  counting >= {TARGET_MB_S} MB/s of JSONL: {rate:.1f} MB/s  {verdict(rate >= TARGET_MB_S)}")
    print(f"  a repeated plan counts nothing (state/tokens.json untouched): {verdict(untouched)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
