"""Issue 19: finding batchplan's batches in a busy account, through the uploads.

    python bench/bench_find.py [--specs 100] [--unrelated 50000] [--latency 0.03]

batchplan applies `--specs` specs on a sandbox server (its own process, its world on disk;
the batches stay running). Then `--unrelated` batches that batchplan did not make, an hour
older than its own by the server's clock, are written into that world directly (50,000
creates over HTTP, each saving the world, would take longer than the bench), and, each as a
whole process, with the requests counted from the server's log:

  plan, with the state      a no-change plan (the net looks for duplicates of running batches)
  plan, no state            the state file deleted: every batch must be found and adopted
  apply, no state           rebuilds the state, writing nothing to the server
  plan, after state rm      one entry removed by hand: found again through its upload

Target: with no state, at most 20 requests, and every batch adopted.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Server, batchplan, cleanup, run, table, verdict, workdir  # noqa: E402
from bench_scale import ENDPOINT, make_repo  # noqa: E402

from reconciler.sandbox import Emulator, Timing  # noqa: E402

TARGET_REQUESTS = 20


def seed_world(root: Path, count: int, age: float = 3600.0) -> None:
    """`count` running batches of someone else's, `age` seconds old, written in one save of the world, and
    listed before batchplan's (the emulator lists by its creation counter, as the API by creation time)."""
    line = f'{{"custom_id":"x","method":"POST","url":"{ENDPOINT}","body":{{"model":"gpt-4o-mini"}}}}\n'
    emulator = Emulator(root, Timing.uniform(3600), clock=lambda: time.time() - age)
    file_id = emulator.upload_bytes(line.encode(), "other.jsonl", "batch")["id"]
    body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}
    with emulator.store.transaction() as world:
        world["files"][file_id]["seq"] = -count - 1
        for i in range(count):
            batch_id = f"batch_{secrets.token_hex(16)}"
            batch = emulator._new_batch(  # noqa: SLF001: the bench's shortcut, as said above
                batch_id, {**body, "metadata": {"owner": "someone-else", "n": str(i)}}, time.time() - age)
            batch["seq"] = i - count  # the list's order is creation order: before batchplan's own
            world["batches"][batch_id] = batch


class Phase:
    """One batchplan command as a process, with the requests it sent."""

    def __init__(self, label: str, server: Server, repo: Path, *args: str):
        server.reset_log()
        self.label = label
        self.run = run(batchplan(*args), cwd=repo, env=server.env(), check=False)
        self.log = server.requests()
        self.requests = len(self.log)
        self.writes = sum(1 for r in self.log if r["method"] in ("POST", "DELETE"))


def actions(phase: Phase) -> dict[str, int]:
    counts: dict[str, int] = {}
    for action in json.loads(phase.run.out)["actions"]:
        counts[action["action"]] = counts.get(action["action"], 0) + 1
    return counts


def bench(args: argparse.Namespace) -> list[Phase]:
    root = workdir("find")
    try:
        world, repo = root / "world", make_repo(root / "repo", args.specs)
        state = repo / "state" / "batchplan.state.json"
        with Server(latency=args.latency, world=world) as server:
            phases = [Phase("apply (creates)", server, repo, "apply", "--auto-approve")]
        # written while no server runs: a world of 50,000 batches is slow to save after every create
        started = time.perf_counter()
        seed_world(world, args.unrelated)
        print(f"seeded {args.unrelated} unrelated batches in {time.perf_counter() - started:.1f} s", flush=True)
        with Server(latency=args.latency, world=world) as server:
            phases.append(Phase("plan, with the state", server, repo, "plan", "--json"))
            state.unlink()
            phases.append(Phase("plan, no state", server, repo, "plan", "--json"))
            phases.append(Phase("apply, no state", server, repo, "apply", "--auto-approve"))
            run(batchplan("state", "rm", "spec-0000"), cwd=repo)
            phases.append(Phase("plan, after state rm", server, repo, "plan", "--json"))
        return phases
    finally:
        cleanup(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=int, default=100, help="specs in the repo [100]")
    parser.add_argument("--unrelated", type=int, default=50_000, help="batches already in the account [50000]")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds added to every request [0.03]")
    args = parser.parse_args()
    phases = bench(args)
    for phase in phases:
        if phase.run.code != 0:
            raise SystemExit(f"{phase.label} exited {phase.run.code}:\n{phase.run.out}{phase.run.err}")
    rows = [[p.label, p.run.seconds, p.requests, p.writes,
             ", ".join(f"{n} {a}" for a, n in sorted(actions(p).items())) if p.label.startswith("plan") else "-"]
            for p in phases]
    print(table(["", "seconds", "requests", "writes", "plan"], rows))
    lost = phases[2]
    adopted = actions(lost).get("adopt", 0)
    print("\nTargets:")
    print(f"  no state: at most {TARGET_REQUESTS} requests: {lost.requests}  {verdict(lost.requests <= TARGET_REQUESTS)}")
    print(f"  no state: every batch adopted: {adopted} of {args.specs}  {verdict(adopted == args.specs)}")
    print(f"  rebuilt with no write: {phases[3].writes} writes  {verdict(phases[3].writes == 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
