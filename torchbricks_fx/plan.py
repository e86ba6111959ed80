"""Per-stage planning: resolve names, validate, order topologically and prune.  Pure data, no tensors.

A :class:`StagePlan` is what every runtime executes: the eager collection, the ``torch.fx`` stage module
and the exporters.  Planning is linear in the number of bricks and names (plus a heap for the order).
"""

from __future__ import annotations

import difflib
import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torchbricks_fx.bricks import STAGE_INPUT, Brick
from torchbricks_fx.errors import BrickGraphError
from torchbricks_fx.stage import Stage

__all__ = ["BrickSpec", "FrozenMap", "StagePlan", "make_plan", "merge_stage_problems", "spec_problems",
           "stage_problems"]

# Stage-specific problems carry this token so that ``check`` can merge one problem seen in several stages.
STAGE_TOKEN = "\x00stage\x00"

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
    """One brick's connections with every name resolved to a value name.  ``args`` are positional,
    ``kwargs`` are ``(argument, value name)`` pairs; ``takes_all`` bricks receive a dict of every value
    available before them."""

    name: str
    index: int
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...]
    takes_all: bool
    outputs: tuple[str, ...]
    alive: frozenset[Stage]
    in_graph: bool
    side_effects: bool
    blocks_gradients: bool

    @property
    def input_values(self) -> tuple[str, ...]:
        """Value names read (the stage constant excluded)."""
        return tuple(v for v in (*self.args, *(v for _, v in self.kwargs)) if v != STAGE_INPUT)


@dataclass(frozen=True)
class StagePlan:
    """What runs in one stage: live bricks in execution order, the external inputs they need, the outputs
    returned and, for every brick that does not run, why.  ``all_inputs`` maps each ``"all"`` brick to the
    values it reads besides the stage's external inputs: the outputs of the live bricks declared before it."""

    stage: Stage
    steps: tuple[BrickSpec, ...]
    required_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    pruned: Mapping[str, str] = field(default_factory=FrozenMap)
    all_inputs: Mapping[str, tuple[str, ...]] = field(default_factory=FrozenMap)

    @property
    def bricks(self) -> tuple[str, ...]:
        """Names of the bricks that run, in execution order (metric bricks included)."""
        return tuple(step.name for step in self.steps)

    def describe(self) -> str:
        lines = [f"stage {self.stage.value}:",
                 f"  inputs:  {', '.join(self.required_inputs) or '-'}",
                 f"  bricks:  {', '.join(self.bricks) or '-'}",
                 f"  outputs: {', '.join(self.outputs) or '-'}"]
        lines += [f"  pruned:  {name} ({reason})" for name, reason in self.pruned.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- names
def _name_problem(brick: str, name: object, role: str) -> str | None:
    if not isinstance(name, str) or not name or name != name.strip():
        return f"Brick {brick!r}: {role} name {name!r} is malformed (names are non-empty strings without " \
               f"surrounding spaces)."
    if role == "output" and name == STAGE_INPUT:
        return f"Brick {brick!r}: output name {STAGE_INPUT!r} is reserved (it passes the current stage)."
    return None


def resolve_name(name: str, scope: tuple[str, ...], brick: str) -> tuple[str | None, str | None]:
    """Resolves relative names (``./x`` in the brick's collection, ``../x`` in its parent) to a global
    value name ``a/b/x``; plain names are global.  Returns ``(name, problem)``."""
    if not (name.startswith("./") or name.startswith("../")):
        return name, None
    parts = list(scope)
    rest = name
    while True:
        if rest.startswith("./"):
            rest = rest[2:]
        elif rest.startswith("../"):
            if not parts:
                return None, (f"Brick {brick!r}: relative name {name!r} goes above the root collection "
                              f"(the brick is at {'/'.join(scope) or 'the root'}).")
            parts.pop()
            rest = rest[3:]
        else:
            break
    if not rest:
        return None, f"Brick {brick!r}: relative name {name!r} names no value."
    return "/".join([*parts, rest]), None


def make_spec(name: str, index: int, scope: tuple[str, ...], brick: Brick) -> tuple[BrickSpec, list[str]]:
    """Reads a brick's connections into a :class:`BrickSpec` and the problems found in its names."""
    problems: list[str] = []

    def resolve(value: object, role: str) -> str:
        problem = _name_problem(name, value, role)
        if problem:
            problems.append(problem)
            return str(value)
        resolved, problem = resolve_name(str(value), scope, name)
        if problem:
            problems.append(problem)
        return resolved or str(value)

    binding = brick.input_names
    args: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, str], ...] = ()
    if isinstance(binding, dict):
        for argument in binding:
            if not isinstance(argument, str) or not argument.isidentifier():
                problems.append(f"Brick {name!r}: keyword argument {argument!r} in input_names is not a valid "
                                f"argument name (input_names dicts map {{argument: value name}}).")
        kwargs = tuple((str(a), resolve(v, "input")) for a, v in binding.items())
    elif isinstance(binding, list):
        args = tuple(resolve(v, "input") for v in binding)
    outputs = tuple(resolve(v, "output") for v in brick.output_names)
    seen: set[str] = set()
    for output in outputs:
        if output in seen:
            problems.append(f"Brick {name!r}: output name {output!r} appears twice in its output_names.")
        seen.add(output)
    spec = BrickSpec(name=name, index=index, args=args, kwargs=kwargs, takes_all=binding == "all",
                     outputs=outputs, alive=frozenset(brick.alive_stages), in_graph=brick.runs_in_graph,
                     side_effects=brick.has_side_effects or not outputs, blocks_gradients=brick.blocks_gradients)
    return spec, problems


def spec_problems(entries: Iterable[tuple[str, tuple[str, ...], Brick]]) -> tuple[tuple[BrickSpec, ...], list[str]]:
    """Specs and name problems of ``(name, scope, brick)`` entries in declaration order."""
    specs: list[BrickSpec] = []
    problems: list[str] = []
    for index, (name, scope, brick) in enumerate(entries):
        spec, brick_problems = make_spec(name, index, scope, brick)
        specs.append(spec)
        problems += brick_problems
    return tuple(specs), problems


# --------------------------------------------------------------------------------------------- graph
def _closest(name: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" Closest existing names: {', '.join(map(repr, matches))}." if matches else ""


@dataclass(frozen=True)
class _StageGraph:
    live: tuple[BrickSpec, ...]
    producer: Mapping[str, BrickSpec]
    deps: Mapping[str, tuple[str, ...]]


def _stage_graph(specs: Sequence[BrickSpec], stage: Stage, problems: list[str]) -> _StageGraph:
    live = tuple(spec for spec in specs if stage in spec.alive)
    producers: dict[str, list[BrickSpec]] = {}
    for spec in live:
        for output in spec.outputs:
            producers.setdefault(output, []).append(spec)
    for value, owners in producers.items():
        if len(owners) > 1:
            problems.append(f"In {STAGE_TOKEN}: {value!r} is produced by more than one live brick: "
                            f"{', '.join(repr(o.name) for o in owners)}.")
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
                problems.append(f"Brick {spec.name!r} needs {value!r} in {STAGE_TOKEN}, but its producer "
                                f"{', '.join(map(repr, dead_producers[value]))} is not alive there."
                                + _closest(value, producers))
        deps[spec.name] = tuple(dict.fromkeys(needed))
        earlier.append(spec.name)
    return _StageGraph(live, {v: owners[0] for v, owners in producers.items()}, deps)


def _topological_order(graph: _StageGraph, stage: Stage, problems: list[str]) -> tuple[BrickSpec, ...]:
    """Kahn's algorithm; declaration order breaks ties.  Reports the bricks on a cycle."""
    by_name = {spec.name: spec for spec in graph.live}
    users: dict[str, list[str]] = {name: [] for name in by_name}
    missing = {name: 0 for name in by_name}
    for name, deps in graph.deps.items():
        for dep in deps:
            if dep == name:
                continue
            users[dep].append(name)
            missing[name] += 1
    self_loops = [name for name, deps in graph.deps.items() if name in deps]
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
        done = {spec.name for spec in order}
        problems.append(f"In {STAGE_TOKEN}: the bricks form a cycle: "
                        f"{' -> '.join(map(repr, _find_cycle(graph.deps, done)))}.")
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
def name_stages(problem: str, stages: Sequence[Stage]) -> str:
    """Fills a problem's stage token: "stage train" or "stages train, validation and test"."""
    names = [stage.value for stage in stages]
    text = f"stage {names[0]}" if len(names) == 1 else f"stages {', '.join(names[:-1])} and {names[-1]}"
    return problem.replace(STAGE_TOKEN, text)


def merge_stage_problems(problems_by_stage: Mapping[Stage, Sequence[str]]) -> list[str]:
    """One line per distinct problem, naming every stage it occurs in."""
    stages_of: dict[str, list[Stage]] = {}
    for stage, problems in problems_by_stage.items():
        for problem in problems:
            stages_of.setdefault(problem, []).append(stage)
    return [name_stages(problem, stages) for problem, stages in stages_of.items()]


def stage_problems(specs: Sequence[BrickSpec], stage: Stage,
                   outputs: Sequence[str] | None = None) -> tuple[StagePlan | None, list[str]]:
    """Plans ``stage``; returns ``(plan, [])`` or ``(None, problems)`` (problems carry ``STAGE_TOKEN``)."""
    problems: list[str] = []
    graph = _stage_graph(specs, stage, problems)
    order = _topological_order(graph, stage, problems)
    produced = [value for spec in order for value in spec.outputs]
    if outputs is not None:
        outputs = list(dict.fromkeys(outputs))
        for value in outputs:
            if value not in graph.producer:
                problems.append(f"Requested output {value!r} is not produced by any live brick in {STAGE_TOKEN}."
                                + _closest(value, produced))
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
    steps = tuple(spec for spec in order if spec.name in needed)
    # An "all" brick reads every external input of the stage, so a plan that keeps one requires them all.
    reading = order if any(spec.takes_all for spec in steps) else steps
    required = tuple(dict.fromkeys(v for spec in reading for v in spec.input_values if v not in graph.producer))
    pruned: dict[str, str] = {}
    for spec in specs:
        if stage not in spec.alive:
            pruned[spec.name] = f"dead in stage {stage.value}"
        elif spec.name not in needed:
            pruned[spec.name] = f"not needed for the requested outputs {list(outputs)}"
    all_inputs: dict[str, tuple[str, ...]] = {}
    for spec in steps:
        if spec.takes_all:
            deps = set(graph.deps[spec.name])
            all_inputs[spec.name] = tuple(v for dep in steps if dep.name in deps for v in dep.outputs)
    return StagePlan(stage=stage, steps=steps, required_inputs=required, outputs=outputs,
                     pruned=FrozenMap(pruned), all_inputs=FrozenMap(all_inputs))


def make_plan(specs: Sequence[BrickSpec], name_problems: Sequence[str], stage: Stage,
              outputs: Sequence[str] | None = None) -> StagePlan:
    """Plans ``stage`` or raises one :class:`BrickGraphError` listing every problem."""
    plan, problems = stage_problems(specs, stage, outputs)
    problems = [*name_problems, *problems]
    if problems or plan is None:
        raise BrickGraphError([name_stages(p, [stage]) for p in problems], hint=PLAN_HINT)
    return plan
