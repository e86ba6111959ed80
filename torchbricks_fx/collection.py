"""BrickCollection: a (nested) dict of bricks that runs as one model, eagerly, through per-stage bound plans.

Each collection caches one :class:`~torchbricks_fx.runtime.BoundStage` per stage (and output selection).
The cache belongs to the collection tree: a brick tells the collections holding it when its connections,
alive stages, ``calculate_gradients`` or module change, a nested collection tells its parents when a
member is added or removed, and each drops its bound stages.  Nothing else invalidates them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from torchbricks_fx.brick import Brick, BrickModule, PlanMember
from torchbricks_fx.errors import BrickError, BrickGraphError, GraphProblem, add_note, merge_problems
from torchbricks_fx.plan import PLAN_HINT, BrickSpec, StagePlan, make_plan, make_specs, resolve_name, stage_problems
from torchbricks_fx.runtime import BoundStage
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["BrickCollection"]

def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key or "." in key:
        raise BrickGraphError([f"Collection key {key!r} is not a valid brick name (a non-empty string "
                               f"without '.')."])
    if key in _reserved_names():
        raise BrickGraphError([f"Brick name {key!r} clashes with the nn.Module attribute {key!r} of the collection; "
                               f"choose another name."])
    return key


def _as_member(key: str, value: object) -> PlanMember:
    if isinstance(value, (Brick, BrickCollection)):
        return value
    if isinstance(value, Mapping):
        return BrickCollection(value)
    raise BrickGraphError([f"Collection entry {key!r} is a {type(value).__name__}, not a brick: wrap modules in "
                           f"a brick, e.g. BrickTrainable(model, input_names=[...], output_names=[...])."])


class BrickCollection(nn.ModuleDict, PlanMember):
    """A dict of bricks (nested dicts become nested collections) that runs as one model.

    ``forward`` executes the stage's bound plan: bricks run in topological order of their names, dead
    bricks are skipped, metric bricks run after the model bricks, and modules run in the stage's mode
    (TRAIN: train mode with gradients; other stages: eval mode without gradients); after an eval stage the
    caller's modes are restored (TRAIN leaves train mode).
    """

    _bound: dict[tuple[Stage, tuple[str, ...] | None], BoundStage]
    revision: int  # bumped whenever the plans change (every change that drops the bound stages)

    def __init__(self, bricks: Mapping[str, Any] | None = None) -> None:
        nn.ModuleDict.__init__(self)  # PlanMember.__init__ runs inside (the MRO continues there)
        self.__dict__["_bound"] = {}
        self.__dict__["revision"] = 0
        if bricks is not None:
            if not isinstance(bricks, Mapping):
                raise BrickGraphError([f"BrickCollection takes a dict of bricks, not {type(bricks).__name__}."])
            self.update(bricks)

    # ------------------------------------------------------------------ membership invalidates plans
    def __setitem__(self, key: str, value: Any) -> None:
        member = _as_member(_check_key(key), value)
        old = self._modules.get(key)
        nn.ModuleDict.__setitem__(self, key, member)
        self._release(old)
        member.add_owner(self)
        self.plan_changed()

    def __delitem__(self, key: str) -> None:
        old = self._modules.get(key)
        nn.ModuleDict.__delitem__(self, key)
        self._release(old)
        self.plan_changed()

    def _release(self, old: object) -> None:
        """Stops listening to a member that left, unless it is still held under another key (a group or brick
        used twice): its changes must still reach this collection's plans."""
        if isinstance(old, PlanMember) and not any(member is old for member in self._modules.values()):
            old.remove_owner(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.Module):
            self[name] = value  # the same checks and bookkeeping as collection[name] = brick
            return
        nn.Module.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._modules:
            del self[name]
            return
        nn.Module.__delattr__(self, name)

    def clear(self) -> None:
        for key in list(self._modules):
            del self[key]

    def update(self, modules: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        items = modules.items() if isinstance(modules, Mapping) else modules
        for key, value in items:
            self[key] = value

    def plan_changed(self) -> None:
        """Drops the bound stages and tells the collections holding this one."""
        self._bound.clear()
        self.__dict__["revision"] += 1
        PlanMember.plan_changed(self)

    def __getstate__(self) -> dict[str, Any]:
        state = PlanMember.__getstate__(self)
        state["_bound"] = {}  # bound stages hold module references; rebuilt lazily
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        PlanMember.__setstate__(self, state)
        for member in self._modules.values():
            if isinstance(member, PlanMember):
                member.add_owner(self)

    # ------------------------------------------------------------------ bricks and plans
    def named_bricks(self, prefix: str = "",
                     scope: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...], Brick]]:
        """Yields ``(dotted name, scope, brick)`` for every brick, nested ones included, in declaration order."""
        for key, member in self.items():
            name = f"{prefix}{key}"
            if isinstance(member, BrickCollection):
                yield from member.named_bricks(prefix=f"{name}.", scope=(*scope, key))
            elif isinstance(member, Brick):
                yield name, scope, member

    def bricks(self) -> dict[str, Brick]:
        """Every brick by dotted name (``"heads.classifier"``)."""
        return {name: brick for name, _, brick in self.named_bricks()}

    def specs(self) -> tuple[tuple[BrickSpec, ...], list[GraphProblem]]:
        """The bricks' resolved connections and the problems found in their names."""
        return make_specs(self.named_bricks())

    def plan(self, stage: Stage | str, outputs: Sequence[str] | None = None) -> StagePlan:
        """The stage's plan: bricks in execution order, required inputs, outputs and pruned bricks (with
        reasons).  ``outputs`` keeps only the bricks those outputs need.  Raises ``BrickGraphError``."""
        return self.bound_stage(stage, outputs).plan

    def check(self, stages: Stage | str | Iterable[Stage | str] | None = None) -> None:
        """Validates every stage (or ``stages``: one or a list) and raises one ``BrickGraphError`` listing
        every problem."""
        specs, problems = self.specs()
        chosen = Stage if stages is None else [stages] if isinstance(stages, (str, Stage)) else stages
        for stage in [parse_stage(stage) for stage in chosen]:
            problems += stage_problems(specs, stage)[1]
        if problems:
            raise BrickGraphError(merge_problems(problems), hint=PLAN_HINT)

    def bound_stage(self, stage: Stage | str, outputs: Sequence[str] | None = None) -> BoundStage:
        """The stage's plan bound to this collection's bricks, built once and kept until a brick changes."""
        stage = parse_stage(stage)
        if isinstance(outputs, str):  # a string is a sequence too: its characters would be the outputs
            raise BrickGraphError([f"outputs must be a list of value names, not the string {outputs!r} (did you "
                                   f"mean [{outputs!r}]?)."])
        key = (stage, None if outputs is None else tuple(outputs))
        bound = self._bound.get(key)
        if bound is None:
            specs, problems = self.specs()
            bound = BoundStage.bind(make_plan(specs, problems, stage, outputs), self.bricks())
            self._bound[key] = bound
        return bound

    # ------------------------------------------------------------------ running
    def forward(self, named_inputs: dict[str, Any], stage: Stage | str,
                return_inputs: bool = True) -> dict[str, Any]:
        """Runs the bricks alive in ``stage`` and returns every value by name (inputs included unless
        ``return_inputs=False``)."""
        values = self.bound_stage(stage).run(named_inputs)
        if not return_inputs:
            for name in named_inputs:
                values.pop(name, None)
        return values

    def extract_losses(self, named_outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The loss values among ``named_outputs``: outputs named in the bricks' ``loss_output_names``, relative
        names resolved as in the plan (``"./loss"`` in group ``a`` is ``"a/loss"``), and what a brick that
        defines its own ``extract_losses`` (a seed-era ``BrickInterface``) returns."""
        losses: dict[str, Any] = {}
        for name, scope, brick in self.named_bricks():
            if type(brick).extract_losses not in _NAMED_LOSSES:
                losses.update(_in_brick(name, brick.extract_losses, named_outputs))
                continue
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
        computed_by: dict[str, str] = {}
        for name, scope, brick in self.named_bricks():
            prefix = "".join(f"{part}/" for part in scope)
            # Keywords, as the seed called them: a seed-era brick's summarize(self, stage, reset) requires both.
            for key, value in _in_brick(name, brick.summarize, stage=stage, reset=False).items():
                key = f"{prefix}{key}"
                if key in metrics:  # planning catches plain metrics; wrappers name theirs only when computed
                    raise BrickGraphError([f"Metric {key!r} is computed by bricks {computed_by[key]!r} and "
                                           f"{name!r}; summarize would report only one (nothing was reset)."],
                                          hint="name them apart (a wrapper's prefix=, metric_name=, "
                                               "BrickMetrics({'name': metric})) or put them in nested groups.")
                metrics[key], computed_by[key] = value, name
        if reset:  # after the check, so that a refused summary loses nothing (compute() is cached: cheap)
            for name, _, brick in self.named_bricks():
                _in_brick(name, brick.summarize, stage=stage, reset=True)
        return metrics

    def to_mermaid(self, stage: Stage | str | None = None, outputs: Sequence[str] | None = None) -> str:
        """A mermaid flowchart of the collection, or of one stage with its pruned bricks greyed out."""
        from torchbricks_fx.viz import to_mermaid

        return to_mermaid(self, stage=stage, outputs=outputs)

    # ------------------------------------------------------------------ per-brick weights
    def save_bricks(self, folder: str | os.PathLike[str]) -> Path:
        """Saves each brick's weights to ``folder/<brick name>.pt`` (see :func:`torchbricks_fx.weights.save_bricks`:
        the old folder stays loadable until the new one is complete)."""
        from torchbricks_fx.weights import save_bricks

        return save_bricks(self, folder)

    def load_bricks(self, folder: str | os.PathLike[str]) -> None:
        """Loads per-brick weights saved by ``save_bricks`` (``weights_only=True``); nothing is loaded unless
        every file fits (see :func:`torchbricks_fx.weights.load_bricks`)."""
        from torchbricks_fx.weights import load_bricks

        load_bricks(self, folder)


# The library's own extract_losses read ``loss_output_names`` (resolved here, relative names included).
_NAMED_LOSSES = (Brick.extract_losses, BrickModule.extract_losses)


def _in_brick(name: str, method: Any, *args: Any, **kwargs: Any) -> Any:
    """Calls a brick's own method; an error raised in it carries the brick's name."""
    try:
        return method(*args, **kwargs)
    except Exception as error:
        if not isinstance(error, BrickError):
            add_note(error, f"(raised in brick {name!r})")
        raise


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Attribute names of a collection (class and instance): a brick with such a key would shadow them."""
    return frozenset(dir(BrickCollection)) | frozenset(BrickCollection().__dict__)
