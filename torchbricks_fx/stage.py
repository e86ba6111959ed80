"""Model stages and the parsing of ``alive_stages``."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from torchbricks_fx.errors import BrickGraphError

__all__ = ["ALL_STAGES", "LOSS_STAGES", "Stage", "parse_alive_stages", "parse_stage"]


class Stage(Enum):
    """The stage a model runs in.  TRAIN runs train-mode modules with gradients; every other stage runs
    eval-mode modules without gradients."""

    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"
    INFERENCE = "inference"
    EXPORT = "export"

    @classmethod
    def _missing_(cls, value: object) -> Stage | None:
        # Accept "TRAIN", "Train", "train" and the enum's own name.
        if isinstance(value, str):
            for stage in cls:
                if value.strip().lower() in (stage.value, stage.name.lower()):
                    return stage
        return None

    @property
    def is_training(self) -> bool:
        return self is Stage.TRAIN


ALL_STAGES: tuple[Stage, ...] = tuple(Stage)
LOSS_STAGES: tuple[Stage, ...] = (Stage.TRAIN, Stage.VALIDATION, Stage.TEST)


def parse_stage(stage: Stage | str) -> Stage:
    """``Stage`` or its (case-insensitive) name to ``Stage``; a clear error otherwise."""
    if isinstance(stage, Stage):
        return stage
    try:
        return Stage(stage)
    except ValueError:
        valid = ", ".join(s.value for s in Stage)
        raise BrickGraphError([f"Unknown stage {stage!r}; valid stages: {valid}."]) from None


def parse_alive_stages(alive_stages: str | Stage | Iterable[Stage | str] | None,
                       default: tuple[Stage, ...] = ALL_STAGES) -> frozenset[Stage]:
    """``"all"``, ``"none"``, a single stage or an iterable of stages to a frozenset of ``Stage``."""
    if alive_stages is None:
        return frozenset(default)
    if isinstance(alive_stages, str) and alive_stages.lower() in ("all", "none"):
        return frozenset(ALL_STAGES if alive_stages.lower() == "all" else ())
    if isinstance(alive_stages, (str, Stage)):
        return frozenset([parse_stage(alive_stages)])
    try:
        return frozenset(parse_stage(s) for s in alive_stages)
    except TypeError:
        raise BrickGraphError([f'alive_stages must be "all", "none" or a list of stages, '
                               f"not {alive_stages!r}."]) from None
