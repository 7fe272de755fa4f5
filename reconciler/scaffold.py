"""`batchplan init`: the files a new project starts from, written only where nothing is yet.

A commented example spec with a two-line input (so that `batchplan plan --sandbox` works at
once), a `batchplan.yaml` that names every setting with its default commented out, and
`.gitignore` lines for what batchplan writes that is per machine or per run (results, the
sandbox's world, caches, the lock and the backup). Nothing existing is ever overwritten: a
file already there is kept as it is, and `.gitignore` only gets the lines it lacks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .spec import find_spec_files

EXAMPLE_INPUT = "data/example.jsonl"
SPEC_TEXT = """\
# One YAML document per batch; `---` separates several in one file. The README's "Specs"
# section describes every field. Check with `batchplan validate`, try with `batchplan plan --sandbox`.
name: example                   # unique across all specs: the batch's address in plans and the state
input: {input:<24} # a JSONL file of requests, relative to THIS spec file
# input_file_id: file-abc123    # ... or a file already uploaded (exactly one of the two)
endpoint: /v1/chat/completions  # every request line's "url" must be this endpoint
completion_window: 24h          # the only value the Batch API accepts
metadata:                       # optional, at most 14 keys; shown on the batch in the dashboard
  team: research
# output_expires_after:         # optional: when the result files are deleted on the server
#   anchor: created_at
#   seconds: 604800             # 3600 (1 hour) .. 2592000 (30 days)
# output: results/example/output.jsonl  # where `download` puts the latest results (relative to the repo root)
# errors: results/example/errors.jsonl
# lifecycle:
#   prevent_cancel: true        # never cancel this batch: a plan that would is an error
#   ignore_changes: [metadata]  # an edit of these fields updates the state, never re-runs the batch
"""
CONFIG_TEXT = """\
# batchplan settings; every line is optional and shows its default. Paths are relative to this file.
# specs: specs                        # where the spec files are
# state: state/batchplan.state.json   # the state file: commit it
# results: results                    # where `download` writes results
# parallelism: 16                     # concurrent requests
# timeout: 60                         # seconds per request
# max_retries: 5                      # retries of a read, list or cancel on 429, 5xx and lost connections
# retry: {max_attempts: 3}            # follow-up batches of the requests that end without a result (none by default)
# max_wait: 60                        # seconds: the longest wait a server may ask for (Retry-After)
"""
IGNORED = ("results/", "state/sandbox/", "state/cache.json", "state/tokens.json", "state/*.lock",
           "state/*.lock.info", "state/*.backup", "state/retries/")
QUESTIONS = ("What is the capital of France?", "Name three prime numbers.")


@dataclass
class Scaffolded:
    """What init did, by repo-relative path."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)       # already there, left as it was
    ignored: list[str] = field(default_factory=list)    # lines added to .gitignore


def _example_input() -> str:
    lines = [{"custom_id": f"example-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}],
                       "max_tokens": 100}} for i, question in enumerate(QUESTIONS, start=1)]
    return "".join(json.dumps(line) + "\n" for line in lines)


def _create(root: Path, rel: str, text: str, done: Scaffolded) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as fh:  # "x": never overwrite, even if it appeared just now
            fh.write(text)
    except FileExistsError:
        done.kept.append(f"{rel} (already there)")
        return
    done.created.append(rel)


def _ignore(root: Path, done: Scaffolded) -> None:
    """Add the lines `.gitignore` lacks, at its end; the lines it has are left as they are."""
    path = root / ".gitignore"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    have = {line.strip() for line in text.splitlines()}
    missing = [line for line in IGNORED if line not in have]
    if not missing:
        done.kept.append(".gitignore (it ignores all batchplan writes already)")
        return
    prefix = "" if not text or text.endswith("\n") else "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(prefix + "# batchplan: per machine or per run\n" + "".join(f"{line}\n" for line in missing))
    if text:
        done.ignored += missing
    else:
        done.created.append(".gitignore")


def scaffold(root: Path, specs_dir: Path) -> Scaffolded:
    """Write the starting files under `root` that are not there yet."""
    done = Scaffolded()
    specs = os.path.relpath(specs_dir, root)
    if specs_dir.is_dir() and find_spec_files(specs_dir):
        done.kept.append(f"{specs}/ (it holds specs already, so no example was added)")
    else:
        _create(root, EXAMPLE_INPUT, _example_input(), done)
        relative_input = os.path.relpath(root / EXAMPLE_INPUT, specs_dir)
        _create(root, os.path.join(specs, "example.yaml"), SPEC_TEXT.format(input=relative_input), done)
    _create(root, "batchplan.yaml", CONFIG_TEXT, done)
    _ignore(root, done)
    return done
