"""Deployment artifacts for one stage of a collection: ONNX (verified with ONNX Runtime) and ``torch.export``.

Both exporters work on the stage's GraphModule (one positional tensor per required input, a tuple of
outputs), so the artifact holds only the bricks the requested outputs need.  The shared sequence
(``sequence.py``) handles names, modes, verification on a second batch size, atomic files and failure
localization (``localize.py``); ``onnx.py`` and ``program.py`` hold what differs.

onnx / onnxruntime are imported on first use, and this package is imported lazily by ``torchbricks_fx``.
"""

from __future__ import annotations

from torchbricks_fx.export.onnx import export_onnx
from torchbricks_fx.export.program import export_program
from torchbricks_fx.export.report import ExportReport, OutputError

__all__ = ["ExportReport", "OutputError", "export_onnx", "export_program"]
