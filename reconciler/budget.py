"""Budgets: the most a plan may cost, for one apply (`budget_usd:` in batchplan.yaml, the sum over
its creates and replaces) and per spec (`budget_usd:` in a spec).

A budget is held against the maximum of the estimates (input plus every request's output
bound; see estimate.py), so a plan within budget cannot cost more as far as batchplan counts.
A cost batchplan cannot know (a model with no price, a request with no output bound, an
uploaded input it cannot read) is never assumed to be cheap: under a budget it is a problem.

`over_budget` is pure: `plan` shows its findings as a warning, and `check_budget` refuses an
apply with them (OverBudget) before anything is written or sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import OverBudget
from .estimate import cost_range, unknown_cost, usd

if TYPE_CHECKING:
    from .plan import Change, Plan

NAMED_IN_TOTAL = 5  # a total over budget names its most expensive changes, not all of them


def over_budget(plan: Plan) -> list[str]:
    """Every way the plan's sending changes exceed a budget, one sentence each; [] when within."""
    return [*(p for c in plan.sending if (p := _spec_problem(c))), *_apply_problems(plan)]


def check_budget(plan: Plan) -> None:
    """Refuse a plan over a budget (OverBudget), naming the specs, the amounts and the budgets."""
    problems = over_budget(plan)
    if problems:
        raise OverBudget("\n".join(["over budget: apply refused; nothing was sent or written.",
                                    *(f"  {p}" for p in problems),
                                    "Raise the budget, bound the requests' output (max_completion_tokens, "
                                    "max_tokens, max_output_tokens), or apply fewer specs (--target NAME)."]))


def _spec_problem(change: Change) -> str | None:
    want = change.desired
    if want is None or want.budget_usd is None:
        return None
    budget = f"budget_usd {usd(want.budget_usd)}"
    why = unknown_cost(want, change.estimate)
    if why:
        return f"{change.name}: its cost is unknown ({why}), and its spec ({want.file}) sets {budget}"
    most = change.estimate.cost_usd_max
    return (f"{change.name}: may cost up to {usd(most)}, over the {budget} of its spec ({want.file})"
            if most > want.budget_usd else None)


def _apply_problems(plan: Plan) -> list[str]:
    if plan.budget_usd is None or not plan.sending:
        return []
    budget = f"budget_usd {usd(plan.budget_usd)}"
    unknown = [f"{c.name}: its cost is unknown ({why}), and batchplan.yaml sets {budget}"
               for c in plan.sending if (why := unknown_cost(c.desired, c.estimate))]
    if unknown:
        return unknown
    most = cost_range(c.estimate for c in plan.sending)[1]
    if most <= plan.budget_usd:
        return []
    dearest = sorted(plan.sending, key=lambda c: (-c.estimate.cost_usd_max, c.name))
    parts = [f"{c.name} {usd(c.estimate.cost_usd_max)}" for c in dearest[:NAMED_IN_TOTAL]]
    if len(dearest) > NAMED_IN_TOTAL:
        parts.append(f"and {len(dearest) - NAMED_IN_TOTAL} more")
    return [f"this apply may cost up to {usd(most)} ({', '.join(parts)}), over the {budget} of batchplan.yaml"]
