"""The queue: which new batches can be created now under each model's enqueued-token limit.

The Batch API limits, per model and organization, the input tokens of the batches still
in flight (its "enqueued tokens"). A batch created over that limit is not refused: it is
accepted and fails a moment later with `token_limit_exceeded`. So batchplan decides itself
what fits, with the tokens it counts (reconciler/tokens.py), against the limits set in
`batchplan.yaml` (`Limits`, read by project.Settings):

    limits:
      gpt-4o-mini: {enqueued_tokens: 2000000}
      default: {enqueued_tokens: 500000}     # every model not named; omit for no limit

`schedule` is pure: it takes the candidates (the batches a plan would create), the tokens
batchplan's own running batches hold, and the limits, and returns a `Schedule` (create
now, queued with a phrase for the plan, or too big ever to run). It sends and writes
nothing. `plan_candidates` and `plan_in_flight` take them from a plan and the state, with
a `Weigh` the caller gives (operations.py reads the token cache). `failed_for_capacity`
tells a batch that failed for want of capacity (to be made again) from one that failed
for a reason of its own.

The queue is strictly first in, first out per model: candidates are taken in their
`order_key` order (a plan gives shards in shard order, specs in name order), and once one
waits for a model's capacity, every later candidate of that model waits behind it, even a
small one that would fit. Letting small batches jump ahead could starve a large one for
as long as small ones keep coming; FIFO makes the order of creates the order of the plan.
A candidate with several models (the API refuses such a file, but tokens are counted per
model all the same) stands in the queue of each of its models.

Each provider (providers.py) is another account on another server, with limits of its own:
the queues are kept per (provider, model). `schedule_by_provider` runs `schedule` once per
provider, with that provider's `limits:` (its profile's, else the top-level block) and the
tokens its own batches hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, RootModel

from .batch import BatchFields, BatchStatus
from .errors import PlanError

if TYPE_CHECKING:
    from .plan import Plan
    from .state import State
    from .tokens import FileTokens

# A batch's weight from the fields it is made from (its input), None when batchplan cannot count it.
Weigh = Callable[[BatchFields], "Mapping[str, int] | None"]

DEFAULT = "default"  # the key of `limits:` that applies to every model not named
CAPACITY_ERROR = "token_limit_exceeded"  # the code of a batch the API failed for want of capacity
_UNITS = ((10**9, "B"), (10**6, "M"), (10**3, "k"))
_SHARD_NAME = re.compile(r"(?P<spec>.+)\[(?P<index>\d+)\]")  # shards.py names shard K of NAME `NAME[K]`


class ModelLimit(BaseModel):
    """One entry of `limits:`: how many input tokens this model may have in flight at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enqueued_tokens: int = Field(gt=0, strict=True)


class Limits(RootModel[dict[str, ModelLimit]]):
    """The `limits:` block of batchplan.yaml: model name (or `default`) -> ModelLimit.

    Model names match exactly, as the API names them in a request body: a limit for
    `gpt-4o-mini` does not cover `gpt-4o-mini-2024-07-18` (give it its own, or a default).
    """

    model_config = ConfigDict(frozen=True)

    root: dict[str, ModelLimit] = Field(default_factory=dict)

    def limit_for(self, model: str) -> int | None:
        """The model's enqueued-token limit: its own, else the default, else None (no limit)."""
        found = self.root.get(model) or self.root.get(DEFAULT)
        return None if found is None else found.enqueued_tokens


@dataclass(frozen=True)
class Candidate:
    """A batch a plan would create (one spec, or one shard of one).

    tokens:    its input tokens per model, as batchplan counts them (see `weight`). A valid
               batch has one model; each model's share counts against that model's limit.
    order_key: its place in the queue, e.g. (spec name, shard index); ties go by name.
    requests:  how many requests it holds (0: unknown), to suggest a shard size when too big.
    """

    name: str
    tokens: Mapping[str, int]
    order_key: tuple = ()
    requests: int = 0
    provider: str | None = None  # where it is created (None: the environment's): its queues are that provider's


class Waiting(NamedTuple):
    """A candidate left in the queue, and the phrase a plan shows for it."""

    candidate: Candidate
    phrase: str


class TooBig(NamedTuple):
    """A candidate over a model's whole limit: it could never run. `message` says what to do."""

    candidate: Candidate
    message: str


@dataclass(frozen=True)
class Schedule:
    """What to create now, what waits (in queue order), and what can never run."""

    now: tuple[Candidate, ...] = ()
    queued: tuple[Waiting, ...] = ()
    too_big: tuple[TooBig, ...] = ()

    def check(self) -> None:
        """Raise PlanError naming every candidate too big to run: a plan with one is refused."""
        if self.too_big:
            raise PlanError("\n".join(item.message for item in self.too_big))


def weight(tokens: FileTokens) -> dict[str, int]:
    """A batch's weight against the limits: its input tokens per model, as batchplan counts them."""
    return {m.model: m.input_tokens for m in tokens.models}


def tokens_in_flight(weights: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The tokens per model that batches still in flight hold: the sum of their weights.

    "In flight" is validating, in_progress or finalizing (the caller picks the batches).
    """
    total: dict[str, int] = {}
    for batch in weights:
        for model, tokens in batch.items():
            total[model] = total.get(model, 0) + tokens
    return total


def queue_order(name: str) -> tuple[str, int]:
    """A change's place in the queue: its spec's name, then its shard index (`big[10]` after `big[2]`)."""
    shard = _SHARD_NAME.fullmatch(name)
    return (shard["spec"], int(shard["index"])) if shard else (name, 0)


def plan_candidates(plan: Plan, weigh: Weigh) -> list[Candidate]:
    """The batches a plan would make: each change that sends requests, weighed by its input.

    One batchplan cannot count (an uploaded file, an endpoint it does not count) weighs
    nothing, so it never waits: the server is the judge of it."""
    return [Candidate(c.name, dict(weigh(c.desired.fields()) or {}), queue_order(c.name), c.desired.requests or 0,
                      c.desired.provider)
            for c in plan.sending if c.desired is not None]


def plan_in_flight(state: State | None, plan: Plan, weigh: Weigh) -> dict[str | None, dict[str, int]]:
    """provider -> the tokens per model that batchplan's own batches in flight there hold, as the plan saw them.

    In flight: validating, in_progress or finalizing (the API counts a batch from its
    creation). The state's batches (with the statuses the plan read: a replaced batch still
    running counts until it is cancelled), and the running ones the plan adopts."""
    entries = state.entries if state else {}
    held = [(entry.fields, weigh(entry.fields)) for name, entry in entries.items()
            if (record := plan.refreshed.get(name) or entry.batch) and record.running]
    held += [(c.desired.fields(), weigh(c.desired.fields())) for c in plan.changes
             if c.found and c.desired and BatchStatus(c.found.get("status")).running]
    by_provider: dict[str | None, list[Mapping[str, int]]] = {}
    for fields, weighed in held:
        if weighed:
            by_provider.setdefault(fields.provider, []).append(weighed)
    return {provider: tokens_in_flight(weights) for provider, weights in by_provider.items()}


def schedule(candidates: Iterable[Candidate], in_flight: Mapping[str, int], limits: Limits) -> Schedule:
    """Split candidates into those to create now and those that wait, strictly FIFO per model.

    A candidate is created now when, for each of its models with a limit, the tokens in
    flight plus its own stay within the limit and no earlier candidate of that model
    waits. One over a model's whole limit is too big (it never blocks the queue: it is
    never created). Models without a limit never make a candidate wait.
    """
    held = dict(in_flight)
    waiting_behind: dict[str, str] = {}  # model -> the first queued candidate of that model
    now, queued, too_big = [], [], []
    for candidate in sorted(candidates, key=lambda c: (c.order_key, c.name)):
        limited = {model: (tokens, limit) for model, tokens in sorted(candidate.tokens.items())
                   if (limit := limits.limit_for(model)) is not None}
        over = [model for model, (tokens, limit) in limited.items() if tokens > limit]
        blocked = [model for model, (tokens, limit) in limited.items()
                   if model in waiting_behind or held.get(model, 0) + tokens > limit]
        if over:
            too_big.append(TooBig(candidate, too_big_message(candidate, over[0], limited[over[0]][1])))
        elif blocked:
            queued.append(Waiting(candidate, queued_phrase({m: limited[m] for m in blocked}, waiting_behind)))
            for model in limited:  # it stands in the queue of each of its models
                waiting_behind.setdefault(model, candidate.name)
        else:
            now.append(candidate)
            for model, tokens in candidate.tokens.items():
                held[model] = held.get(model, 0) + tokens
    return Schedule(tuple(now), tuple(queued), tuple(too_big))


def schedule_by_provider(candidates: Iterable[Candidate], in_flight: Mapping[str | None, Mapping[str, int]],
                         limits_of: Callable[[str | None], Limits]) -> Schedule:
    """`schedule` on each provider's candidates, against the tokens its batches hold (`in_flight`,
    provider -> model -> tokens) and its limits (`limits_of(provider)`): the queues are kept per
    (provider, model). The parts in provider order, the environment's first."""
    groups: dict[str | None, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.provider, []).append(candidate)
    parts = [schedule(groups[p], in_flight.get(p, {}), limits_of(p)) for p in sorted(groups, key=lambda p: p or "")]
    return Schedule(tuple(c for s in parts for c in s.now), tuple(w for s in parts for w in s.queued),
                    tuple(b for s in parts for b in s.too_big))


def queued_phrase(limited: Mapping[str, tuple[int, int]], waiting_behind: Mapping[str, str]) -> str:
    """`queued: waits for 1.2M of 2M enqueued tokens of gpt-4o-mini`, per model with a limit.

    The first number is the batch's own tokens of that model, the second the model's limit;
    `(after NAME)` says it waits its turn behind an earlier queued batch.
    """
    parts = []
    for model, (tokens, limit) in limited.items():
        after = f" (after {waiting_behind[model]})" if model in waiting_behind else ""
        parts.append(f"{human_tokens(tokens)} of {human_tokens(limit)} enqueued tokens of {model}{after}")
    return "queued: waits for " + ", ".join(parts)


def too_big_message(candidate: Candidate, model: str, limit: int) -> str:
    tokens = candidate.tokens[model]
    message = (f"{candidate.name}: {tokens:,} input tokens of {model} are more than its whole enqueued "
               f"token limit ({limit:,}), so the batch could never run; split it with `shard.max_requests` "
               f"in its spec")
    if candidate.requests:  # the average request's size says roughly how many fit
        fit = max(1, limit * candidate.requests // tokens)
        message += f" (about {fit:,} of its requests fit under the limit)"
    return message


def failed_for_capacity(batch: object) -> bool:
    """Whether a batch failed only for want of enqueued-token capacity, so it should be made again.

    `batch` is the API's batch dict (`errors: {data: [...]}`) or a record whose `errors` is
    that data list (state.BatchRecord, or its JSON). True when it failed and any entry of
    its errors has the code `token_limit_exceeded`.
    """
    get = batch.get if isinstance(batch, Mapping) else lambda key: getattr(batch, key, None)
    errors = get("errors")
    if isinstance(errors, Mapping):
        errors = errors.get("data")
    return get("status") == "failed" and any(
        isinstance(entry, Mapping) and entry.get("code") == CAPACITY_ERROR for entry in errors or ())


def human_tokens(count: int) -> str:
    """A token count for people, to 3 significant digits: 950, 12.3k, 850k, 1.2M, 2M, 15B."""
    if count < 1000:
        return str(count)
    rounded = round(count, 3 - len(str(count)))  # exact for ints; 999,999 rounds to 1,000,000: unit after
    unit, suffix = next((unit, suffix) for unit, suffix in _UNITS if rounded >= unit)
    return f"{rounded / unit:.2f}".rstrip("0").rstrip(".") + suffix
