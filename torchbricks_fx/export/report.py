"""What an export wrote and how well it reproduces eager: data only (``reporting.py`` renders it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torchbricks_fx.numerics import OutputError
from torchbricks_fx.stage import Stage

__all__ = ["ExportReport", "OutputError"]


@dataclass(frozen=True)
class ExportReport:
    """What was written and how well it reproduces eager.  ``to_markdown()`` renders it."""

    path: Path
    format: str  # "onnx" | "pt2"
    stage: Stage
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int | None
    file_size_bytes: int
    providers: tuple[str, ...]  # onnxruntime execution providers used to verify (empty for .pt2)
    errors: tuple[OutputError, ...]
    verified: bool
    verified_batch_sizes: tuple[int, ...]
    dynamic_batch: bool
    dynamo: bool
    export_seconds: float
    verify_seconds: float

    @property
    def max_abs_error(self) -> float:
        return max((e.max_abs_error for e in self.errors), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((e.max_rel_error for e in self.errors), default=0.0)

    def to_markdown(self) -> str:
        from torchbricks_fx.reporting import render_export_report

        return render_export_report(self)

    def __str__(self) -> str:
        return self.to_markdown()
