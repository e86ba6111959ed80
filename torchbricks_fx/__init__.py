"""torchbricks_fx: build PyTorch models from named bricks; compile each model stage into a pruned
``torch.fx.GraphModule`` for ``torch.compile``, ONNX export and latency benchmarking.

Export and benchmarking pull in onnx/onnxruntime, so they are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchbricks_fx.bricks import (
    Brick,
    BrickLoss,
    BrickMetrics,
    BrickMetricSingle,
    BrickModule,
    BrickNotTrainable,
    BrickTrainable,
)
from torchbricks_fx.collection import BrickCollection
from torchbricks_fx.errors import (
    BrickBackendError,
    BrickError,
    BrickExportError,
    BrickGraphError,
    BrickOutputError,
)
from torchbricks_fx.fx import StageModule, compile_stage
from torchbricks_fx.plan import StagePlan
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.benchmarking import BenchmarkResult, BrickProfile, benchmark, profile_bricks
    from torchbricks_fx.export import ExportReport, OutputError, export_onnx, export_program

__version__ = "0.1.0"

__all__ = [
    "BenchmarkResult",
    "Brick",
    "BrickBackendError",
    "BrickCollection",
    "BrickError",
    "BrickExportError",
    "BrickGraphError",
    "BrickLoss",
    "BrickMetricSingle",
    "BrickMetrics",
    "BrickModule",
    "BrickNotTrainable",
    "BrickOutputError",
    "BrickProfile",
    "BrickTrainable",
    "ExportReport",
    "OutputError",
    "Stage",
    "StageModule",
    "StagePlan",
    "benchmark",
    "compile_stage",
    "export_onnx",
    "export_program",
    "profile_bricks",
]

_LAZY = {
    "export_onnx": "torchbricks_fx.export",
    "export_program": "torchbricks_fx.export",
    "ExportReport": "torchbricks_fx.export",
    "OutputError": "torchbricks_fx.export",
    "benchmark": "torchbricks_fx.benchmarking",
    "profile_bricks": "torchbricks_fx.benchmarking",
    "BenchmarkResult": "torchbricks_fx.benchmarking",
    "BrickProfile": "torchbricks_fx.benchmarking",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
