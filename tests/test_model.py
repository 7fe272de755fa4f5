"""The Promela model of apply (model/, see model/README.md) holds, and every mutant of it is refuted.

spin turns a model into a C verifier (pan.c), gcc compiles it, and pan searches every interleaving.
A model must verify with pan's default options: "errors: 0" over a completed search. liveness.pml
holds an LTL claim, which pan checks only with -a (acceptance cycles are off by default). Each
mutant_*.pml names, on its `expect:` line, what spin must find; the trail spin writes is replayed
to check that the violated assertion is that property, not some other one.

spin or gcc missing fails these tests, never skips them: .ci/run installs both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "model"
HOLDS = sorted(p.name for p in MODEL.glob("*.pml") if "mutant" not in p.name)
MUTANTS = sorted(p.name for p in MODEL.glob("*.pml") if "mutant" in p.name)
TIMEOUT = 300  # seconds per command; the largest run takes about 5 s on the 2-core machine


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `apt-get install -y spin gcc` (.ci/run does it)"
    return path


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _pan_flags(name: str) -> list[str]:
    """-a (acceptance cycles) for an LTL claim; nothing else: pan's defaults otherwise."""
    return ["-a"] if "liveness" in name else []


def verify(tmp_path: Path, name: str) -> str:
    """Copy the model into tmp_path, build its verifier there, run it; pan's report."""
    spin, gcc = _tool("spin"), _tool("gcc")
    for source in MODEL.glob("*.pml"):
        shutil.copy(source, tmp_path)
    _run([spin, "-a", name], tmp_path)
    _run([gcc, "-O2", "-o", "pan", "pan.c"], tmp_path)
    return _run(["./pan", *_pan_flags(name)], tmp_path)


def errors(report: str) -> int:
    found = re.search(r"errors: (\d+)", report)
    assert found, f"pan printed no error count:\n{report}"
    return int(found.group(1))


def violated_property(tmp_path: Path, name: str) -> str:
    """Replay the trail; the property named by the failed assertion (`assert(P2_...)` -> P2)."""
    replay = _run([_tool("spin"), "-t", name], tmp_path)
    where = re.search(r"spin: (\S+\.pml):(\d+), Error: assertion violated", replay)
    assert where, f"the trail of {name} ends in no assertion:\n{replay[-3000:]}"
    line = (tmp_path / where.group(1)).read_text().splitlines()[int(where.group(2)) - 1]
    named = re.search(r"assert\((P\d)_", line)
    assert named, f"{where.group(1)}:{where.group(2)} checks no property: {line.strip()}"
    return named.group(1)


def expected(name: str) -> str:
    found = re.search(r"expect: (.+)", (MODEL / name).read_text())
    assert found, f"{name} says on no `expect:` line what spin must find"
    return found.group(1).strip()


def test_the_issue_s_mutants_are_kept() -> None:
    assert "apply.pml" in HOLDS
    assert {"mutant_no_settle.pml", "mutant_no_cancel_extras.pml", "mutant_local_clock.pml"} <= set(MUTANTS)


@pytest.mark.parametrize("name", HOLDS)
def test_model_holds(tmp_path: Path, name: str) -> None:
    report = verify(tmp_path, name)
    assert "Search not completed" not in report and "max search depth too small" not in report, report
    assert errors(report) == 0, report
    assert not list(tmp_path.glob("*.trail")), report


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_is_refuted(tmp_path: Path, name: str) -> None:
    report = verify(tmp_path, name)
    assert errors(report) >= 1, f"spin found no counterexample to {name}:\n{report}"
    assert (tmp_path / f"{name}.trail").is_file(), f"pan wrote no trail for {name}:\n{report}"
    want = expected(name)
    if re.fullmatch(r"P\d", want):
        assert violated_property(tmp_path, name) == want
    else:
        assert want in report, report
