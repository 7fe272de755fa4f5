"""Issue 5: start-up. What each command costs before it does any work, and what it loads.

    python bench/bench_startup.py

Each command runs 7 times as a process; the best wall and CPU times are shown, next to a
bare `python -c pass`. `validate` checks the repo's example specs (copied to a temp dir);
`plan` runs in an empty repo against an address that is never contacted. The last column
lists which of the heavy libraries the command imported (each is only needed by some).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import API_KEY, CHECKOUT, CHILD_ENV, batchplan, cleanup, run, table, workdir  # noqa: E402

REPEAT = 7
HEAVY = ("pydantic", "yaml", "asyncio", "httpx", "httpcore", "anyio", "deepdiff", "rich", "reconciler.state")
PROBE = f"""
import sys
from reconciler.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("\\nLOADED", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""


def import_time() -> float:
    """Cumulative import time of reconciler.cli, from `python -X importtime`, best of REPEAT."""
    best = float("inf")
    for _ in range(REPEAT):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import reconciler.cli"],
                              capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
        for line in done.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[2].strip() == "reconciler.cli":
                best = min(best, int(parts[1]) / 1e6)
    return best


def main() -> int:
    root = workdir("startup")
    try:
        example = root / "example"
        shutil.copytree(CHECKOUT / "specs", example / "specs")
        shutil.copytree(CHECKOUT / "data", example / "data")
        empty = root / "empty"
        (empty / "specs").mkdir(parents=True)
        offline = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": API_KEY}
        commands = [
            ("python -c pass", [sys.executable, "-c", "pass"], root, {}, None),
            ("batchplan --help", batchplan("--help"), root, {}, ["--help"]),
            ("batchplan validate (example specs)", batchplan("validate"), example, {}, ["validate"]),
            ("batchplan plan (empty repo)", batchplan("plan"), empty, offline, ["plan"]),
        ]
        rows = []
        base = None
        for label, args, cwd, env, probe in commands:
            runs = [run(args, cwd=cwd, env=env) for _ in range(REPEAT)]
            wall = min(r.seconds for r in runs)
            cpu = min(r.cpu_seconds for r in runs)
            base = base or wall
            mods = loaded_modules(probe, cwd, env) if probe else "-"
            rows.append([label, wall, cpu, wall - base, min(r.max_rss_mb for r in runs), mods])
    finally:
        cleanup(root)
    print(f"batchplan start-up, best of {REPEAT}, {os.cpu_count()} CPUs\n")
    print(table(["", "wall s", "CPU s", "over python s", "peak RSS MB", "heavy modules loaded"], rows))
    print(f"\npython -X importtime -c 'import reconciler.cli': {import_time() * 1000:.0f} ms cumulative")
    return 0


def loaded_modules(args: list[str], cwd: Path, env: dict) -> str:
    """Which heavy modules a command imports (run once more, in a probe that lists them)."""
    probe = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                           env={**os.environ, **CHILD_ENV, **env})
    found = re.findall(r"^LOADED(.*)$", probe.stderr, re.M)
    return (found[-1].strip() or "none") if found else "?"


if __name__ == "__main__":
    sys.exit(main())
