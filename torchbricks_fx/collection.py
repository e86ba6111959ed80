"""BrickCollection: a (nested) dict of bricks that runs as one model, eagerly, by executing per-stage plans."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchbricks_fx.bricks import STAGE_INPUT, Brick, bump_structure_version, structure_version
from torchbricks_fx.errors import BrickError, BrickGraphError
from torchbricks_fx.plan import (
    PLAN_HINT,
    BrickSpec,
    StagePlan,
    make_plan,
    merge_stage_problems,
    resolve_name,
    spec_problems,
    stage_problems,
)
from torchbricks_fx.runtime import (
    BoundStep,
    bind_steps,
    check_inputs,
    enter_modes,
    exit_modes,
    run_steps,
    stage_modules,
)
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["BrickCollection"]

WEIGHTS_SUFFIX = ".pt"


@dataclass(frozen=True)
class _Program:
    """A plan bound to this collection's modules: what eager ``forward`` executes."""

    version: int
    plan: StagePlan
    steps: tuple[BoundStep, ...]
    modules: tuple[nn.Module, ...]


def _as_collection_member(key: object, value: object) -> nn.Module:
    if not isinstance(key, str) or not key or "." in key:
        raise BrickGraphError([f"Collection key {key!r} is not a valid brick name (a non-empty string "
                               f"without '.')."])
    if hasattr(BrickCollection, key):
        raise BrickGraphError([f"Brick name {key!r} clashes with the nn.Module attribute {key!r} of the collection; "
                               f"choose another name."])
    if isinstance(value, (Brick, BrickCollection)):
        return value
    if isinstance(value, Mapping):
        return BrickCollection(value)
    raise BrickGraphError([f"Collection entry {key!r} is a {type(value).__name__}, not a brick: wrap modules in "
                           f"a brick, e.g. BrickTrainable(model, input_names=[...], output_names=[...])."])


class BrickCollection(nn.ModuleDict):
    """A dict of bricks (nested dicts become nested collections) that runs as one model.

    ``forward`` executes the stage's cached :class:`StagePlan`: bricks run in topological order of their
    names, dead bricks are skipped, and modules run in the stage's mode (TRAIN: train mode with
    gradients; other stages: eval mode without gradients); the caller's modes are restored afterwards.
    """

    def __init__(self, bricks: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._programs: dict[tuple[Stage, tuple[str, ...] | None], _Program] = {}
        if bricks is not None:
            if not isinstance(bricks, Mapping):
                raise BrickGraphError([f"BrickCollection takes a dict of bricks, not {type(bricks).__name__}."])
            self.update(bricks)

    # ------------------------------------------------------------------ dict operations invalidate plans
    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _as_collection_member(key, value))
        bump_structure_version()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        bump_structure_version()

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.Module) and not isinstance(value, (Brick, BrickCollection)):
            raise BrickGraphError([f"Collection entry {name!r} is a {type(value).__name__}, not a brick."])
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            bump_structure_version()

    def clear(self) -> None:
        super().clear()
        bump_structure_version()

    def update(self, modules: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        items = modules.items() if isinstance(modules, Mapping) else modules
        for key, value in items:
            self[key] = value

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_programs": {}}  # bound programs hold module references; rebuild them lazily

    # ------------------------------------------------------------------ bricks and plans
    def named_bricks(self, prefix: str = "",
                     scope: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...], Brick]]:
        """Yields ``(dotted name, scope, brick)`` for every brick, nested ones included, in declaration order."""
        for key, member in self.items():
            name = f"{prefix}{key}"
            if isinstance(member, BrickCollection):
                yield from member.named_bricks(prefix=f"{name}.", scope=(*scope, key))
            else:
                yield name, scope, member  # type: ignore[misc]

    def bricks(self) -> dict[str, Brick]:
        """Every brick by dotted name (``"heads.classifier"``)."""
        return {name: brick for name, _, brick in self.named_bricks()}

    def specs(self) -> tuple[tuple[BrickSpec, ...], list[str]]:
        """The bricks' resolved connections and the problems found in their names."""
        return spec_problems(self.named_bricks())

    def plan(self, stage: Stage | str, outputs: Sequence[str] | None = None) -> StagePlan:
        """The stage's plan: bricks in execution order, required inputs, outputs and pruned bricks (with
        reasons).  ``outputs`` keeps only the bricks those outputs need.  Raises ``BrickGraphError``."""
        return self._program(parse_stage(stage), outputs).plan

    def check(self, stages: Iterable[Stage | str] | None = None) -> None:
        """Validates every stage (or ``stages``) and raises one ``BrickGraphError`` listing every problem."""
        specs, problems = self.specs()
        checked = [parse_stage(stage) for stage in (Stage if stages is None else stages)]
        problems += merge_stage_problems({stage: stage_problems(specs, stage)[1] for stage in checked})
        if problems:
            raise BrickGraphError(problems, hint=PLAN_HINT)

    def _program(self, stage: Stage, outputs: Sequence[str] | None = None) -> _Program:
        key = (stage, None if outputs is None else tuple(outputs))
        program = self._programs.get(key)
        version = structure_version()
        if program is None or program.version != version:
            specs, problems = self.specs()
            plan = make_plan(specs, problems, stage, outputs)
            bricks = self.bricks()
            called = [bricks[step.name].graph_module() for step in plan.steps if step.in_graph]
            program = _Program(version, plan, bind_steps(plan, plan.steps, bricks), stage_modules(called))
            self._programs[key] = program
        return program

    # ------------------------------------------------------------------ running
    def forward(self, named_inputs: dict[str, Any], stage: Stage | str,
                return_inputs: bool = True) -> dict[str, Any]:
        """Runs the bricks alive in ``stage`` and returns every value by name (inputs included unless
        ``return_inputs=False``)."""
        stage = parse_stage(stage)
        program = self._program(stage)
        check_inputs(program.plan, named_inputs)
        values = dict(named_inputs)
        values[STAGE_INPUT] = stage
        training = stage is Stage.TRAIN
        flipped = enter_modes(program.modules, training)
        try:
            with torch.set_grad_enabled(training):
                run_steps(program.steps, values, named_inputs)
        finally:
            exit_modes(flipped, training)
        del values[STAGE_INPUT]
        if not return_inputs:
            for name in named_inputs:
                values.pop(name, None)
        return values

    def run_now(self, stage: Stage) -> bool:
        return True

    def extract_losses(self, named_outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The loss values among ``named_outputs`` (outputs named in the bricks' ``loss_output_names``,
        relative names resolved as in the plan: ``"./loss"`` in group ``a`` is ``"a/loss"``)."""
        losses: dict[str, Any] = {}
        for name, scope, brick in self.named_bricks():
            for loss_name in getattr(brick, "loss_output_names", ()):
                value_name = resolve_name(loss_name, scope, name)[0] or loss_name
                if value_name in named_outputs:
                    losses[value_name] = named_outputs[value_name]
        return losses

    def summarize(self, stage: Stage | str, reset: bool = False) -> dict[str, Any]:
        """The metrics accumulated in ``stage`` since the last reset; ``reset=True`` starts over.  Metrics of
        a nested collection are keyed by its path (``"a/accuracy"``), so reused groups stay apart."""
        stage = parse_stage(stage)
        metrics: dict[str, Any] = {}
        for _, scope, brick in self.named_bricks():
            prefix = "".join(f"{part}/" for part in scope)
            metrics.update({f"{prefix}{key}": value for key, value in brick.summarize(stage, reset=reset).items()})
        return metrics

    def to_mermaid(self, stage: Stage | str | None = None, outputs: Sequence[str] | None = None) -> str:
        """A mermaid flowchart of the collection, or of one stage with its pruned bricks greyed out."""
        from torchbricks_fx.viz import to_mermaid

        return to_mermaid(self, stage=stage, outputs=outputs)

    # ------------------------------------------------------------------ per-brick weights
    def save_bricks(self, folder: str | os.PathLike[str]) -> Path:
        """Saves each brick's weights to ``folder/<brick name>.pt``.  The folder is written next to its final
        place and renamed into it, so a failure leaves neither a partial folder nor a damaged old one."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for name, _, brick in self.named_bricks():
                state = brick.state_dict()
                if state:
                    torch.save(state, staging / _weights_file(name))
            _replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def load_bricks(self, folder: str | os.PathLike[str]) -> None:
        """Loads per-brick weights saved by ``save_bricks`` (``weights_only=True``).  Bricks without a file
        keep their weights and are warned about by name; nothing is loaded unless every file fits."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BrickError(f"No brick weights folder at {str(folder)!r}.")
        states, missing = {}, []
        for name, _, brick in self.named_bricks():
            path = folder / _weights_file(name)
            if path.exists():
                states[name] = torch.load(path, map_location="cpu", weights_only=True)
            elif brick.state_dict():
                missing.append(name)
        bricks = self.bricks()
        problems = [p for name, state in states.items() for p in _state_problems(name, bricks[name], state)]
        if problems:
            raise BrickError("Brick weights do not fit; nothing was loaded:\n" + "\n".join(problems))
        for name, state in states.items():
            bricks[name].load_state_dict(state)
        known = {_weights_file(name) for name in bricks}
        unknown = sorted(p.name for p in folder.glob(f"*{WEIGHTS_SUFFIX}") if p.name not in known)
        if missing:
            warnings.warn(f"No weights file for brick(s) {missing} in {str(folder)!r}; they keep their weights.",
                          stacklevel=2)
        if unknown:
            warnings.warn(f"Weights files {unknown} in {str(folder)!r} match no brick; they were ignored.",
                          stacklevel=2)


def _weights_file(brick_name: str) -> str:
    return urllib.parse.quote(brick_name, safe="._-") + WEIGHTS_SUFFIX


def _state_problems(name: str, brick: Brick, state: Mapping[str, Any]) -> list[str]:
    expected = brick.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems.append(f"- brick {name!r}: missing keys {missing}, unexpected keys {unexpected}")
    for key in set(expected) & set(state):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(f"- brick {name!r}: {key} has shape {tuple(state[key].shape)} in the file, "
                            f"{tuple(expected[key].shape)} in the brick")
    return problems


def _replace_folder(staging: Path, folder: Path) -> None:
    """Renames ``staging`` to ``folder``; an existing ``folder`` is moved aside first and removed after."""
    if not folder.exists():
        staging.rename(folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    old.rmdir()
    folder.rename(old)
    try:
        staging.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
