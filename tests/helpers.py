"""Test helpers: a throwaway GitOps repo, and the batchplan CLI run in-process or as a process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from reconciler.cli import main

ENDPOINT = "/v1/chat/completions"
KEY = "sk-test-secret-key"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)


def request_line(custom_id: str, model: str = "gpt-4o-mini", url: str = ENDPOINT, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": custom_id}], **extra}}


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


class Repo:
    """A GitOps repo in a temp dir: specs/, data/, state/."""

    def __init__(self, root: Path):
        self.root = root
        (root / "specs").mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.root / "state" / "batchplan.state.json"

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def data(self, name: str, count: int = 3, prefix: str | None = None, **kw) -> str:
        write_jsonl(self.root / "data" / name, [request_line(f"{prefix or Path(name).stem}-{i}", **kw)
                                                for i in range(count)])
        return f"../data/{name}"

    def spec(self, name: str, file: str | None = None, **fields) -> Path:
        fields.setdefault("endpoint", ENDPOINT)
        if "input" not in fields and "input_file_id" not in fields:
            fields["input"] = self.data(f"{name}.jsonl")
        path = self.root / "specs" / (file or f"{name}.yaml")
        path.write_text(yaml.safe_dump({"name": name, **fields}, sort_keys=False))
        return path

    def remove_spec(self, name: str) -> None:
        (self.root / "specs" / f"{name}.yaml").unlink()


def env_for(sandbox) -> dict:
    """The environment that points batchplan at a sandbox (either door: EmulatorTransport or EmulatorServer)."""
    return {"OPENAI_BASE_URL": sandbox.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}


def run_cli(*args: str, env: dict | None = None) -> Result:
    """Run batchplan in this process (fast); env entries are set for the call only."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({k: v for k, v in (env or {}).items() if v is not None})
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, out.getvalue(), err.getvalue())


def cli(repo: Repo, env: dict | None, *args: str) -> Result:
    """`batchplan ARGS -C REPO` in this process, with `env`."""
    return run_cli(*args, "-C", str(repo.root), env=env)


def applied(repo: Repo, env: dict, *args: str) -> Result:
    """`batchplan apply --auto-approve ARGS`, which must succeed."""
    result = cli(repo, env, "apply", "--auto-approve", *args)
    assert result.code == 0, result.err
    return result


def waited(repo: Repo, env: dict, *names: str) -> Result:
    """`batchplan wait NAMES` polling every 0.05 s, which must see every batch complete within 10 s."""
    result = cli(repo, env, "wait", "--interval", "0.05", "--timeout", "10", *names)
    assert result.code == 0, result.out + result.err
    return result


def batch_of(repo: Repo, name: str) -> str:
    """The id of the batch the state records for `name`."""
    return repo.state()["entries"][name]["batch"]["id"]


def spawn_cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """Start batchplan as a separate process (for locks, signals and kills)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "reconciler", *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, **kw)


class PgRepo(Repo):
    """A repo whose state is a workspace in PostgreSQL: `settings()` gives the batchplan.yaml lines
    that say so, and `state()` reads the state from the database."""

    def __init__(self, root: Path, url: str, workspace: str = "default"):
        super().__init__(root)
        self.url, self.workspace = url, workspace

    def settings(self, extra: str = "") -> str:
        return f"state: {self.url}\nworkspace: {self.workspace}\n{extra}"

    def state(self) -> dict:
        from reconciler.stores.postgres import PostgresStore

        store = PostgresStore(self.url, self.workspace)
        try:
            state = store.load()
        finally:
            store.close()
        assert state is not None, f"no state in workspace {self.workspace}"
        return json.loads(state.to_json())
