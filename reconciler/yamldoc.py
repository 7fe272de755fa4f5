"""YAML documents, read safely: the one reader of specs and batchplan.yaml.

PyYAML composes anchors and aliases (`&a`, `*a`) into shared nodes, which costs nothing;
what costs is every walk that follows them. Nine nested lists of nine aliases each (the
"billion laughs") are a 1 KB file that expands to 387 million nodes, and `&a [*a]` never
ends: `validate`, `plan` and `apply` each walked such a spec until memory ran out. So each
document is checked right after it is composed, before any walk: the nodes its aliases
repeat are counted, visiting each node as a walk would, and the count stops at a budget.
Specs get no budget at all (an alias in a spec only hides from a reviewer what a batch
gets); batchplan.yaml a small one (a price block shared by a few models).
"""

from __future__ import annotations

from collections.abc import Iterator

import yaml

# libyaml's loader is about 7x faster than the pure-Python one and just as safe; both give marks.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CONFIG_ALIAS_BUDGET = 1_000  # nodes the aliases of batchplan.yaml may repeat, in all


class AliasBudgetExceeded(yaml.YAMLError):
    """A document whose aliases repeat more nodes than allowed; `line` is where the refused alias is used."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def composed(text: str, alias_budget: int = 0) -> Iterator[tuple[yaml.Node, object]]:
    """Each document's node (for line numbers) and its value, checked against `alias_budget` first.

    Raises yaml.YAMLError (a MarkedYAMLError for syntax, with its line) or AliasBudgetExceeded."""
    loader = SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            check_aliases(node, alias_budget)
            yield node, loader.construct_document(node)
    finally:
        loader.dispose()


def check_aliases(root: yaml.Node, budget: int) -> None:
    """Walk the document as a reader would, without recursion; stop once aliases repeated `budget` nodes."""
    seen: set[int] = set()
    repeated = 0
    stack: list[tuple[yaml.Node, int]] = [(root, root.start_mark.line + 1)]
    while stack:
        node, line = stack.pop()
        if id(node) in seen:
            repeated += 1
            if repeated > budget:
                raise AliasBudgetExceeded(_refusal(budget), line)
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):  # reversed: popped in document order, the first alias is named
            stack += [(child, key.start_mark.line + 1) for key, value in reversed(node.value) for child in (value, key)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(child, line) for child in reversed(node.value)]


def _refusal(budget: int) -> str:
    if budget == 0:
        return ("YAML anchors and aliases (&name, *name) are not allowed in a spec; write the value out, so that "
                "a reviewer sees what the batch gets")
    return (f"YAML aliases here repeat more than {budget:,} values in all (an alias bomb, or a loop such as "
            "&a [*a]); write the values out")
