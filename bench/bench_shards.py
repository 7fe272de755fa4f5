"""Issue 10: splitting a large input into shards, and merging the shards' results.

    python bench/bench_shards.py [--requests 1000000] [--mb 1100] [--repeat 3]

A temp dir gets a generated JSONL input of --requests chat requests adding up to about
--mb MB (the issue's target: 1,000,000 requests, over 1 GB). Each step runs as its own
process, so its peak RSS is its own (wait4, see _common.run); each child also times its
work alone, without interpreter start-up and imports. Measured, in one run:

  plain sha256 read      hashlib over the file in 1 MiB reads: the baseline
  sha256sum              coreutils' sha256sum of the file, a process (no SHA-NI: for comparison)
  split_input            validate + hash + split the file in one pass (reconciler.shards)
  one shard, verified    open_shard streamed through hashlib in 64 KiB reads, as httpx
                         would upload it (the upload itself is measured after the wiring)
  merge, input order     merge_in_input_order of every shard's results, each result file
                         shuffled as the API may return it
  merge, shard order     merge_jsonl of the same result files
  batchplan apply        a cold apply (no hash cache, empty state) of one spec reading the
                         file: validate + split + upload every shard + create its batch,
                         against `batchplan sandbox serve` in its own process on 127.0.0.1;
                         twice: counting every shard's tokens (issue 11), then with them
                         counted before (state/tokens.json kept): the issue's target
  perfect pipeline       the scan and an apply whose scan is cached (uploads + creates only) run at
                         once: the bound of an apply that uploads while it scans, on this machine

Timings are the best of --repeat runs (the merges and the apply run once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHILD_ENV, Server, batchplan, cleanup, run, table, verdict, workdir  # noqa: E402
from bench_inputs import ENDPOINT, MB, generate  # noqa: E402

PLAIN_READ = """
import hashlib, sys, time
started = time.perf_counter()
h = hashlib.sha256()
with open(sys.argv[1], 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
print(time.perf_counter() - started)
"""
SPLIT = """
import dataclasses, json, sys, time
from pathlib import Path
from reconciler.shards import describe_split, split_input
started = time.perf_counter()
report = split_input(Path(sys.argv[1]), sys.argv[2])
print(time.perf_counter() - started)
print(describe_split(report.shards))
print(json.dumps([dataclasses.asdict(s) for s in report.shards]))
"""
ONE_SHARD = """
import hashlib, json, sys, time
from pathlib import Path
from reconciler.shards import Shard, open_shard
shard = Shard(**json.loads(sys.argv[2]))
started = time.perf_counter()
digest = hashlib.sha256()
with open_shard(Path(sys.argv[1]), shard) as fh:
    while chunk := fh.read(1 << 16):
        digest.update(chunk)
print(time.perf_counter() - started)
"""
MERGE = """
import json, sys, time
from pathlib import Path
from reconciler.shards import Shard, merge_in_input_order, merge_jsonl
what, input_path, shards_json, dest, *results = sys.argv[1:]
shards = [Shard(**s) for s in json.loads(Path(shards_json).read_text())]
started = time.perf_counter()
if what == "input-order":
    merge_in_input_order(Path(input_path), shards, [Path(r) for r in results], Path(dest))
else:
    merge_jsonl([Path(r) for r in results], Path(dest))
print(time.perf_counter() - started)
"""


def child(code: str, *args: str, repeat: int = 1) -> tuple[float, object]:
    """Best of `repeat` runs of `python -c code args`: (its own timing of the work, the best Run)."""
    runs = [run([sys.executable, "-c", code, *args]) for _ in range(repeat)]
    best = min(runs, key=lambda r: float(r.out.split()[0]))
    return float(best.out.split()[0]), best


def write_results(root: Path, shards: list[dict]) -> list[Path]:
    """One result file per shard, its lines shuffled: what the API returns for each batch."""
    files = []
    for shard in shards:
        lines = list(range(shard["first_line"] - 1, shard["last_line"]))
        random.Random(shard["index"]).shuffle(lines)
        path = root / f"output-{shard['index']:03d}.jsonl"
        with path.open("wb") as fh:
            for i in lines:
                fh.write(b'{"custom_id":"req-%06d","id":"batch_req_%06d","response":{"status_code":200,'
                         b'"request_id":"req_%032x","body":{"id":"chatcmpl-%06d","object":"chat.completion",'
                         b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}},"error":null}\n'
                         % (i, i, i, i))
        files.append(path)
    return files


def check_order(path: Path, requests: int) -> None:
    """Every request's result, in input order (custom_id req-NNNNNN sits at a fixed place)."""
    with path.open("rb") as fh:
        ids = [int(line[18:24]) for line in fh]
    if ids != list(range(requests)):
        raise SystemExit(f"{path}: results are not in input order")


def measure_split(path: Path, repeat: int) -> tuple[list[list], dict]:
    """Rows for the plain read, the split and one shard's verified read; and what the split said."""
    mb = path.stat().st_size / MB
    plain, plain_run = child(PLAIN_READ, str(path), repeat=repeat)
    split, split_run = child(SPLIT, str(path), ENDPOINT, repeat=repeat)
    _, phrase, shards_json = split_run.out.split("\n", 2)
    shards = json.loads(shards_json)
    one, one_run = child(ONE_SHARD, str(path), json.dumps(shards[0]), repeat=repeat)
    one_mb = shards[0]["end"] / MB
    summed = _sha256sum_row(path, plain)
    rows = [["plain sha256 read", plain, mb / plain, 1.0, plain_run.seconds, plain_run.max_rss_mb], *summed,
            ["split_input: validate + hash + split", split, mb / split, split / plain, split_run.seconds,
             split_run.max_rss_mb],
            [f"one shard ({one_mb:.0f} MB), verified while read", one, one_mb / one,
             one / (plain * one_mb / mb), one_run.seconds, one_run.max_rss_mb]]
    return rows, {"phrase": phrase, "shards": shards, "ratio": split / plain, "rss": split_run.max_rss_mb,
                  "plain_process": plain_run.seconds, "sha256sum": summed[0][1] if summed else None}


def _sha256sum_row(path: Path, plain: float) -> list[list]:
    """coreutils' `sha256sum`, the plain sha256 read a user types (no SHA-NI: slower than hashlib's OpenSSL)."""
    if shutil.which("sha256sum") is None:
        return []
    summed = run(["sha256sum", str(path)])
    mb = path.stat().st_size / MB
    return [["`sha256sum` (coreutils), a process", summed.seconds, mb / summed.seconds, summed.seconds / plain,
             summed.seconds, summed.max_rss_mb]]


def measure_merges(root: Path, path: Path, shards: list[dict], requests: int) -> tuple[list[list], dict]:
    """Rows for both merges of every shard's (shuffled) results; and their peak RSS."""
    (root / "shards.json").write_text(json.dumps(shards))
    results = write_results(root, shards)
    results_mb = sum(r.stat().st_size for r in results) / MB
    rows, rss = [], {}
    for what in ("input-order", "shard-order"):
        dest = root / f"merged-{what}.jsonl"
        seconds, merged = child(MERGE, what, str(path), str(root / "shards.json"), str(dest), *map(str, results))
        if what == "input-order":
            check_order(dest, requests)
        rss[what] = merged.max_rss_mb
        rows.append([f"merge {len(results)} shards' results ({results_mb:.0f} MB), {what}", seconds,
                     results_mb / seconds, "-", merged.seconds, merged.max_rss_mb])
    return rows, rss


def measure_apply(repo: Path, plain: float, what: str) -> tuple[list, dict]:
    """A row for one `batchplan apply` of the big spec against a fresh sandbox on loopback; and its numbers.

    The apply starts from an empty state and no input hash cache: it validates, splits and uploads."""
    mb = (repo / "data" / "big.jsonl").stat().st_size / MB
    _clear_state(repo, keep=("tokens.json",))
    with Server() as server:
        applied = run(batchplan("apply", "--auto-approve"), cwd=repo, env=server.env())
        posts = {path: sum(1 for r in server.requests() if r["method"] == "POST" and r["path"] == path)
                 for path in ("/v1/files", "/v1/batches")}
        server_cpu = server.cpu_seconds()
    row = [f"batchplan apply, {what}: validate + split + upload {posts['/v1/files']} shards + "
           f"{posts['/v1/batches']} creates (process; CPU {applied.cpu_seconds:.1f} s, server CPU {server_cpu:.1f} s)",
           applied.seconds, mb / applied.seconds, applied.seconds / plain, applied.seconds, applied.max_rss_mb]
    return row, {"ratio": applied.seconds / plain, "rss": applied.max_rss_mb, "posts": posts,
                 "seconds": applied.seconds}


def measure_applies(repo: Path, plain: float) -> tuple[list[list], dict]:
    """Two cold applies: the first also counts every shard's tokens (issue 11: a plan shows its cost;
    `state/tokens.json` keeps the counts by content), the second finds them counted: what is left is
    the issue's own work, validate + split + upload."""
    counting, _ = measure_apply(repo, plain, "cold, counting tokens")
    counted, applied = measure_apply(repo, plain, "tokens counted before")
    return [counting, counted], applied


def measure_overlap(repo: Path, plain: float) -> tuple[list, float]:
    """A row for the bound of a perfectly pipelined apply on this machine: the scan (split_input, in
    its own process) and an apply whose scan is cached (its 20 uploads and creates only) run at the
    same time against a fresh sandbox. Optimistic: the uploads wait for no shard to be scanned, and
    the apply's start-up overlaps the scan."""
    path = repo / "data" / "big.jsonl"
    _clear_state(repo, keep=("tokens.json",))
    with Server() as server:
        run(batchplan("plan"), cwd=repo, env=server.env())  # fills state/cache.json: the apply scans nothing
    _clear_state(repo, keep=("tokens.json", "cache.json"))
    with Server() as server:
        started = time.perf_counter()
        scan = subprocess.Popen([sys.executable, "-c", SPLIT, str(path), ENDPOINT], stdout=subprocess.DEVNULL,
                                env={**os.environ, **CHILD_ENV})
        run(batchplan("apply", "--auto-approve"), cwd=repo, env=server.env())
        scan.wait()
        both = time.perf_counter() - started
    mb = path.stat().st_size / MB
    return ["the scan and a scan-cached apply at once (a perfect pipeline's bound)", both, mb / both, both / plain,
            both, "-"], both / plain


def _clear_state(repo: Path, keep: tuple[str, ...]) -> None:
    for path in (repo / "state").glob("*"):
        if path.name not in keep:
            path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests in the input [1000000]")
    parser.add_argument("--mb", type=float, default=1100, help="its size in MB [1100]")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed step [3]")
    args = parser.parse_args()

    root = workdir("shards")
    try:
        repo = root / "repo"
        (repo / "specs").mkdir(parents=True)
        (repo / "data").mkdir()
        path = repo / "data" / "big.jsonl"
        generate(path, args.mb, args.requests)
        (repo / "specs" / "big.yaml").write_text(f"name: big\ninput: ../data/big.jsonl\nendpoint: {ENDPOINT}\n")
        print(f"batchplan shards bench: {path.stat().st_size / MB:,.0f} MB, {args.requests:,} requests, "
              f"{os.cpu_count()} CPUs\n", flush=True)
        rows, split = measure_split(path, args.repeat)
        apply_rows, applied = measure_applies(repo, rows[0][1])
        overlap_row, overlap = measure_overlap(repo, rows[0][1])
        apply_rows.append(overlap_row)
        merge_rows, merge_rss = measure_merges(root, path, split["shards"], args.requests)
    finally:
        cleanup(root)

    print(table(["", "work s", "MB/s", "x plain read", "process s", "peak RSS MB"], rows + apply_rows + merge_rows))
    print(f"\nSplit: {split['phrase']}")
    print("\nTargets:")
    print(f"  split within 3x of the plain read: {split['ratio']:.2f}x  {verdict(split['ratio'] <= 3)}")
    print(f"  split peak RSS <= 150 MB: {split['rss']:.0f} MB  {verdict(split['rss'] <= 150)}")
    print(f"  apply, tokens counted before (validate + split + upload) within 3x of the plain read: "
          f"{applied['ratio']:.2f}x  "
          f"{verdict(applied['ratio'] <= 3)}")
    print(f"    the same, process to process (the plain read's interpreter start-up counted too): "
          f"{applied['seconds'] / split['plain_process']:.2f}x")
    print(f"    a perfect pipeline's bound here (scan and uploads at once): {overlap:.2f}x")
    if split["sha256sum"]:
        print(f"    the same, against `sha256sum`: {applied['seconds'] / split['sha256sum']:.2f}x")
    print(f"  apply peak RSS <= 150 MB: {applied['rss']:.0f} MB  {verdict(applied['rss'] <= 150)}")
    for what, rss in merge_rss.items():
        print(f"  merge ({what}) peak RSS <= 100 MB: {rss:.0f} MB  {verdict(rss <= 100)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
