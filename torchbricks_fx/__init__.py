"""torchbricks_fx: build PyTorch models from named bricks; compile each model stage into a pruned
``torch.fx.GraphModule`` for ``torch.compile``, ONNX export and latency benchmarking.

Every public name is imported on first use: ``import torchbricks_fx`` costs nothing, the command line's
``--help`` needs no torch, and export or benchmarking pull in onnx/onnxruntime only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchbricks_fx.benchmarking import BenchmarkResult, BrickProfile, benchmark, profile_bricks
    from torchbricks_fx.brick import (
        Brick,
        BrickInterface,
        BrickLoss,
        BrickMetrics,
        BrickMetricSingle,
        BrickModule,
        BrickNotTrainable,
        BrickTrainable,
    )
    from torchbricks_fx.bundle import Bundle, load_bundle
    from torchbricks_fx.collection import BrickCollection
    from torchbricks_fx.deployment import CandidateResult, DeployReport, deploy
    from torchbricks_fx.errors import (
        BrickBackendError,
        BrickDeployError,
        BrickDeployInputError,
        BrickError,
        BrickExportError,
        BrickGraphError,
        BrickLockError,
        BrickOutputError,
        GraphProblem,
    )
    from torchbricks_fx.export import ExportReport, OutputError, export_onnx, export_program
    from torchbricks_fx.fx import StageModule, compile_stage
    from torchbricks_fx.lockfile import lock
    from torchbricks_fx.lockfile_diff import LockChange, diff_locks
    from torchbricks_fx.lockfile_format import Lock, read_lock, write_lock
    from torchbricks_fx.plan import StagePlan
    from torchbricks_fx.stage import Stage

__version__ = "0.2.0"

_PUBLIC = {
    "torchbricks_fx.stage": ("Stage",),
    "torchbricks_fx.errors": ("BrickBackendError", "BrickDeployError", "BrickDeployInputError", "BrickError",
                              "BrickExportError", "BrickGraphError", "BrickLockError", "BrickOutputError",
                              "GraphProblem"),
    "torchbricks_fx.brick": ("Brick", "BrickInterface", "BrickLoss", "BrickMetricSingle", "BrickMetrics",
                             "BrickModule", "BrickNotTrainable", "BrickTrainable"),
    "torchbricks_fx.collection": ("BrickCollection",),
    "torchbricks_fx.plan": ("StagePlan",),
    "torchbricks_fx.fx": ("StageModule", "compile_stage"),
    "torchbricks_fx.export": ("ExportReport", "OutputError", "export_onnx", "export_program"),
    "torchbricks_fx.benchmarking": ("BenchmarkResult", "BrickProfile", "benchmark", "profile_bricks"),
    "torchbricks_fx.deployment": ("CandidateResult", "DeployReport", "deploy"),
    "torchbricks_fx.bundle": ("Bundle", "load_bundle"),
    "torchbricks_fx.lockfile": ("lock",),
    "torchbricks_fx.lockfile_format": ("Lock", "read_lock", "write_lock"),
    "torchbricks_fx.lockfile_diff": ("LockChange", "diff_locks"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [
    "BenchmarkResult",
    "Brick",
    "BrickBackendError",
    "BrickCollection",
    "BrickDeployError",
    "BrickDeployInputError",
    "BrickError",
    "BrickExportError",
    "BrickGraphError",
    "BrickInterface",
    "BrickLockError",
    "BrickLoss",
    "BrickMetricSingle",
    "BrickMetrics",
    "BrickModule",
    "BrickNotTrainable",
    "BrickOutputError",
    "BrickProfile",
    "BrickTrainable",
    "Bundle",
    "CandidateResult",
    "DeployReport",
    "ExportReport",
    "GraphProblem",
    "Lock",
    "LockChange",
    "OutputError",
    "Stage",
    "StageModule",
    "StagePlan",
    "benchmark",
    "compile_stage",
    "deploy",
    "diff_locks",
    "export_onnx",
    "export_program",
    "load_bundle",
    "lock",
    "profile_bricks",
    "read_lock",
    "write_lock",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
