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
    state.edit_specs([("s1", 1, True)])
    state.apply_replace(faults=[], kill=None, name="s1")  # no batch yet: a create
    state.apply_replace(faults=[], kill=(2, "sent"), name="s1")
    state.check_quiet()


# Scenario: the state rolled back (a restored backup, an older commit) to before a forced
# replace. It names the cancelled original; the plan sees the same spec hash and plans a noop
# without looking at the server, so the replacement runs untracked and the spec's batch in the
# state is a cancelled one.
def test_a_state_restored_to_before_a_forced_replace_adopts_the_replacement(state):
    state.edit_specs([("s0", 0, False)])
    state.apply_replace(faults=[], kill=None, name="s0")  # no batch yet: a create
    state.apply_replace(faults=[], kill=None, name="s0")  # the replacement; the original is cancelled
    state.restore_backup()  # the state before the replace
    state.check_quiet()


# Scenario: the same rolled-back state, and the spec edited since. The next apply replaces the
# (cancelled) original with a batch of the new version, and nothing cancels the untracked
# replacement of the old version: two batches of one spec run.
def test_a_state_restored_to_before_a_forced_replace_then_an_edit_runs_one_batch(state):
    state.edit_specs([("s0", 0, False)])
    state.apply_replace(faults=[], kill=None, name="s0")
    state.apply_replace(faults=[], kill=None, name="s0")
    state.edit_specs([("s0", 1, True)])
    state.restore_backup()
    state.check_quiet()


# Scenario: the server's clock 1000 s behind ours, and `state rm` of a spec whose batch runs.
# The next apply looks for the spec's batch only down to our clock less CLOCK_MARGIN (600 s),
# misses the batch the server dated 1000 s back, and creates a second one.
def test_state_rm_with_the_server_clock_behind_ours_adopts_the_batch(state):
    state.start(skew=-1000.0, names={"s1"}, applied=True)
    state.state_rm(name="s1")
    state.apply(edits=[], faults=[])
    state.one_running_batch_per_spec_version()
    state.check_quiet()


# Scenario: the state file lost, and the spec edited since. The next apply finds no batch of the
# new version and creates one; the batch of the old version, which carries the spec's name, runs on
# beside it, tracked by nothing.
def test_a_lost_state_then_an_edit_leaves_one_batch_running(state):
    state.start(skew=0.0, names={"s1"}, applied=True)
    state.lose_state()
    state.edit_specs([("s1", 1, False)])
    state.check_quiet()


# Scenario: one 404 for a running batch that exists (a GET answered wrongly once). The plan
# takes the batch for gone and creates another; the first one runs on beside it.
def test_one_404_for_a_running_batch_makes_no_second_batch(state):
    state.start(skew=0.0, names={"s0"}, applied=True)
    state.apply(edits=[], faults=[("one 404 for a batch that exists", 1)])
    state.one_running_batch_per_spec_version()
    state.check_quiet()


# Scenario: a spec removed (its batch cancelled), then put back as it was. The plan finds the
# cancelled batch by its tags (same name, same spec hash) and adopts it: the state names a
# cancelled batch, the plan is a noop, and the spec never runs again.
def test_a_spec_removed_then_put_back_runs_again(state):
    state.start(skew=0.0, names={"s2"}, applied=True)
    state.apply(edits=[("s2", None, False)], faults=[])  # removed: its batch is cancelled
    state.edit_specs([("s2", 0, False)])  # back, exactly as it was
    state.check_quiet()


# Scenario: a create held by the server past the settling window (it lands after its client
# looked twice and sent it again). Nothing can stop the second batch being made; the net, the
# next apply, must cancel one of the two.
def test_a_create_that_lands_late_is_cancelled_by_the_next_apply(state):
    state.start(skew=0.0, names={"s0"}, applied=False)
    state.apply(edits=[], faults=[("create held until released (late)", 1)])
    state.one_running_batch_per_spec_version()
    state.late_creates_land()
    state.check_quiet()


# Scenario: an apply killed just after it sent a create (request 4: its answer dies with it),
# then the spec edited. The next apply finds no batch of the new version and creates one; the
# killed apply's batch, of the old version, is never cancelled and runs beside it.
def test_a_create_cut_off_by_a_kill_then_an_edit_leaves_one_batch_running(state):
    state.start(skew=0.0, names={"s1"}, applied=False)
    state.apply_killed(at=4, edits=[], faults=[], how="sent")
    state.apply(edits=[("s1", 1, False)], faults=[])
    state.check_quiet()


# Scenario: a replace (the spec's input changed) killed just after it sent the new create, then
# the edit reverted. The next apply plans a noop for the old batch, warns that the killed apply's
# batch is not tracked, never cancels it, and never clears the intent: two batches of the spec
# run, and every plan walks the batch list for the intent.
def test_a_replace_cut_off_by_a_kill_then_reverted_leaves_one_batch_and_no_intent(state):
    state.start(skew=0.0, names={"s0"}, applied=True)
    state.apply_killed(at=4, edits=[("s0", 0, True)], faults=[], how="sent")
    state.apply(edits=[("s0", 0, False)], faults=[])
    state.check_quiet()


# Scenario: an apply killed after its create (the spec's shared input), the state lost, and the
# spec moved to its own input. The search went down only to the new input's upload, newer than
# the old batch, so the batch of the earlier version was never seen and ran on beside the new one.
def test_a_lost_state_then_a_new_input_cancels_the_batch_of_the_old_input(state):
    state.start(skew=0.0, names={"s0"}, applied=False)
    state.apply_killed(at=5, edits=[("s0", 0, True)], faults=[], how="unsent")
    state.lose_state()
    state.edit_specs([("s0", 0, False)])
    state.check_quiet()


# Scenario: the state restored to before a forced replace, then `apply --replace` again. The
# forced replace made a new batch and left the untracked replacement of the same spec running.
def test_a_forced_replace_on_a_state_restored_to_before_one_cancels_the_untracked_replacement(state):
    state.start(skew=0.0, names={"s1"}, applied=True)
    state.apply_replace(faults=[], kill=None, name="s1")
    state.restore_backup()
    state.apply_replace(faults=[], kill=None, name="s1")
    state.one_running_batch_per_spec_version()
    state.check_quiet()


# Scenario: a spec removed, the apply killed just after it sent the cancel (request 2: its answer
# dies with it), then the spec put back as it was. The state still named the batch, now
# cancelling, with the spec's hash: the plan kept it (noop), so the spec never ran again, as a
# batch cancelled by hand would not. The apply now marks the entry before it cancels
# (Entry.cancel_sent), and the put-back spec runs again, as after an apply that was not cut off.
def test_a_removal_killed_after_its_cancel_then_put_back_runs_again(state):
    state.start(skew=0.0, names={"s0"}, applied=True)
    state.apply_killed(at=2, edits=[("s0", None, False)], faults=[], how="sent")
    state.edit_specs([("s0", 0, False)])
    state.check_quiet()


# Scenario: the state's batch cancelled by hand (a deliberate stop of spending). The plan keeps it
# (noop: not run again unasked) and says so; the quiet check asks that the plan names
# `apply --replace`, which then runs it again.
def test_a_batch_cancelled_by_hand_is_kept_said_and_replaced_on_demand(state):
    state.start(skew=0.0, names={"s1"}, applied=True)
    state.cancel_by_hand(name="s1")
    state.check_quiet()
    state.apply_replace(faults=[], kill=None, name="s1")
    state.check_quiet()
    assert not state.cancelled_by_hand & {state.state_entries()["s1"]["batch"]["id"]}


# Scenario: a create held past the settling window (its apply looked twice and made the batch
# again), and that batch completed before the held create landed. Plans did not search a spec
# whose batch completed, so the late batch ran beside the state's, tracked by nothing. Plans now
# search a spec for remote.LATE_CREATE_WINDOW after its batch was made, and cancel a running batch
# beside a completed one as its duplicate.
def test_a_create_that_lands_after_its_spec_completed_is_cancelled(state):
    state.start(skew=0.0, names={"s0"}, applied=False)
    state.apply(edits=[], faults=[("create held until released (late)", 1)])
    state.time_passes(steps=3)
    state.time_passes(steps=3)
    state.late_creates_land()
    state.check_quiet()


# Scenario: the same late create, with the state lost (or `state rm`) after its batch completed.
# The rebuilt state adopted the completed batch and knew nothing of the create still held, so
# no plan searched the spec and the late batch ran untracked (the window needs no record of it).
@pytest.mark.parametrize("forget", ["lose_state", "state_rm"])
def test_a_create_that_lands_after_a_lost_state_adopted_its_completed_batch_is_cancelled(state, forget):
    state.start(skew=0.0, names={"s0"}, applied=False)
    state.apply(edits=[], faults=[("create held until released (late)", 1)])
    state.time_passes(steps=3)
    state.time_passes(steps=3)
    state.lose_state() if forget == "lose_state" else state.state_rm(name="s0")
    state.apply(edits=[], faults=[])
    state.late_creates_land()
    state.check_quiet()


# Scenario: a spec removed (its batch cancelled), put back as it was, and the apply that put it
# back killed after its intent (request 3, before its create). The next apply settled on the
# intent and looked for its batch: the look kept the newest of the spec's batches whatever their
# status, adopted the cancelled one, and the spec never ran again. A look adopts only a running or
# completed batch (remote.adoptable), as a plan does.
def test_a_spec_put_back_whose_apply_was_killed_is_not_given_its_cancelled_batch(state):
    state.start(skew=0.0, names={"s0", "s2"}, applied=True)
    state.apply_killed(at=6, edits=[("s2", None, False)], faults=[], how="unsent")
    state.apply_killed(at=3, edits=[("s2", 0, False)], faults=[], how="unsent")
    state.check_quiet()


# Scenario: a forced replace of a spec whose batch had completed, then the state restored to
# before it. The restored state names the completed batch, and the replacement (same spec) runs
# untracked: a completed spec was not searched. It is searched for LATE_CREATE_WINDOW, and the
# running batch beside the completed one the state names is cancelled as its duplicate.
def test_a_state_restored_to_before_a_forced_replace_of_a_completed_batch_runs_one_batch(state):
    state.start(skew=0.0, names={"s0"}, applied=True)
    state.time_passes(steps=3)
    state.time_passes(steps=3)
    state.refresh(faults=[], kill=None)
    state.apply_replace(faults=[], kill=None, name="s0")
    state.restore_backup()
    state.check_quiet()
