"""The example GitHub workflows: they lint clean, and they install only this project.

actionlint (with shellcheck over every `run:` script) and zizmor (offline, with
examples/zizmor.yml) run over examples/github-actions/*.yml. All three linters come with the
`test` extra, so these tests fail, never skip, where one is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "examples" / "github-actions").glob("*.yml"))
ZIZMOR_CONFIG = ROOT / "examples" / "zizmor.yml"
# What may follow `pip install` besides requirements: nothing that changes where code comes from.
HARMLESS_PIP_OPTIONS = {"--quiet", "-q"}
# The only sources that can hold nothing but this project: the checked-out commit, or this
# repository at a full commit sha.
OWN_SOURCE = re.compile(r"file://\$GITHUB_WORKSPACE|git\+https://\S+@[0-9a-f]{40}")


def distribution_name() -> str:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["name"]


def tool(name: str) -> str:
    """A linter of the test extra: the one installed beside this Python first, else on PATH."""
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"{name} is not installed: run `python3 -m pip install -e '.[test]'`")
    return found


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    return run([tool("actionlint"), "-no-color", f"-shellcheck={tool('shellcheck')}", *paths])


def zizmor(*paths: Path) -> subprocess.CompletedProcess:
    return run([tool("zizmor"), "--offline", "--no-progress", "--color", "never",
                "--config", ZIZMOR_CONFIG, *paths])


def run(argv: list) -> subprocess.CompletedProcess:
    # No GitHub token reaches zizmor: offline it must stay, even on a developer's machine.
    tokens = {"GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN"}
    env = {key: value for key, value in os.environ.items() if key not in tokens}
    return subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, env=env, timeout=120)


def pip_installs(workflow: Path) -> list[list[str]]:
    """The words after `pip install` in each command of the workflow's `run:` steps."""
    document = yaml.safe_load(workflow.read_text())
    scripts = [step["run"] for job in document["jobs"].values() for step in job.get("steps", [])
               if "run" in step]
    installs = []
    for script in scripts:
        for line in script.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            for i, word in enumerate(words[:-1]):
                if word.rsplit("/", 1)[-1] in {"pip", "pip3"} and words[i + 1] == "install":
                    rest = words[i + 2:]
                    ends = [n for n, w in enumerate(rest) if w in {"&&", "||", ";", "|", ">", ">>"}]
                    installs.append(rest[:ends[0]] if ends else rest)
    return installs


def test_the_examples_are_the_two_workflows():
    assert [path.name for path in WORKFLOWS] == ["batchplan-postgres.yml", "batchplan.yml"]


def test_the_distribution_is_not_the_unrelated_batchplan_on_pypi():
    assert canonicalize_name(distribution_name()) == "batchplan-openai"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_every_pip_install_installs_this_project_from_a_fixed_source(workflow):
    installs = pip_installs(workflow)
    assert len(installs) == 3, "one install per job: plan, apply, results"
    for words in installs:
        options = [word for word in words if word.startswith("-")]
        requirements = [Requirement(word) for word in words if not word.startswith("-")]
        assert set(options) <= HARMLESS_PIP_OPTIONS, words
        own = canonicalize_name(distribution_name())
        assert [canonicalize_name(req.name) for req in requirements] == [own], words
        assert OWN_SOURCE.fullmatch(requirements[0].url or ""), words


def test_actionlint_finds_nothing_in_the_workflows():
    result = actionlint(*WORKFLOWS)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_zizmor_finds_nothing_in_the_workflows():
    result = zizmor(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("No findings to report."), result.stdout


BAD_WORKFLOW = """\
name: bad
on: pull_request
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: someone/setup-thing@v1
      - run: echo ${{ github.event.pull_request.title }} > $GITHUB_OUTPUT
"""


def test_the_linters_do_find_problems(tmp_path):
    """A green run above means something: the same calls flag a bad workflow, and the zizmor
    config relaxes pinning for GitHub's own actions only."""
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_WORKFLOW)
    linted = actionlint(bad)
    assert linted.returncode == 1
    assert "[expression]" in linted.stdout and "[shellcheck]" in linted.stdout, linted.stdout
    audited = zizmor(bad)
    assert audited.returncode != 0
    for finding in ("unpinned-uses", "template-injection", "excessive-permissions"):
        assert f"[{finding}]" in audited.stdout, audited.stdout
