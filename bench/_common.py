"""What the benches share: a sandbox server in its own process, timed child processes with
their own peak RSS, and plain-text tables."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

API_KEY = "sk-bench-not-a-secret"
CHECKOUT = Path(__file__).resolve().parent.parent
if str(CHECKOUT) not in sys.path:
    sys.path.insert(1, str(CHECKOUT))  # the benches import reconciler from this checkout too
# Children run the batchplan of this checkout, whatever else is installed.
CHILD_ENV = {"NO_COLOR": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}


@dataclass
class Run:
    """One child process: wall time, CPU time and peak RSS (its own, from wait4), what it printed."""

    seconds: float
    cpu_seconds: float
    max_rss_mb: float
    code: int
    out: str
    err: str


# Peak RSS on Linux is a high-water mark that survives fork and exec: a child started by a big
# parent reports at least the parent's size. So each command runs under this small trampoline,
# which forks it and reports the command's own wall time, CPU time, peak RSS and exit code.
TRAMPOLINE = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(sys.argv[1], "w") as fh:
    fh.write(f"{seconds} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run(args: list[str], *, cwd: Path | None = None, env: dict | None = None, check: bool = True) -> Run:
    """Run a command to completion and measure it (see TRAMPOLINE)."""
    with tempfile.TemporaryDirectory() as tmp:
        measured, out, err = Path(tmp) / "measured", Path(tmp) / "out", Path(tmp) / "err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            subprocess.run([sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(measured), *args], cwd=cwd,
                           env={**os.environ, **CHILD_ENV, **(env or {})}, stdin=subprocess.DEVNULL,
                           stdout=stdout, stderr=stderr, check=True)
        seconds, cpu, rss_kb, code = measured.read_text().split()
        result = Run(float(seconds), float(cpu), int(rss_kb) / 1024, int(code),
                     out.read_bytes().decode(errors="replace"), err.read_bytes().decode(errors="replace"))
    if check and result.code != 0:
        raise SystemExit(f"{' '.join(args)} exited {result.code}:\n{result.out}\n{result.err}")
    return result


def batchplan(*args: str) -> list[str]:
    """The batchplan command line, run with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "reconciler", *args]


class Server:
    """`batchplan sandbox serve` in its own process, on a free loopback port."""

    def __init__(self, latency: float = 0.0, step_seconds: float = 3600.0, world: Path | None = None):
        """`world`: a directory that holds the sandbox's world (one a bench wrote), else a new one in memory."""
        self.process = subprocess.Popen(
            batchplan("sandbox", "serve", "--port", "0", "--latency", str(latency),
                      "--step-seconds", str(step_seconds), *(["--dir", str(world)] if world else [])),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, **CHILD_ENV})
        line = self.process.stdout.readline()  # "batchplan sandbox listening on http://127.0.0.1:PORT/v1 ..."
        if "listening on " not in line:
            self.stop()
            raise SystemExit(f"the sandbox did not start: {line!r}")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.control = self.url.removesuffix("/v1") + "/_sandbox"

    def env(self) -> dict:
        return {"OPENAI_BASE_URL": self.url, "OPENAI_API_KEY": API_KEY}

    def reset_log(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.control + "/reset-log", data=b"", method="POST")).read()

    def requests(self) -> list[dict]:
        with urllib.request.urlopen(self.control + "/requests") as answer:
            return json.load(answer)["data"]

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Ctrl-C, as a user would: the server then removes its temp world (SIGTERM would leave it)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned table: text left, numbers right."""
    cells = [headers] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] in ("", "-") for row in rows)
               for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"batchplan-bench-{prefix}-"))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
