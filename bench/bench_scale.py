"""Issue 5: batchplan at the size of a real repo, against the loop a user would write with the SDK.

    python bench/bench_scale.py [--sizes 100,1000] [--latency 0.03] [--unrelated 500]

For each size N, a fresh sandbox server (its own process) adds `--latency` seconds to every
request and already holds `--unrelated` batches that batchplan did not make. A repo of N
specs (one small input file each, dated an hour ago as in a checkout that is not brand-new)
is then handled three ways, each timed as a whole process:

  sdk loop        what a user writes with the official `openai` SDK: for each spec upload
                  the file and create the batch, then retrieve each batch; one at a time
  batchplan apply create all N batches (from an empty state), the way users run it: a
                  `batchplan plan` (untimed) first in the same repo, so the apply reuses
                  its token and hash caches (state/tokens.json)
  apply, cold     the same in a fresh world and repo with no plan first: the apply hashes
                  and counts the tokens of every input itself (issue 19 reports both)
  batchplan plan  right after, with nothing changed (the batches are still running)

Requests are counted from the server's log. Lower bounds are round trips that cannot
overlap, times the latency: a no-change plan needs ceil(N/100) list pages; an apply needs the
account's list pages, one file listing, and N uploads and N creates in rounds of
--parallelism. Start-up is the wall time of `batchplan plan` in an empty repo: Python
and the libraries every plan loads, with nothing to read or ask (`batchplan --help` is shown too).
The server's CPU time per phase is shown because it shares this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import API_KEY, Server, batchplan, cleanup, run, table, verdict, workdir  # noqa: E402

ENDPOINT = "/v1/chat/completions"
PAGE = 100
PARALLELISM = 16  # batchplan's default


def make_repo(root: Path, n: int) -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "data").mkdir()
    an_hour_ago = time.time() - 3600
    for i in range(n):
        name = f"spec-{i:04d}"
        lines = "".join(
            f'{{"custom_id":"{name}-{k}","method":"POST","url":"{ENDPOINT}","body":{{"model":"gpt-4o-mini",'
            f'"messages":[{{"role":"user","content":"question {k} of {name}"}}]}}}}\n' for k in range(5))
        data = root / "data" / f"{name}.jsonl"
        data.write_text(lines)
        os.utime(data, (an_hour_ago, an_hour_ago))
        (root / "specs" / f"{name}.yaml").write_text(
            f"name: {name}\ninput: ../data/{name}.jsonl\nendpoint: {ENDPOINT}\nmetadata:\n  team: bench\n")
    return root


async def seed_unrelated(server: Server, count: int) -> None:
    """`count` batches made by someone else, already in the account before batchplan runs."""
    line = f'{{"custom_id":"x","method":"POST","url":"{ENDPOINT}","body":{{"model":"gpt-4o-mini"}}}}\n'
    async with httpx.AsyncClient(base_url=server.url + "/", headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=60, limits=httpx.Limits(max_connections=32)) as client:
        upload = await client.post("files", files={"file": ("other.jsonl", line.encode())}, data={"purpose": "batch"})
        file_id = upload.raise_for_status().json()["id"]
        slots = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with slots:
                answer = await client.post("batches", json={"input_file_id": file_id, "endpoint": ENDPOINT,
                                                            "completion_window": "24h",
                                                            "metadata": {"owner": "someone-else", "n": str(i)}})
                answer.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(count)))


def sdk_loop(server: Server, repo: Path, n: int) -> float:
    """The plain loop with the official SDK: upload + create per spec, then retrieve each batch."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0)
    started = time.perf_counter()
    batch_ids = []
    for i in range(n):
        name = f"spec-{i:04d}"
        with (repo / "data" / f"{name}.jsonl").open("rb") as fh:
            uploaded = client.files.create(file=fh, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                                      metadata={"name": name})
        batch_ids.append(batch.id)
    for batch_id in batch_ids:
        client.batches.retrieve(batch_id)
    seconds = time.perf_counter() - started
    client.close()
    return seconds


def startup_seconds() -> tuple[float, float]:
    """(`batchplan --help`, a plan of an empty repo): the fixed cost of a process, and of a plan
    process (Python, pydantic, yaml, httpx and asyncio loaded, a client made, nothing to ask)."""
    help_s = min(run(batchplan("--help")).seconds for _ in range(5))
    root = workdir("startup")
    try:
        (root / "specs").mkdir()
        never_contacted = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": API_KEY}
        plan_s = min(run(batchplan("plan"), cwd=root, env=never_contacted).seconds for _ in range(5))
    finally:
        cleanup(root)
    return help_s, plan_s


class Measured:
    """One timed process, with the requests it sent and the server CPU it cost."""

    def __init__(self, server: Server, args: list[str], repo: Path, check: bool = True):
        server.reset_log()
        cpu = server.cpu_seconds()
        self.run = run(args, cwd=repo, env=server.env(), check=check)
        self.requests = len(server.requests())
        self.server_cpu = server.cpu_seconds() - cpu


def apply_and_plan(n: int, args: argparse.Namespace, root: Path,
                   reviewed: bool = True) -> tuple[Measured, list[Measured], Server, Path]:
    """A fresh server and repo; apply (after an untimed plan when `reviewed`), then the no-change plans.
    The server is left running."""
    repo = make_repo(root, n)
    server = Server(latency=args.latency)
    asyncio.run(seed_unrelated(server, args.unrelated))
    if reviewed:
        run(batchplan("plan"), cwd=repo, env=server.env())
    apply = Measured(server, batchplan("apply", "--auto-approve"), repo)
    plans = [Measured(server, batchplan("plan", "--detailed-exitcode"), repo, check=False)
             for _ in range(args.repeat)]
    if any(p.run.code != 0 for p in plans):
        bad = next(p.run for p in plans if p.run.code != 0)
        raise SystemExit(f"the plan after apply is not empty (exit {bad.code}):\n{bad.out}{bad.err}")
    return apply, plans, server, repo


def bench_size(n: int, args: argparse.Namespace, startup: float) -> dict:
    """Best of --repeat applies (each in a fresh world) and plans; one SDK loop, in the last world."""
    root = workdir(f"scale-{n}")
    worlds = args.repeat if n <= args.repeat_apply_up_to else 1
    applies, plans = [], []
    try:
        for i in range(worlds):
            apply, its_plans, server, repo = apply_and_plan(n, args, root / f"repo-{i}")
            applies.append(apply)
            plans += its_plans
            if i + 1 < worlds:
                server.stop()
        cold, _, cold_server, _ = apply_and_plan(n, args, root / "repo-cold", reviewed=False)
        cold_server.stop()
        with server:
            server.reset_log()
            cpu = server.cpu_seconds()
            sdk = sdk_loop(server, repo, n)
            sdk_requests, sdk_cpu = len(server.requests()), server.cpu_seconds() - cpu
    finally:
        cleanup(root)
    apply = min(applies, key=lambda m: m.run.seconds)
    plan = min(plans, key=lambda m: m.run.seconds)
    rounds = math.ceil(n / args.parallelism)
    apply_bound = (math.ceil(args.unrelated / PAGE) + 1 + 2 * rounds) * args.latency
    plan_bound = math.ceil(n / PAGE) * args.latency
    return {"n": n, "sdk": sdk, "sdk_requests": sdk_requests, "apply": apply.run, "apply_requests": apply.requests,
            "plan": plan.run, "plan_requests": plan.requests, "apply_bound": apply_bound, "plan_bound": plan_bound,
            "cold": cold.run, "cold_requests": cold.requests, "startup": startup,
            "server_cpu": {"sdk": sdk_cpu, "apply": apply.server_cpu, "cold": cold.server_cpu, "plan": plan.server_cpu},
            "apply_runs": len(applies), "plan_runs": len(plans)}


def report(r: dict) -> str:
    sdk, apply, plan = r["sdk"], r["apply"], r["plan"]
    cpu = r["server_cpu"]
    rows = [
        ["sdk loop (openai SDK)", sdk, r["sdk_requests"], 1.0, "-", "-", "-", "-", cpu["sdk"]],
        ["batchplan apply (after a plan)", apply.seconds, r["apply_requests"], apply.seconds / sdk, r["apply_bound"],
         r["apply_bound"] + r["startup"], apply.max_rss_mb, apply.cpu_seconds, cpu["apply"]],
        ["batchplan apply, cold (no plan)", r["cold"].seconds, r["cold_requests"], r["cold"].seconds / sdk,
         r["apply_bound"], r["apply_bound"] + r["startup"], r["cold"].max_rss_mb, r["cold"].cpu_seconds, cpu["cold"]],
        ["batchplan plan, no change", plan.seconds, r["plan_requests"], plan.seconds / sdk, r["plan_bound"],
         r["plan_bound"] + r["startup"], plan.max_rss_mb, plan.cpu_seconds, cpu["plan"]],
    ]
    head = ["", "seconds", "requests", "x sdk loop", "lower bound s", "bound + start-up s", "peak RSS MB",
            "CPU s", "server CPU s"]
    return (f"{r['n']} specs (batchplan: best of {r['apply_runs']} apply and {r['plan_runs']} plan runs; "
            "SDK loop: one run):\n" + table(head, rows))


def targets(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        n, sdk, apply, plan = r["n"], r["sdk"], r["apply"], r["plan"]
        limit = 2 * (r["plan_bound"] + r["startup"])
        lines += [
            f"  {n} specs: apply <= 0.25x sdk loop: {apply.seconds / sdk:.3f}x  {verdict(apply.seconds <= 0.25 * sdk)}",
            f"  {n} specs: no-change plan <= 0.10x sdk loop: {plan.seconds / sdk:.3f}x  "
            f"{verdict(plan.seconds <= 0.10 * sdk)}",
            f"  {n} specs: no-change plan <= 2x (lower bound + start-up) = {limit:.2f} s: {plan.seconds:.2f} s  "
            f"{verdict(plan.seconds <= limit)}",
        ]
        if n >= 1000:
            bound = 1.3 * (r["apply_bound"] + r["startup"])
            lines.append(f"  {n} specs: apply after a plan <= 1.3x (lower bound + start-up) = {bound:.2f} s: "
                         f"{apply.seconds:.2f} s  {verdict(apply.seconds <= bound)} (cold: {r['cold'].seconds:.2f} s)")
            lines.append(f"  {n} specs: plan peak RSS < 150 MB: {plan.max_rss_mb:.0f} MB  "
                         f"{verdict(plan.max_rss_mb < 150)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated spec counts [100,1000]")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds added to every request [0.03]")
    parser.add_argument("--unrelated", type=int, default=500, help="batches already in the account [500]")
    parser.add_argument("--parallelism", type=int, default=PARALLELISM, help="batchplan's default, for the bound")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each batchplan command; the best counts [3]")
    parser.add_argument("--repeat-apply-up-to", type=int, default=100,
                        help="repeat apply (a fresh world each time) only up to this many specs [100]")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    help_s, startup = startup_seconds()
    print(f"batchplan scale bench: {args.latency * 1000:.0f} ms per request, {args.unrelated} unrelated batches, "
          f"{os.cpu_count()} CPUs.\nStart-up: `batchplan --help` {help_s:.2f} s; a plan of an empty repo "
          f"(the fixed cost of any plan) {startup:.2f} s\n", flush=True)
    results = []
    for n in sizes:
        results.append(bench_size(n, args, startup))
        print(report(results[-1]) + "\n", flush=True)
    print("Targets:\n" + "\n".join(targets(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
