"""What both runtimes (eager collection, compiled stage) share: bound steps and stage modes.

Kept tiny and allocation-light: this is the per-call hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchbricks_fx.bricks import Brick, name_outputs
from torchbricks_fx.errors import BrickError, BrickGraphError
from torchbricks_fx.plan import BrickSpec, StagePlan, _closest

__all__ = ["BoundStep", "bind_steps", "check_inputs", "enter_modes", "exit_modes", "run_steps", "stage_modules"]


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


def stage_modules(bricks: Sequence[Brick]) -> tuple[nn.Module, ...]:
    """Every module under the given bricks once, for the per-call mode check."""
    seen: dict[int, nn.Module] = {}
    for brick in bricks:
        for module in brick.modules():
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
