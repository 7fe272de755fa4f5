"""Failures the state machine of tests/test_stateful.py found, shrunk, as plain tests.

Each test replays the steps Hypothesis printed (shrunk further by hand where it gave up), and
ends with the machine's quiet check: every held create landed, one more apply (the net), then
at most one running batch per spec, the state names it, no intent is left, and the plan is
empty. The comment above each names the scenario.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.test_stateful import ApplyMachine


@pytest.fixture
def state() -> Iterator[ApplyMachine]:
    machine = ApplyMachine()
    yield machine
    machine.close()


# Scenario: a forced replace killed after it saved its intent, before its create (request 2 of
# `apply --replace` is the upload listing). The next apply plans a noop (no other batch carries
# the tags), so it never clears the intent: it stays in the state for good, and every plan
# walks the batch list for it.
def test_a_forced_replace_killed_before_its_create_leaves_no_intent(state):
    state.write_spec(name="s1", shared_input=True, version=1)
    state.apply_replace(faults=[], kill=None, name="s1")  # no batch yet: a create
    state.apply_replace(faults=[], kill=(2, "sent"), name="s1")
    state.check_quiet()


# Scenario: the state rolled back (a restored backup, an older commit) to before a forced
# replace. It names the cancelled original; the plan sees the same spec hash and plans a noop
# without looking at the server, so the replacement runs untracked and the spec's batch in the
# state is a cancelled one.
def test_a_state_restored_to_before_a_forced_replace_adopts_the_replacement(state):
    state.write_spec(name="s0", shared_input=False, version=0)
    state.apply_replace(faults=[], kill=None, name="s0")  # no batch yet: a create
    state.apply_replace(faults=[], kill=None, name="s0")  # the replacement; the original is cancelled
    state.restore_backup()  # the state before the replace
    state.check_quiet()


# Scenario: the same rolled-back state, and the spec edited since. The next apply replaces the
# (cancelled) original with a batch of the new version, and nothing cancels the untracked
# replacement of the old version: two batches of one spec run.
def test_a_state_restored_to_before_a_forced_replace_then_an_edit_runs_one_batch(state):
    state.write_spec(name="s0", shared_input=False, version=0)
    state.apply_replace(faults=[], kill=None, name="s0")
    state.apply_replace(faults=[], kill=None, name="s0")
    state.write_spec(name="s0", shared_input=True, version=1)
    state.restore_backup()
    state.check_quiet()
