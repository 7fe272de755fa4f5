"""Issue 3: validating and uploading a large input file, against a plain sha256 read of it.

    python bench/bench_inputs.py [--mb 150] [--lines 45000] [--upload-mb 100]

A temp repo gets one spec and a generated JSONL input of about --mb MB in --lines lines
(dated an hour ago, as in a checkout that is not brand-new). Measured, in one run:

  plain sha256 read   hashlib over the file in 1 MiB reads, in this process: the baseline
  sha256sum           the coreutils command, when it is on PATH (for reference)
  scan_input          batchplan's validator itself, in this process: one pass that hashes
                      and checks every line
  batchplan validate  the command, as a process: cold (no hash cache), then warm (cached)
  batchplan apply     validate (cold) + streamed upload + create, against a local sandbox
                      server in its own process; its peak RSS comes from wait4

then the same apply for an input of --upload-mb MB. Timings are the best of 9 runs in this
process, or of 3 runs of a process (applies run once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Server, batchplan, cleanup, run, table, verdict, workdir  # noqa: E402

from reconciler.inputs import hash_file, scan_input  # noqa: E402

ENDPOINT = "/v1/chat/completions"
MB = 1024 * 1024
REPEAT = 3
PLAIN_READ = ("import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
              "    for chunk in iter(lambda: f.read(1 << 20), b''):\n        h.update(chunk)\n")


def generate(path: Path, megabytes: float, lines: int) -> None:
    """`lines` distinct chat requests adding up to about `megabytes` MB."""
    per_line = int(megabytes * MB) // lines
    words = b"lorem ipsum dolor sit amet consectetur adipiscing elit " * (per_line // 50 + 2)
    with path.open("wb") as fh:
        for i in range(lines):
            head = (b'{"custom_id":"req-%06d","method":"POST","url":"%s","body":{"model":"gpt-4o-mini",'
                    b'"messages":[{"role":"user","content":"' % (i, ENDPOINT.encode()))
            tail = b'"}]}}\n'
            fh.write(head + words[:max(1, per_line - len(head) - len(tail))] + tail)
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))


def make_repo(root: Path, megabytes: float, lines: int) -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "data").mkdir()
    generate(root / "data" / "big.jsonl", megabytes, lines)
    (root / "specs" / "big.yaml").write_text(f"name: big\ninput: ../data/big.jsonl\nendpoint: {ENDPOINT}\n")
    return root


def best(func, repeat: int = 9) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return min(times)


def best_run(args: list[str], **kwargs):
    runs = [run(args, **kwargs) for _ in range(REPEAT)]
    return min(runs, key=lambda r: r.seconds)


def upload(root: Path, megabytes: float, lines: int) -> dict:
    """A cold apply (no cache, empty state) of one spec with a generated input, against a sandbox."""
    repo = make_repo(root, megabytes, lines)
    size = (repo / "data" / "big.jsonl").stat().st_size
    with Server() as server:
        applied = run(batchplan("apply", "--auto-approve"), cwd=repo, env=server.env())
        posts = sum(1 for r in server.requests() if r["method"] == "POST" and r["path"] == "/v1/files")
    return {"size": size, "run": applied, "uploads": posts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=150, help="size of the validated input [150]")
    parser.add_argument("--lines", type=int, default=45_000, help="its number of lines [45000]")
    parser.add_argument("--upload-mb", type=float, default=100, help="size of the second uploaded input [100]")
    args = parser.parse_args()

    root = workdir("inputs")
    try:
        repo = make_repo(root / "repo", args.mb, args.lines)
        path = repo / "data" / "big.jsonl"
        size = path.stat().st_size
        mb = size / MB
        print(f"batchplan input bench: {mb:.0f} MB, {args.lines:,} lines, {os.cpu_count()} CPUs\n", flush=True)

        plain = best(lambda: hash_file(path))
        rows = [["plain sha256 read (hashlib, this process)", plain, mb / plain, 1.0, "-"]]
        if shutil.which("sha256sum"):
            coreutils = best_run(["sha256sum", str(path)])
            rows.append(["sha256sum (process)", coreutils.seconds, mb / coreutils.seconds,
                         coreutils.seconds / plain, coreutils.max_rss_mb])
        report = scan_input(path, ENDPOINT)
        assert report.ok and report.sha256 == hash_file(path), report.problems
        scan = best(lambda: scan_input(path, ENDPOINT))
        rows.append(["scan_input (validator, this process)", scan, mb / scan, scan / plain, "-"])

        python_sha = best_run([sys.executable, "-c", PLAIN_READ, str(path)])
        rows.append(["python -c <sha256 in 1 MiB reads> (process)", python_sha.seconds, mb / python_sha.seconds,
                     python_sha.seconds / plain, python_sha.max_rss_mb])
        (root / "empty" / "specs").mkdir(parents=True)
        startup = best_run(batchplan("validate"), cwd=root / "empty")
        rows.append(["batchplan validate, empty repo: start-up (process)", startup.seconds, "-", "-",
                     startup.max_rss_mb])
        cold_runs = []
        for _ in range(REPEAT):
            shutil.rmtree(repo / "state", ignore_errors=True)
            cold_runs.append(run(batchplan("validate"), cwd=repo))
        cold = min(cold_runs, key=lambda r: r.seconds)
        rows.append(["batchplan validate, cold (process)", cold.seconds, mb / cold.seconds, cold.seconds / plain,
                     cold.max_rss_mb])
        warm = best_run(batchplan("validate"), cwd=repo)
        rows.append(["batchplan validate, hash cached (process)", warm.seconds, mb / warm.seconds,
                     warm.seconds / plain, warm.max_rss_mb])

        big = upload(root / "upload-big", args.mb, args.lines)
        medium = upload(root / "upload-medium", args.upload_mb, int(args.lines * args.upload_mb / args.mb))
        for label, up in ((f"{args.mb:.0f} MB", big), (f"{args.upload_mb:.0f} MB", medium)):
            rows.append([f"batchplan apply: validate + upload {label} (process)", up["run"].seconds,
                         up["size"] / MB / up["run"].seconds, up["run"].seconds / plain, up["run"].max_rss_mb])
    finally:
        cleanup(root)

    print(table(["", "seconds", "MB/s", "x plain read", "peak RSS MB"], rows))
    print(f"\nUploads sent: {big['uploads']} and {medium['uploads']} (one POST /v1/files each)")
    work = cold.seconds - startup.seconds
    print(f"`batchplan validate` (cold) = start-up {startup.seconds:.2f} s + {work:.2f} s of validation "
          f"({mb / work:.0f} MB/s, {work / plain:.2f}x the plain read)")
    print("\nTargets:")
    print(f"  validation within 3x of the plain read: scan_input {scan / plain:.2f}x  {verdict(scan <= 3 * plain)}")
    for label, up in ((f"{args.mb:.0f} MB", big), (f"{args.upload_mb:.0f} MB", medium)):
        rss = up["run"].max_rss_mb
        print(f"  apply of a {label} input, peak RSS < 110 MB: {rss:.0f} MB  {verdict(rss < 110)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
