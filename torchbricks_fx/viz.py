"""Per-stage diagrams as mermaid flowchart text (renders on GitHub, in notebooks and in mermaid.live)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torchbricks_fx.plan import BrickSpec
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["to_mermaid"]


def _node_id(prefix: str, name: str) -> str:
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"


def _label(text: str) -> str:
    return text.replace('"', "#quot;")


def to_mermaid(collection: Any, stage: Stage | str | None = None, outputs: Sequence[str] | None = None) -> str:
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
    title = f"stage {plan.stage.value}" if plan is not None else "all stages"
    lines = ["flowchart LR", f"  %% {title}"]
    inputs = list(plan.required_inputs) if plan is not None else sorted(
        {v for s in specs for v in s.input_values if v not in producer})
    lines += [f'  {_node_id("in", name)}(["{_label(name)}"])' for name in inputs]
    for spec in specs:
        kind = type(bricks[spec.name]).__name__
        lines.append(f'  {_node_id("b", spec.name)}["{_label(spec.name)}<br/><small>{kind}</small>"]')
    edges = []
    for spec in specs:
        arrow = "-->" if spec.name in running else "-.->"
        for value in dict.fromkeys(spec.input_values):
            source = _node_id("b", producer[value].name) if value in producer else _node_id("in", value)
            if value not in producer and value not in inputs:
                lines.append(f'  {source}(["{_label(value)}"])')
                inputs.append(value)
            edges.append(f"  {source} {arrow}|{_label(value)}| {_node_id('b', spec.name)}")
    final = list(plan.outputs) if plan is not None else []
    for value in final:
        lines.append(f'  {_node_id("out", value)}[["{_label(value)}"]]')
        edges.append(f"  {_node_id('b', producer[value].name)} --> {_node_id('out', value)}")
    lines += edges
    pruned = [s.name for s in specs if s.name not in running]
    if pruned:
        lines.append("  classDef pruned fill:#eeeeee,stroke:#bbbbbb,color:#999999,stroke-dasharray:3 3")
        lines.append(f"  class {','.join(_node_id('b', n) for n in pruned)} pruned")
    return "\n".join(lines) + "\n"
