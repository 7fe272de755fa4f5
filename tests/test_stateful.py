"""The promise as a state machine: whatever happens, once quiet, one batch per spec (issue 20, part 3).

Hypothesis drives the real CLI (apply, `apply --replace`, refresh, `state rm`) in this process
against an in-process emulator, with random sequences of spec edits, kills between any two
requests, lost, late and one-off wrong answers, a server clock that lags or leads ours, time
passing on the server, a lost or rolled-back state, and a batch cancelled by hand. It checks:

- after every step (P1 of model/README.md): no spec version has two running batches, unless a
  create that landed late (a `hold` fault released) or a forced replace that was cut off made
  the second one, and no quiet step ran since;
- at every `quiet` step, and at the end: every held create has landed, one more apply (the net)
  succeeds, and then every spec has at most one running batch, the state names it (or, when
  none runs, a completed batch of the spec as it is now, or one cancelled by hand: settled too,
  never run again unasked, and the plan says so), no intent is left, and
  `plan --detailed-exitcode` finds nothing to do.

A kill is an apply cut off at its k-th request (`MortalTransport`): that request is never sent,
or is sent and its answer dies with the client; every later request of that run fails unsent.
The state is put back to its last write before the kill, as SIGKILL leaves it (the file is
written atomically; the saves in `finally` blocks that run here in-process never run there).
Requests in flight go on in the emulator's own threads, as on a real server.

The server's clock is `time.time() + skew + advanced`: batches move on only when `time_passes`
advances it (a step lasts STEP seconds), so the machine decides when a batch completes.

CI runs EXAMPLES (200) examples of up to STEPS steps, the same ones every run (derandomize: a
failure is never a flake, and one that appears came with the change under test). A nightly job,
or a hunt, sets BATCHPLAN_STATEFUL_EXAMPLES (5000: about half an hour): new random examples, and
the failures kept in .hypothesis/ in the working directory. A failure Hypothesis finds and shrinks
becomes a plain test in tests/test_stateful_regressions.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from reconciler.api import TEST_TRANSPORT
from reconciler.sandbox import Emulator, EmulatorTransport, Fault, Timing
from reconciler.startup import httpx
from tests.helpers import Repo, Result, env_for, run_cli
from tests.test_reliability import server_batches

NAMES = ("s0", "s1", "s2")
TIMEOUT = 0.25  # seconds per request, so each settling wait is short
SETTINGS = f"timeout: {TIMEOUT}\nmax_retries: 1\nparallelism: 1\n"  # one request at a time: kills replay
STEP = 100.0  # seconds of the server's clock per batch step
SKEWS = (0.0, -1000.0, 1000.0)  # the server's clock against ours: beyond remote.CLOCK_MARGIN (600 s)
LIVE = ("validating", "in_progress", "finalizing")
NIGHTLY = os.environ.get("BATCHPLAN_STATEFUL_EXAMPLES")
EXAMPLES = int(NIGHTLY or 200)  # 200: about 70 s on two cores, 2-3 min with both busy
STEPS = 16

CREATE, UPLOAD = r"^/v1/batches$", r"^/v1/files$"
FAULTS = {  # what one request of an apply may suffer; `nth` counts the requests the fault matches
    "create answer dropped": dict(action="drop_after_commit", method="POST", path_regex=CREATE),
    "create answered 500 after commit": dict(action="error_after_commit", method="POST", path_regex=CREATE),
    "create lands after the timeout": dict(action="stall", method="POST", path_regex=CREATE, seconds=TIMEOUT * 1.5),
    "create held until released (late)": dict(action="hold", method="POST", path_regex=CREATE),
    "upload answer dropped": dict(action="drop_after_commit", method="POST", path_regex=UPLOAD),
    "upload lands after the timeout": dict(action="stall", method="POST", path_regex=UPLOAD, seconds=TIMEOUT * 1.5),
    "one 404 for a batch that exists": dict(action="reject", method="GET", status=404,
                                            path_regex=r"^/v1/batches/batch_[0-9a-f]+$"),
    "cancel answer dropped": dict(action="drop_after_commit", method="POST", path_regex=r"/cancel$"),
}
FAULT_PLANS = st.lists(st.tuples(st.sampled_from(sorted(FAULTS)), st.integers(1, 2)), max_size=2)
EDIT = st.tuples(st.sampled_from(NAMES), st.none() | st.integers(0, 2), st.booleans())  # name, version, shared
EDITS = st.lists(EDIT, max_size=2)
KILLS = st.none() | st.tuples(st.integers(1, 8), st.sampled_from(["unsent", "sent"]))


def count(what: str) -> None:
    """Count it in `pytest --hypothesis-show-statistics` (a regression test replays steps outside Hypothesis)."""
    if currently_in_test_context():
        event(what)


class Killed(BaseException):
    """The CLI's process died here. A BaseException, so no `except Exception` of ours stops it."""


class MortalTransport(EmulatorTransport):
    """The emulator's in-process door, whose client can die at its k-th request.

    `kill_at(k, how, on_kill)`: request k is not sent ("unsent") or sent with its answer lost
    ("sent"); `on_kill` runs at that moment, and every request after it raises Killed unsent.
    """

    def __init__(self, emulator: Emulator, executor: ThreadPoolExecutor):
        super().__init__(emulator, executor=executor)
        self.kill_at()

    def kill_at(self, k: int | None = None, how: str = "unsent", on_kill=lambda: None) -> None:
        self._k, self._how, self._on_kill = k, how, on_kill
        self._sent, self.dead = 0, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.dead:
            raise Killed()
        self._sent += 1
        if self._k is None or self._sent < self._k:
            return await super().handle_async_request(request)
        self.dead = True
        self._on_kill()
        if self._how == "sent":
            try:
                await super().handle_async_request(request)  # it lands; nobody is left to read the answer
            except httpx.TransportError:
                pass
        raise Killed()


class ApplyMachine(RuleBasedStateMachine):
    """One repo, one state file, one server; see the module docstring for the steps and checks."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="batchplan-stateful-"))
        self.repo = Repo(self.tmp / "repo")
        (self.repo.root / "batchplan.yaml").write_text(SETTINGS)
        for name in (*NAMES, "shared"):
            self.repo.data(f"{name}.jsonl")
        self.specs: set[str] = set()  # the names specs/ holds
        self.skew, self.advanced = 0.0, 0.0
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="emulator")
        self.emulator = Emulator(timing=Timing.uniform(STEP), clock=self.server_clock)
        self.server = MortalTransport(self.emulator, self.pool)
        self.env = env_for(self.server)
        self.held = 0  # creates a `hold` fault holds now
        self.second_allowed: str | None = None  # why P1 need not hold until the next quiet step
        self.last_write: bytes | None = None
        self.cancelled_by_hand: set[str] = set()  # batch ids: settled, as a completed batch is

    def server_clock(self) -> float:
        return time.time() + self.skew + self.advanced

    # -- running the CLI ------------------------------------------------------------------

    def cli(self, *args: str, kill: tuple[int, str] | None = None) -> Result | None:
        """batchplan ARGS in this process; None when it was killed (its state as SIGKILL leaves it)."""
        token = TEST_TRANSPORT.set(self.server)
        if kill:
            self.server.kill_at(*kill, on_kill=self._remember_last_write)
        try:
            result = run_cli(*args, "-C", str(self.repo.root), env=self.env)
        except Killed:
            count(f"{args[0]} killed")
            self._restore_last_write()
            return None
        finally:
            self.server.kill_at()
            TEST_TRANSPORT.reset(token)
        assert result.code in (0, 1), result
        assert "Traceback" not in result.err and "Internal error" not in result.err, result.err
        return result

    def _remember_last_write(self) -> None:
        path = self.repo.state_path
        self.last_write = path.read_bytes() if path.exists() else None

    def _restore_last_write(self) -> None:
        path = self.repo.state_path
        if self.last_write is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(self.last_write)

    def with_faults(self, faults: list[tuple[str, int]], *args: str, kill=None) -> Result | None:
        self.server.set_faults([Fault(**FAULTS[kind], nth=nth) for kind, nth in faults])
        try:
            return self.cli(*args, kill=kill)
        finally:
            for (kind, _), status in zip(faults, self.server.fault_status()):
                if status["fired"]:
                    count(f"fault fired: {kind}")
                    self.held += status["fired"] if status["action"] == "hold" else 0
            self.server.clear_faults()

    # -- the steps ------------------------------------------------------------------------

    @initialize(skew=st.sampled_from(SKEWS), names=st.sets(st.sampled_from(NAMES), min_size=1, max_size=2),
                applied=st.booleans())
    def start(self, skew: float, names: set[str], applied: bool) -> None:
        """The server's clock against ours; a repo with a spec or two, applied cleanly or not yet."""
        self.skew = skew
        self.edit_specs([(name, 0, False) for name in sorted(names)])
        if applied:
            self.apply(edits=[], faults=[])

    @rule(edits=st.lists(EDIT, min_size=1, max_size=2))
    def edit_specs(self, edits: list[tuple[str, int | None, bool]]) -> None:
        """Write each spec (a version of its metadata, its own input or the shared one), or remove it
        (version None)."""
        for name, version, shared_input in edits:
            if version is not None:
                self.repo.spec(name, input=f"../data/{'shared' if shared_input else name}.jsonl",
                               metadata={"v": str(version)})
                self.specs.add(name)
            elif name in self.specs:
                self.specs.remove(name)
                self.repo.remove_spec(name)

    @rule(edits=EDITS, faults=FAULT_PLANS)
    def apply(self, edits: list[tuple[str, int | None, bool]], faults: list[tuple[str, int]]) -> None:
        """Edit specs, then apply: in one step, so that most applies have work for the faults to cut into."""
        self.edit_specs(edits)
        self.with_faults(faults, "apply", "--auto-approve")

    @rule(edits=EDITS, faults=FAULT_PLANS, at=st.integers(1, 8), how=st.sampled_from(["unsent", "sent"]))
    def apply_killed(self, edits: list[tuple[str, int | None, bool]], faults: list[tuple[str, int]], at: int,
                     how: str) -> None:
        """The same, killed at its `at`-th request (an apply sends 3 to 10 here), if it gets that far."""
        self.edit_specs(edits)
        self.with_faults(faults, "apply", "--auto-approve", kill=(at, how))

    @rule(name=st.sampled_from(NAMES), faults=FAULT_PLANS, kill=KILLS)
    def apply_replace(self, name: str, faults: list[tuple[str, int]], kill: tuple[int, str] | None) -> None:
        if name not in self.specs:
            return
        result = self.with_faults(faults, "apply", "--auto-approve", "--replace", name, kill=kill)
        if result is None or result.code != 0:  # the replacement (same spec) may run beside the old batch
            self.second_allowed = self.second_allowed or f"a forced replace of {name} was cut off"

    @rule(faults=FAULT_PLANS, kill=KILLS)
    def refresh(self, faults: list[tuple[str, int]], kill: tuple[int, str] | None) -> None:
        self.with_faults(faults, "refresh", kill=kill)

    @rule(name=st.sampled_from(NAMES))
    def state_rm(self, name: str) -> None:
        self.cli("state", "rm", name)

    @rule()
    def lose_state(self) -> None:
        self.repo.state_path.unlink(missing_ok=True)

    @rule()
    def restore_backup(self) -> None:
        """The state rolled back to before the last command that changed it (a restore, an old commit)."""
        backup = self.repo.state_path.with_name("batchplan.state.json.backup")
        if backup.exists():
            shutil.copyfile(backup, self.repo.state_path)

    @rule(name=st.sampled_from(NAMES))
    def cancel_by_hand(self, name: str) -> None:
        """Someone cancels the batch the state names for `name` (the dashboard): a deliberate stop of
        spending, which batchplan keeps (never runs it again unasked) and shows."""
        entry = self.state_entries().get(name)
        if entry and entry["batch"] and self.emulator.get_batch(entry["batch"]["id"])["status"] in LIVE:
            self.emulator.cancel_batch(entry["batch"]["id"])
            self.cancelled_by_hand.add(entry["batch"]["id"])

    @rule(steps=st.integers(1, 3))
    def time_passes(self, steps: int) -> None:
        self.advanced += steps * STEP

    @rule()
    def late_creates_land(self) -> None:
        self.land_held_creates()

    @rule()
    def quiet(self) -> None:
        self.check_quiet()

    # -- the checks -----------------------------------------------------------------------

    def land_held_creates(self) -> None:
        if self.held:
            self.second_allowed = self.second_allowed or "a create landed late"
        self.held = 0
        self.server.release_held()
        assert self.server.wait_idle(), "a request is still being handled"

    def check_quiet(self) -> None:
        """Every create landed, the net ran: one batch per spec, the state names it, plan is empty."""
        self.land_held_creates()
        net = self.cli("apply", "--auto-approve")
        assert net is not None and net.code == 0, net
        self.second_allowed = None
        entries = self.state_entries()
        intents = sorted(n for n, e in entries.items() if e["intent"])
        assert not intents, f"an intent is left in the state for {intents}"
        live = self.live_batches()
        stopped = []  # specs whose recorded batch was cancelled by hand: the plan must say so
        for name in sorted(self.specs):
            running = [b["id"] for b in live.get(name, [])]
            assert len(running) <= 1, f"{name}: {len(running)} batches running: {running}"
            entry = entries.get(name)
            assert entry and entry["batch"], f"{name}: the state names no batch"
            recorded = self.emulator.get_batch(entry["batch"]["id"])
            by_hand = recorded["id"] in self.cancelled_by_hand and recorded["status"] in ("cancelling", "cancelled")
            stopped += [name] * by_hand
            assert by_hand or recorded["status"] in (*LIVE, "completed"), \
                f"{name}: the state names a {recorded['status']} batch"
            assert recorded["metadata"]["batchplan_spec"] == entry["spec_hash"]
            assert running in ([], [recorded["id"]]), f"{name}: {running} runs, the state names {recorded['id']}"
        plan = self.cli("plan", "--detailed-exitcode")
        assert plan is not None and plan.code == 0, plan.out + plan.err
        for name in stopped:
            assert f"`batchplan apply --replace {name}` runs it again" in plan.out, plan.out

    def state_entries(self) -> dict[str, dict]:
        """The state's entries by name, as the file has them (none when there is no file)."""
        return self.repo.state()["entries"] if self.repo.state_path.exists() else {}

    def live_batches(self) -> dict[str, list[dict]]:
        """Spec name -> its running batches on the server."""
        live: dict[str, list[dict]] = {}
        for batch in server_batches(self.server):
            name = (batch.get("metadata") or {}).get("batchplan_name")
            if name and batch["status"] in LIVE:
                live.setdefault(name, []).append(batch)
        return live

    @invariant()
    def one_running_batch_per_spec_version(self) -> None:
        """P1: a second running batch of one spec version only ever comes from a late create, or from a
        forced replace (the new batch has the old one's spec) cut off before it cancelled the old batch."""
        if self.second_allowed:
            return
        for name, batches in self.live_batches().items():
            versions = [b["metadata"]["batchplan_spec"] for b in batches]
            assert len(versions) == len(set(versions)), f"{name}: {[b['id'] for b in batches]}"

    def teardown(self) -> None:
        """The last check, once quiet; Hypothesis calls this after the last step, failed or not."""
        try:
            if sys.exc_info()[0] is None:  # a step failed: let its error be the one reported
                self.check_quiet()
        finally:
            self.close()

    def close(self) -> None:
        self.server.release_held()
        self.pool.shutdown(wait=True)
        self.emulator.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# CI replays the same examples every run (derandomize: no flake, no database); a run with
# BATCHPLAN_STATEFUL_EXAMPLES set draws new ones and keeps its failures in .hypothesis/.
ApplyMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not NIGHTLY,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_apply_converges_whatever_happens = ApplyMachine.TestCase
