"""One error hierarchy for the whole library.

Every error a user can trigger with bad input derives from :class:`BrickError`; graph problems are also
``ValueError`` so that generic callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BrickBackendError",
    "BrickError",
    "BrickExportError",
    "BrickGraphError",
    "BrickOutputError",
]


class BrickError(Exception):
    """Base class of every torchbricks_fx error."""


class BrickGraphError(BrickError, ValueError):
    """The bricks do not form a valid graph for a stage (missing input, duplicate producer, cycle, bad name).

    ``problems`` holds one line per problem; the message lists them all.
    """

    def __init__(self, problems: Sequence[str], hint: str | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        self.hint = hint
        lines = [f"{len(self.problems)} problem(s) in the brick graph:"] if len(self.problems) > 1 else []
        lines += [f"- {p}" if len(self.problems) > 1 else p for p in self.problems]
        if hint:
            lines.append(f"Hint: {hint}")
        super().__init__("\n".join(lines))


class BrickOutputError(BrickError, ValueError):
    """A brick returned something that does not match its ``output_names``."""


class BrickExportError(BrickError):
    """Export failed, or the exported artifact does not reproduce the eager outputs."""


class BrickBackendError(BrickError, ValueError):
    """An unknown or unavailable backend or device was requested."""
