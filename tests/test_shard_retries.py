"""Issues 10 and 12 together: a sharded spec that retries, end to end through the sandbox.

A retry of a shard (`NAME[K]`) reads only its shard's bytes of the input: its plan counts that
shard's requests, and its follow-up input holds only that shard's lines. `download NAME` merges
every attempt of every shard into one output (input order) and one errors file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from reconciler.sandbox import Timing
from reconciler.sandbox.outcomes import BatchFaults, RequestFault
from tests.helpers import Repo, env_for, request_line, run_cli, write_jsonl

STEPS = Timing(validating=0.05, in_progress=0.4, finalizing=0.05)
LIMIT = 4  # requests per shard: q-0..q-3, q-4..q-7, q-8..q-9


def make_repo(root: Path, count: int = 10, retry: dict | None = None) -> Repo:
    repo = Repo(root)
    write_jsonl(repo.root / "data" / "big.jsonl", [request_line(f"q-{i}", max_tokens=10) for i in range(count)])
    repo.spec("big", input="../data/big.jsonl", shard={"max_requests": LIMIT},
              retry=retry or {"max_attempts": 3})
    (repo.root / "batchplan.yaml").write_text("timeout: 0.5\nmax_retries: 2\n")
    return repo


def cli(repo: Repo, env: dict, *args: str):
    return run_cli(*args, "-C", str(repo.root), env=env)


def apply_and_wait(repo: Repo, env: dict, *plan: str) -> None:
    assert (done := cli(repo, env, "apply", "--auto-approve", *plan)).code == 0, done.out + done.err
    cli(repo, env, "wait", "--interval", "0.05")  # exit 1 when a batch expired: that is the point


def input_lines(repo: Repo, *ids: int) -> bytes:
    raw = (repo.root / "data" / "big.jsonl").read_bytes().splitlines(keepends=True)
    return b"".join(raw[i] for i in ids)


def custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


def test_a_failed_shard_alone_is_retried_from_its_own_lines_and_every_attempt_is_merged(sandbox_factory, tmp_path):
    faults = [RequestFault(custom_id="^q-5$", status=500), RequestFault(custom_id="^q-6$", status=429)]
    sandbox = sandbox_factory(timing=STEPS, max_requests=LIMIT, request_faults=faults)
    env = env_for(sandbox)
    repo = make_repo(tmp_path / "repo")
    apply_and_wait(repo, env)
    sandbox.emulator.batch_faults = BatchFaults()  # the next attempt goes well

    sha = hashlib.sha256(input_lines(repo, 5, 6)).hexdigest()
    plan = cli(repo, env, "plan")
    print(plan.out, plan.err)
    assert 0
