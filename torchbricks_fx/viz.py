"""Per-stage diagrams as mermaid flowchart text (renders on GitHub, in notebooks and in mermaid.live)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torchbricks_fx.plan import BrickSpec
from torchbricks_fx.stage import Stage, parse_stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__ = ["to_mermaid"]


class _Ids:
    """Mermaid node ids: readable (the name with other characters replaced) and unique, so names that differ
    only in replaced characters (``'a b'``, ``'a_b'``) stay separate nodes."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], str] = {}
        self._taken: set[str] = set()

    def __call__(self, prefix: str, name: str) -> str:
        key = (prefix, name)
        if key not in self._ids:
            base = f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
            candidate, suffix = base, 1
            while candidate in self._taken:
                candidate, suffix = f"{base}_{suffix}", suffix + 1
            self._taken.add(candidate)
            self._ids[key] = candidate
        return self._ids[key]


def _label(text: str) -> str:
    """Text safe inside a quoted mermaid label (entity codes for quotes, pipes and angle brackets)."""
    return (text.replace("#", "#35;").replace('"', "#quot;").replace("|", "#124;").replace("<", "#lt;")
            .replace(">", "#gt;"))


def to_mermaid(collection: BrickCollection, stage: Stage | str | None = None,
               outputs: Sequence[str] | None = None) -> str:
    """Flowchart of the bricks, their named edges, the inputs and the outputs.  With a ``stage``, the
    stage's plan decides: its required inputs and outputs are shown and pruned bricks are greyed out with
    dashed edges.  Raises ``BrickGraphError`` when the stage is invalid."""
    specs, _ = collection.specs()
    bricks = collection.bricks()
    plan = collection.plan(parse_stage(stage), outputs) if stage is not None else None
    running = set(plan.bricks) if plan is not None else {s.name for s in specs}
    # A value's running producer wins over a pruned one, so the stage's real edges are the solid ones.
    producer: dict[str, BrickSpec] = {}
    for spec in sorted(specs, key=lambda s: s.name not in running):
        for output in spec.outputs:
            producer.setdefault(output, spec)
    node_id = _Ids()
    title = f"stage {plan.stage.value}" if plan is not None else "all stages"
    lines = ["flowchart LR", f"  %% {title}"]
    inputs = list(plan.required_inputs) if plan is not None else sorted(
        {v for s in specs for v in s.input_values if v not in producer})
    lines += [f'  {node_id("in", name)}(["{_label(name)}"])' for name in inputs]
    for spec in specs:
        kind = type(bricks[spec.name]).__name__
        lines.append(f'  {node_id("b", spec.name)}["{_label(spec.name)}<br/><small>{_label(kind)}</small>"]')
    edges = []
    for spec in specs:
        arrow = "-->" if spec.name in running else "-.->"
        for value in dict.fromkeys(spec.input_values):
            source = node_id("b", producer[value].name) if value in producer else node_id("in", value)
            if value not in producer and value not in inputs:
                lines.append(f'  {source}(["{_label(value)}"])')
                inputs.append(value)
            edges.append(f"  {source} {arrow}|{_label(value)}| {node_id('b', spec.name)}")
    final = list(plan.outputs) if plan is not None else []
    for value in final:
        lines.append(f'  {node_id("out", value)}[["{_label(value)}"]]')
        edges.append(f"  {node_id('b', producer[value].name)} --> {node_id('out', value)}")
    lines += edges
    pruned = [s.name for s in specs if s.name not in running]
    if pruned:
        lines.append("  classDef pruned fill:#eeeeee,stroke:#bbbbbb,color:#999999,stroke-dasharray:3 3")
        lines.append(f"  class {','.join(node_id('b', n) for n in pruned)} pruned")
    return "\n".join(lines) + "\n"
