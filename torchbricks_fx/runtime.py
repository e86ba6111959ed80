"""What both runtimes (eager collection, compiled stage) share: bound steps and stage modes.

Kept tiny and allocation-light: this is the per-call hot path.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchbricks_fx.bricks import STAGE_INPUT, Brick, name_outputs
from torchbricks_fx.errors import BrickError, BrickGraphError
from torchbricks_fx.plan import BrickSpec, StagePlan, _closest

__all__ = ["BoundStep", "all_reads", "bind_steps", "check_inputs", "enter_modes", "exit_modes", "preserved_state",
           "run_steps", "stage_modules", "step_arguments"]


@dataclass(frozen=True)
class BoundStep:
    """A plan step bound to the callable that runs it in the plan's stage."""

    name: str
    fn: Callable[..., Any]
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...]
    takes_all: bool
    all_values: tuple[str, ...]
    outputs: tuple[str, ...]
    returns_dict: bool


def bind_steps(plan: StagePlan, steps: Sequence[BrickSpec], bricks: dict[str, Brick]) -> tuple[BoundStep, ...]:
    bound = []
    for spec in steps:
        brick = bricks[spec.name]
        bound.append(BoundStep(name=spec.name, fn=brick.stage_callable(plan.stage), args=spec.args,
                               kwargs=spec.kwargs, takes_all=spec.takes_all,
                               all_values=plan.all_inputs.get(spec.name, ()), outputs=spec.outputs,
                               returns_dict=not spec.in_graph and bool(spec.outputs)))
    return tuple(bound)


def run_steps(steps: Sequence[BoundStep], values: dict[str, Any], named_inputs: Mapping[str, Any]) -> None:
    """Runs ``steps`` in order, reading and writing ``values`` by name.  ``"all"`` bricks receive the
    external ``named_inputs`` and the outputs of the bricks declared before them."""
    step = None
    try:
        for step in steps:
            if step.takes_all:
                result = step.fn({**named_inputs, **{name: values[name] for name in step.all_values}})
            elif step.kwargs:
                result = step.fn(*[values[n] for n in step.args], **{a: values[n] for a, n in step.kwargs})
            else:
                result = step.fn(*[values[n] for n in step.args])
            outputs = step.outputs
            if len(outputs) == 1 and not isinstance(result, (tuple, dict)):
                values[outputs[0]] = result
            elif step.returns_dict:
                values.update((name, result[name]) for name in outputs)
            elif outputs:
                values.update(zip(outputs, name_outputs(step.name, result, outputs), strict=True))
    except Exception as error:
        if step is not None and not isinstance(error, BrickError) and hasattr(error, "add_note"):
            error.add_note(f"(raised in brick {step.name!r})")
        raise


def all_reads(plan: StagePlan, step: BrickSpec) -> tuple[str, ...]:
    """The values an ``"all"`` brick receives in a compiled stage: the stage's external inputs, then the
    outputs of the live bricks declared before it."""
    return tuple(dict.fromkeys((*plan.required_inputs, *plan.all_inputs.get(step.name, ()))))


def step_arguments(plan: StagePlan, step: BrickSpec, values: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments ``step`` is called with, read from ``values`` (the stage constant
    for ``"stage"``; a dict for ``"all"`` bricks).  For tools that call one brick at a time (profiling,
    export localization); ``run_steps`` inlines the same rules on the hot path."""
    if step.takes_all:
        return [{name: values[name] for name in all_reads(plan, step) if name in values}], {}

    def value(name: str) -> Any:
        return plan.stage if name == STAGE_INPUT else values[name]

    return [value(name) for name in step.args], {argument: value(name) for argument, name in step.kwargs}


def check_inputs(plan: StagePlan, named_inputs: dict[str, Any]) -> None:
    """Raises a :class:`BrickGraphError` naming each missing input and the bricks that need it."""
    missing = [name for name in plan.required_inputs if name not in named_inputs]
    if not missing:
        return
    produced = [v for step in plan.steps for v in step.outputs]
    problems = []
    for name in missing:
        users = [step.name for step in plan.steps if name in step.input_values]
        problems.append(f"Input {name!r} needed by brick {', '.join(map(repr, users))} in stage "
                        f"{plan.stage.value} is missing from named_inputs (given: {sorted(named_inputs)})."
                        + _closest(name, [*named_inputs, *produced]))
    raise BrickGraphError(problems, hint=f"this stage needs the inputs {list(plan.required_inputs)}; "
                                         "collection.plan(stage).required_inputs lists them.")


def stage_modules(roots: Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    """Every module under ``roots`` once, for the per-call mode check."""
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for module in root.modules():
            seen.setdefault(id(module), module)
    return tuple(seen.values())


def enter_modes(modules: Sequence[nn.Module], training: bool) -> list[nn.Module]:
    """Puts ``modules`` in the stage's mode; returns the ones it flipped (only those are restored)."""
    flipped = [m for m in modules if m.training is not training]
    for module in flipped:
        module.training = training
    return flipped


def exit_modes(flipped: Sequence[nn.Module], training: bool) -> None:
    for module in flipped:
        module.training = not training


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restores ``module``'s buffers (BatchNorm statistics move in TRAIN) and torchmetrics states (metric
    bricks update in TRAIN/VALIDATION/TEST) after the block: benchmarking or verifying a stage must not
    change the model or the metrics it has accumulated."""
    buffers = {(m, name): b.detach().clone() for m in module.modules() for name, b in m._buffers.items()
               if b is not None}
    metrics: dict[Any, tuple[Any, Any, Any]] = {
        m: (copy.deepcopy(m.metric_state), getattr(m, "_update_count", None), getattr(m, "_computed", None))
        for m in module.modules() if hasattr(m, "metric_state") and hasattr(m, "_defaults")}
    try:
        yield
    finally:
        with torch.no_grad():
            for (owner, name), saved in buffers.items():
                current = owner._buffers.get(name)
                if current is not None:
                    current.copy_(saved)
        for metric, (state, update_count, computed) in metrics.items():
            for name, value in state.items():
                setattr(metric, name, value)
            if update_count is not None:
                metric._update_count = update_count
            metric._computed = computed
