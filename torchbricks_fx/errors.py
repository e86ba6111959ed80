"""One error hierarchy for the whole library, and one way to summarize any error in a line.

Every error a user can trigger with bad input derives from :class:`BrickError`; graph problems are also
``ValueError`` so that generic callers that catch ``ValueError`` keep working.  Imports nothing heavy: the
command line imports it before deciding whether torch is needed at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchbricks_fx.stage import Stage

__all__ = [
    "BrickBackendError",
    "BrickDeployError",
    "BrickDeployInputError",
    "BrickError",
    "BrickExportError",
    "BrickGraphError",
    "BrickLockError",
    "BrickOutputError",
    "GraphProblem",
]


class BrickError(Exception):
    """Base class of every torchbricks_fx error."""


@dataclass(frozen=True)
class GraphProblem:
    """One problem of the brick graph.  ``kind`` is a short tag (``"missing_input"``, ``"cycle"``, ...),
    ``brick`` and ``name`` the brick and the value name concerned (where there is one), ``stages`` the stages
    it occurs in (empty when it does not depend on the stage) and ``message`` the sentence shown to users."""

    kind: str
    message: str
    brick: str | None = None
    name: str | None = None
    stages: tuple[Stage, ...] = ()
    # The message with "{stages}" where the stages are named, so that one problem seen in several stages is
    # reported once (see ``merge_problems``).
    template: str = field(default="", repr=False, compare=False)

    def __str__(self) -> str:
        return self.message


def name_stages(stages: Sequence[Stage]) -> str:
    """``"stage train"`` or ``"stages train, validation and test"``."""
    names = [stage.value for stage in stages]
    return f"stage {names[0]}" if len(names) == 1 else f"stages {', '.join(names[:-1])} and {names[-1]}"


def stage_problem(kind: str, template: str, stage: Stage, brick: str | None = None,
                  name: str | None = None) -> GraphProblem:
    """A problem of one stage; ``template`` names it with ``{stages}``."""
    return GraphProblem(kind, template.replace("{stages}", name_stages([stage])), brick, name, (stage,), template)


def merge_problems(problems: Iterable[GraphProblem]) -> list[GraphProblem]:
    """One problem per distinct problem, naming every stage it occurs in, in first-seen order."""
    merged: dict[tuple[str, str | None, str | None, str], GraphProblem] = {}
    for problem in problems:
        key = (problem.kind, problem.brick, problem.name, problem.template or problem.message)
        seen = merged.get(key)
        if seen is None:
            merged[key] = problem
        elif problem.template:
            stages = tuple(dict.fromkeys((*seen.stages, *problem.stages)))
            merged[key] = GraphProblem(seen.kind, problem.template.replace("{stages}", name_stages(stages)), seen.brick,
                                       seen.name, stages, problem.template)
    return list(merged.values())


class BrickGraphError(BrickError, ValueError):
    """The bricks do not form a valid graph for a stage (missing input, duplicate producer, cycle, bad name).

    ``problems`` holds one :class:`GraphProblem` per problem; the message lists them all.
    """

    def __init__(self, problems: Sequence[GraphProblem | str], hint: str | None = None) -> None:
        self.problems: tuple[GraphProblem, ...] = tuple(
            p if isinstance(p, GraphProblem) else GraphProblem("invalid", p) for p in problems)
        self.hint = hint
        messages = [problem.message for problem in self.problems]
        lines = [f"{len(messages)} problem(s) in the brick graph:"] if len(messages) > 1 else []
        lines += [f"- {m}" if len(messages) > 1 else m for m in messages]
        if hint:
            lines.append(f"Hint: {hint}")
        super().__init__("\n".join(lines))


class BrickOutputError(BrickError, ValueError):
    """A brick returned something that does not match its ``output_names``."""


class BrickExportError(BrickError):
    """Export failed, or the exported artifact does not reproduce the eager outputs."""


class BrickBackendError(BrickError, ValueError):
    """An unknown or unavailable backend or device was requested."""


class BrickDeployError(BrickError):
    """A deployment failed: no candidate was accepted (``report`` then holds every candidate's result), the
    bundle folder exists, or a bundle is damaged (a file whose sha256 differs from its manifest's)."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class BrickDeployInputError(BrickDeployError, ValueError):
    """What a deployment was given cannot be used: validation batches without the targets a metric brick
    reads, a stage without metric bricks, an unknown candidate or metric, a bad budget, bundle inputs of
    the wrong name, dtype or shape."""


class BrickLockError(BrickError, ValueError):
    """A stage lockfile cannot be used: missing, not JSON, another schema version, or ill-formed."""


def add_note(error: BaseException, note: str) -> None:
    """Adds ``note`` to ``error`` once (``BaseException.add_note`` where Python has it, 3.11+)."""
    if note not in getattr(error, "__notes__", ()) and hasattr(error, "add_note"):
        error.add_note(note)


def error_summary(error: BaseException, max_chars: int = 600, first_line: bool = False) -> str:
    """``"TypeName: the informative text"`` on one line, at most ``max_chars`` characters of text.

    torch.onnx wraps the cause of a failed export under "## Exception summary"; that part is kept
    (``first_line``: only its first line).  Notes added with ``add_note`` (e.g. the brick an error was raised
    in) are part of the summary."""
    text = str(error)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    if first_line:
        text = next((line for line in text.splitlines() if line.strip()), "")
    notes = [note for note in getattr(error, "__notes__", ()) if isinstance(note, str)]
    text = " ".join(" ".join([text, *notes]).split()) or "(no message)"
    if len(text) > max_chars:
        text = text[:max_chars - 4] + " ..."
    return f"{type(error).__name__}: {text}"
