"""Per-stage diagrams as mermaid flowchart text (renders on GitHub, in notebooks and in mermaid.live)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torchbricks_fx.errors import BrickGraphError
from torchbricks_fx.plan import BrickSpec, StagePlan
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


def _plans(collection: BrickCollection, plan: StagePlan | None) -> list[StagePlan]:
    """The plans whose steps say what each ``"all"`` brick reads: the stage's, then its unpruned plan (for
    pruned bricks); or every stage that plans (an invalid stage draws its declared edges only)."""
    plans = [plan] if plan is not None else []
    for stage in [plan.stage] if plan is not None else Stage:
        with contextlib.suppress(BrickGraphError):
            plans.append(collection.plan(stage))
    return plans


def _sources(spec: BrickSpec, producers: Mapping[str, list[BrickSpec]], plans: Sequence[StagePlan],
             every_stage: bool) -> list[tuple[str, str | None]]:
    """``(value, producing brick or None for an input)`` of each edge into ``spec``.  Across all stages,
    every producer alive in a stage with the consumer feeds it (bricks alive in different stages may
    produce the same value); in one stage, the running producer."""
    edges: list[tuple[str, str | None]] = []
    for value in spec.input_values:
        owners = producers.get(value, [])
        if every_stage:
            owners = [o for o in owners if o.alive & spec.alive] or owners
        edges += [(value, o.name) for o in owners[:None if every_stage else 1]] or [(value, None)]
    for plan in plans if spec.takes_all else ():
        step = next((s for s in plan.steps if s.name == spec.name), None)
        if step is not None:
            edges += [(value, plan.producer(value)) for value in step.binding.all_values]
            if not every_stage:
                break
    return list(dict.fromkeys(edges))


def to_mermaid(collection: BrickCollection, stage: Stage | str | None = None,
               outputs: Sequence[str] | None = None) -> str:
    """Flowchart of the bricks, their named edges, the inputs and the outputs.  With a ``stage``, the
    stage's plan decides: its required inputs and outputs are shown and pruned bricks are greyed out with
    dashed edges.  Raises ``BrickGraphError`` when the stage is invalid."""
    specs, _ = collection.specs()
    bricks = collection.bricks()
    plan = collection.plan(parse_stage(stage), outputs) if stage is not None else None
    running = set(plan.bricks) if plan is not None else {s.name for s in specs}
    # A value's running producers come first, so the stage's real edges are the solid ones.
    producers: dict[str, list[BrickSpec]] = {}
    for spec in sorted(specs, key=lambda s: s.name not in running):
        for output in spec.outputs:
            producers.setdefault(output, []).append(spec)
    plans = _plans(collection, plan) if any(s.takes_all for s in specs) else []
    node_id = _Ids()
    title = f"stage {plan.stage.value}" if plan is not None else "all stages"
    lines = ["flowchart LR", f"  %% {title}"]
    inputs = list(plan.required_inputs) if plan is not None else sorted(
        {v for s in specs for v in s.input_values if v not in producers})
    lines += [f'  {node_id("in", name)}(["{_label(name)}"])' for name in inputs]
    for spec in specs:
        kind = type(bricks[spec.name]).__name__
        lines.append(f'  {node_id("b", spec.name)}["{_label(spec.name)}<br/><small>{_label(kind)}</small>"]')
    edges = []
    for spec in specs:
        arrow = "-->" if spec.name in running else "-.->"
        for value, producer in _sources(spec, producers, plans, every_stage=plan is None):
            source = node_id("b", producer) if producer is not None else node_id("in", value)
            if producer is None and value not in inputs:
                lines.append(f'  {source}(["{_label(value)}"])')
                inputs.append(value)
            edges.append(f"  {source} {arrow}|{_label(value)}| {node_id('b', spec.name)}")
    final = list(plan.outputs) if plan is not None else []
    for value in final:
        lines.append(f'  {node_id("out", value)}[["{_label(value)}"]]')
        edges.append(f"  {node_id('b', producers[value][0].name)} --> {node_id('out', value)}")
    lines += edges
    pruned = [s.name for s in specs if s.name not in running]
    if pruned:
        lines.append("  classDef pruned fill:#eeeeee,stroke:#bbbbbb,color:#999999,stroke-dasharray:3 3")
        lines.append(f"  class {','.join(node_id('b', n) for n in pruned)} pruned")
    return "\n".join(lines) + "\n"
