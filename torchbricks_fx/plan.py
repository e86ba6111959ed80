"""Per-stage planning: resolve names, validate, order topologically and prune.  Pure data, no tensors.

A :class:`StagePlan` is what every runtime executes (through ``runtime.BoundStage``): the eager
collection, the ``torch.fx`` stage module and the exporters.  Planning is linear in the number of bricks
and names (plus a heap for the order).
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from torchbricks_fx.binding import STAGE_INPUT, Binding
from torchbricks_fx.brick import Brick, CallableModule
from torchbricks_fx.errors import BrickGraphError, GraphProblem, stage_problem
from torchbricks_fx.stage import Stage

__all__ = ["BrickSpec", "StagePlan"]

PLAN_HINT = "collection.plan(stage) lists the bricks, required inputs and outputs of a stage " \
            "(or run `torchbricks-fx inspect FILE`)."

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, picklable mapping (``MappingProxyType`` cannot be pickled or deep-copied)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data or {})

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenMap, (self._data,)


@dataclass(frozen=True)
class BrickSpec:
    """One brick's connections with every name resolved to a value name.  In a plan's steps, the binding
    of an ``"all"`` brick lists the values it receives in that stage."""

    name: str
    index: int
    binding: Binding
    outputs: tuple[str, ...]
    alive: frozenset[Stage]
    in_graph: bool
    side_effects: bool
    blocks_gradients: bool
    metric_names: tuple[str, ...] = ()  # as ``summarize`` keys them: "group/name" in a nested group

    @property
    def input_values(self) -> tuple[str, ...]:
        """Value names read (the stage constant excluded)."""
        return self.binding.input_values

    @property
    def takes_all(self) -> bool:
        return self.binding.takes_all


@dataclass(frozen=True)
class StagePlan:
    """What runs in one stage: live bricks in execution order, the external inputs they need, the outputs
    returned and, for every brick that does not run, why."""

    stage: Stage
    steps: tuple[BrickSpec, ...]
    required_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    pruned: Mapping[str, str] = field(default_factory=FrozenMap)

    @property
    def bricks(self) -> tuple[str, ...]:
        """Names of the bricks that run, in execution order (metric bricks included)."""
        return tuple(step.name for step in self.steps)

    def producer(self, value: str) -> str | None:
        """The brick that produces ``value`` in this stage (``None`` for an external input)."""
        return next((step.name for step in self.steps if value in step.outputs), None)

    def describe(self) -> str:
        from torchbricks_fx.reporting import render_plan

        return render_plan(self)


# --------------------------------------------------------------------------------------------- names
def _name_problem(brick: str, name: object, role: str) -> GraphProblem | None:
    if not isinstance(name, str) or not name or name != name.strip():
        return GraphProblem("bad_name", f"Brick {brick!r}: {role} name {name!r} is malformed (names are non-empty "
                                        f"strings without surrounding spaces).", brick, str(name))
    if role == "output" and name == STAGE_INPUT:
        return GraphProblem("bad_name", f"Brick {brick!r}: output name {STAGE_INPUT!r} is reserved (it passes the "
                                        f"current stage).", brick, name)
    return None


def resolve_name(name: str, scope: tuple[str, ...], brick: str) -> tuple[str | None, GraphProblem | None]:
    """Resolves relative names (``./x`` in the brick's collection, ``../x`` in its parent) to a global
    value name ``a/b/x``; plain names are global.  Returns ``(name, problem)``."""
    if not (name.startswith("./") or name.startswith("../")):
        return name, None
    parts = list(scope)
    rest = name
    while rest.startswith(("./", "../")):
        if rest.startswith("./"):
            rest = rest[2:]
            continue
        if not parts:
            return None, GraphProblem("bad_name", f"Brick {brick!r}: relative name {name!r} goes above the root "
                                                  f"collection (the brick is at {'/'.join(scope) or 'the root'}).",
                                      brick, name)
        parts.pop()
        rest = rest[3:]
    if not rest:
        return None, GraphProblem("bad_name", f"Brick {brick!r}: relative name {name!r} names no value.", brick, name)
    return "/".join([*parts, rest]), None


def _keyword_names(brick: Brick) -> set[str] | None:
    """The keyword arguments the brick's module accepts, or ``None`` when unknown (``**kwargs``, builtins)."""
    model = getattr(brick, "model", None)
    target = model.fn if isinstance(model, CallableModule) else getattr(model, "forward", None)
    if target is None or not isinstance(model, nn.Module):
        return None
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _keyword_problems(name: str, brick: Brick, binding: dict[str, str]) -> list[GraphProblem]:
    problems = [GraphProblem("bad_argument", f"Brick {name!r}: keyword argument {argument!r} in input_names is not "
                                             f"a valid argument name (input_names dicts map {{argument: value name}}).",
                             name, str(argument))
                for argument in binding if not isinstance(argument, str) or not argument.isidentifier()]
    accepted = _keyword_names(brick)
    unknown = [a for a in binding if isinstance(a, str) and a.isidentifier() and accepted is not None
               and a not in accepted]
    if problems or not unknown or accepted is None:
        return problems
    module = type(getattr(brick, "model", brick)).__name__
    if all(value in accepted for value in binding.values()):
        swapped = {value: argument for argument, value in binding.items()}
        return [GraphProblem("bad_argument", f"Brick {name!r}: input_names {binding!r} looks written the other way "
                                             f"round: a dict maps {{argument: value name}}, and {unknown} are not "
                                             f"arguments of {module}.forward while {list(binding.values())} are. "
                                             f"Write input_names={swapped!r}.", name, unknown[0])]
    return [GraphProblem("bad_argument", f"Brick {name!r}: input_names names arguments {unknown} that "
                                         f"{module}.forward does not take (it takes {sorted(accepted)}); a dict maps "
                                         f"{{argument: value name}}.", name, unknown[0])]


def make_spec(name: str, index: int, scope: tuple[str, ...], brick: Brick) -> tuple[BrickSpec, list[GraphProblem]]:
    """Reads a brick's connections into a :class:`BrickSpec` and the problems found in its names."""
    problems: list[GraphProblem] = []

    def resolve(value: object, role: str) -> str:
        problem = _name_problem(name, value, role)
        if problem:
            problems.append(problem)
            return str(value)
        resolved, problem = resolve_name(str(value), scope, name)
        if problem:
            problems.append(problem)
        return resolved or str(value)

    names = brick.input_names
    if isinstance(names, dict):
        problems += _keyword_problems(name, brick, names)
        binding = Binding(kwargs=tuple((str(a), resolve(v, "input")) for a, v in names.items()))
    elif isinstance(names, list):
        binding = Binding(args=tuple(resolve(v, "input") for v in names))
    else:
        binding = Binding(takes_all=True)
    outputs = tuple(resolve(v, "output") for v in brick.output_names)
    for output in sorted({o for o in outputs if outputs.count(o) > 1}):
        problems.append(GraphProblem("duplicate_output", f"Brick {name!r}: output name {output!r} appears twice in "
                                                         f"its output_names.", name, output))
    spec = BrickSpec(name=name, index=index, binding=binding, outputs=outputs, alive=frozenset(brick.alive_stages),
                     in_graph=brick.runs_in_graph, side_effects=brick.has_side_effects or not outputs,
                     blocks_gradients=brick.blocks_gradients,
                     metric_names=tuple("".join(f"{part}/" for part in scope) + m for m in brick.metric_names))
    return spec, problems


def make_specs(entries: Iterable[tuple[str, tuple[str, ...], Brick]]) -> tuple[tuple[BrickSpec, ...],
                                                                                list[GraphProblem]]:
    """Specs and name problems of ``(name, scope, brick)`` entries in declaration order."""
    specs: list[BrickSpec] = []
    problems: list[GraphProblem] = []
    for index, (name, scope, brick) in enumerate(entries):
        spec, brick_problems = make_spec(name, index, scope, brick)
        specs.append(spec)
        problems += brick_problems
    return tuple(specs), problems


# --------------------------------------------------------------------------------------------- graph
def closest_names(name: str, candidates: Iterable[str]) -> str:
    """" Closest existing names: 'a', 'b'." (or nothing), for error messages."""
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" Closest existing names: {', '.join(map(repr, matches))}." if matches else ""


@dataclass(frozen=True)
class _StageGraph:
    live: tuple[BrickSpec, ...]
    producer: Mapping[str, BrickSpec]
    deps: Mapping[str, tuple[str, ...]]


def _stage_graph(specs: Sequence[BrickSpec], stage: Stage, problems: list[GraphProblem]) -> _StageGraph:
    live = tuple(spec for spec in specs if stage in spec.alive)
    producers: dict[str, list[BrickSpec]] = {}
    for spec in live:
        for output in spec.outputs:
            producers.setdefault(output, []).append(spec)
    for value, owners in producers.items():
        if len(owners) > 1:
            problems.append(stage_problem("duplicate_producer", f"In {{stages}}: {value!r} is produced by more than "
                                          f"one live brick: {', '.join(repr(o.name) for o in owners)}.",
                                          stage, owners[0].name, value))
    problems += _duplicate_metrics(live, stage, producers)
    dead_producers: dict[str, list[str]] = {}
    for spec in specs:
        if stage not in spec.alive:
            for output in spec.outputs:
                dead_producers.setdefault(output, []).append(spec.name)
    deps: dict[str, tuple[str, ...]] = {}
    earlier: list[str] = []
    for spec in live:
        needed: list[str] = list(earlier) if spec.takes_all else []
        for value in spec.input_values:
            if value in producers:
                needed.append(producers[value][0].name)
            elif value in dead_producers:
                dead = ", ".join(map(repr, dead_producers[value]))
                problems.append(stage_problem(
                    "dead_producer", f"Brick {spec.name!r} needs {value!r} in {{stages}}, but its producer {dead} is "
                    f"not alive there." + closest_names(value, producers), stage, spec.name, value))
        deps[spec.name] = tuple(dict.fromkeys(needed))
        earlier.append(spec.name)
    return _StageGraph(live, {v: owners[0] for v, owners in producers.items()}, deps)


def _duplicate_metrics(live: Sequence[BrickSpec], stage: Stage,
                       producers: Mapping[str, list[BrickSpec]]) -> list[GraphProblem]:
    """Metric names computed by more than one live brick: ``summarize`` (and what Lightning logs) would
    keep one.  Returned values clashing too are already duplicate producers."""
    owners: dict[str, list[str]] = {}
    for spec in live:
        for name in spec.metric_names:
            owners.setdefault(name, []).append(spec.name)
    return [stage_problem("duplicate_metric", f"In {{stages}}: metric {name!r} is computed by more than one brick: "
                          f"{', '.join(map(repr, bricks))}; summarize would report only one. Name them apart "
                          f"(BrickMetricSingle(..., metric_name='...'), BrickMetrics({{'name': metric}})) or put "
                          f"the bricks in nested groups (keyed 'group/{name}').", stage, bricks[0], name)
            for name, bricks in owners.items() if len(bricks) > 1 and len(producers.get(name, ())) < 2]


def _topological_order(graph: _StageGraph, stage: Stage, problems: list[GraphProblem]) -> tuple[BrickSpec, ...]:
    """Kahn's algorithm; declaration order breaks ties.  Reports the bricks on a cycle."""
    by_name = {spec.name: spec for spec in graph.live}
    users: dict[str, list[str]] = {name: [] for name in by_name}
    missing = {name: 0 for name in by_name}
    for name, deps in graph.deps.items():
        for dep in deps:
            if dep != name:
                users[dep].append(name)
                missing[name] += 1
    self_loops = {name for name, deps in graph.deps.items() if name in deps}
    ready = [(by_name[n].index, n) for n, count in missing.items() if count == 0 and n not in self_loops]
    heapq.heapify(ready)
    order: list[BrickSpec] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(by_name[name])
        for user in users[name]:
            missing[user] -= 1
            if missing[user] == 0 and user not in self_loops:
                heapq.heappush(ready, (by_name[user].index, user))
    if len(order) < len(by_name):
        cycle = _find_cycle(graph.deps, {spec.name for spec in order})
        problems.append(stage_problem("cycle", f"In {{stages}}: the bricks form a cycle: "
                                      f"{' -> '.join(map(repr, cycle))}.", stage, cycle[0]))
    return tuple(order)


def _find_cycle(deps: Mapping[str, tuple[str, ...]], done: set[str]) -> list[str]:
    """One cycle among the bricks that could not be ordered, in data-flow order, returning to its start."""
    start = next(name for name in deps if name not in done)
    path: list[str] = []
    position: dict[str, int] = {}
    node = start
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = next(dep for dep in deps[node] if dep not in done)
    return [*path[position[node]:], node][::-1]


# --------------------------------------------------------------------------------------------- plan
def stage_problems(specs: Sequence[BrickSpec], stage: Stage,
                   outputs: Sequence[str] | None = None) -> tuple[StagePlan | None, list[GraphProblem]]:
    """Plans ``stage``; returns ``(plan, [])`` or ``(None, problems)``."""
    problems: list[GraphProblem] = []
    graph = _stage_graph(specs, stage, problems)
    order = _topological_order(graph, stage, problems)
    produced = [value for spec in order for value in spec.outputs]
    if outputs is not None:
        outputs = list(dict.fromkeys(outputs))
        for value in outputs:
            if value not in graph.producer:
                problems.append(stage_problem("unknown_output", f"Requested output {value!r} is not produced by any "
                                              f"live brick in {{stages}}." + closest_names(value, produced),
                                              stage, None, value))
    if problems:
        return None, problems
    selected = tuple(outputs) if outputs is not None else tuple(produced)
    return _prune(specs, stage, graph, order, selected), []


def _prune(specs: Sequence[BrickSpec], stage: Stage, graph: _StageGraph, order: tuple[BrickSpec, ...],
           outputs: tuple[str, ...]) -> StagePlan:
    needed: set[str] = set()
    stack = [graph.producer[v].name for v in outputs] + [s.name for s in order if s.side_effects]
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(graph.deps[name])
    kept = tuple(spec for spec in order if spec.name in needed)
    # An "all" brick reads every external input of the stage, so a plan that keeps one requires them all.
    reading = order if any(spec.takes_all for spec in kept) else kept
    required = tuple(dict.fromkeys(v for spec in reading for v in spec.input_values if v not in graph.producer))
    pruned: dict[str, str] = {}
    for spec in specs:
        if stage not in spec.alive:
            pruned[spec.name] = f"dead in stage {stage.value}"
        elif spec.name not in needed:
            pruned[spec.name] = f"not needed for the requested outputs {list(outputs)}"
    steps = tuple(_with_all_values(spec, required, kept, graph) if spec.takes_all else spec for spec in kept)
    return StagePlan(stage=stage, steps=steps, required_inputs=required, outputs=outputs, pruned=FrozenMap(pruned))


def _with_all_values(spec: BrickSpec, required: tuple[str, ...], kept: tuple[BrickSpec, ...],
                     graph: _StageGraph) -> BrickSpec:
    """An ``"all"`` brick receives the stage's external inputs, then the outputs of the live bricks declared
    before it (a model brick: of model bricks only, as metric bricks run after every model brick)."""
    deps = set(graph.deps[spec.name])
    earlier = tuple(v for dep in kept if dep.name in deps and (dep.in_graph or not spec.in_graph) for v in dep.outputs)
    binding = dataclasses.replace(spec.binding, all_values=tuple(dict.fromkeys((*required, *earlier))))
    return dataclasses.replace(spec, binding=binding)


def make_plan(specs: Sequence[BrickSpec], name_problems: Sequence[GraphProblem], stage: Stage,
              outputs: Sequence[str] | None = None) -> StagePlan:
    """Plans ``stage`` or raises one :class:`BrickGraphError` listing every problem."""
    plan, problems = stage_problems(specs, stage, outputs)
    problems = [*name_problems, *problems]
    if problems or plan is None:
        raise BrickGraphError(problems, hint=PLAN_HINT)
    return plan
