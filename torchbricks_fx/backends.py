"""Which backends a stage can be timed on, and which devices: names and validation only.

Torch-free at import (the command line lists the backends in ``--help`` without importing torch); how
each backend runs is ``runners.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torchbricks_fx.errors import BrickBackendError

if TYPE_CHECKING:
    import torch

__all__ = ["BACKENDS", "CUDA_ONLY_BACKENDS", "DEFAULT_BACKENDS", "DEPLOY_CANDIDATES", "parse_backends", "parse_device"]

BACKENDS: tuple[str, ...] = ("eager", "fx", "compile", "onnxruntime", "cudagraphs")
DEFAULT_BACKENDS: tuple[str, ...] = ("eager", "fx", "compile", "onnxruntime")
CUDA_ONLY_BACKENDS: tuple[str, ...] = ("cudagraphs",)
COMPILED_BACKENDS: tuple[str, ...] = ("compile", "cudagraphs")

DEPLOY_CANDIDATES: tuple[str, ...] = ("onnxruntime", "onnxruntime-int8-dynamic", "onnxruntime-int8-static",
                                      "onnxruntime-fp16", "compiled", "pt2")
"""Deployment candidates in the order they are tried (``deployment/candidates.py`` builds them); here, torch-free,
for the command line's help."""


def parse_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` to a ``torch.device``; ``BrickBackendError`` otherwise, or when
    CUDA is asked for and not available."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BrickBackendError(f"Unknown device {device!r}; valid devices: 'cpu', 'cuda', 'cuda:N'.") from None
    if parsed.type not in ("cpu", "cuda"):
        raise BrickBackendError(f"Unsupported device {str(device)!r}; valid devices: 'cpu', 'cuda', 'cuda:N'.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BrickBackendError(f"Device {str(device)!r} was requested but CUDA is not available here "
                                    f"(torch {torch.__version__}); use device='cpu'.")
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BrickBackendError(f"Device {str(device)!r} does not exist; this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s).")
        parsed = torch.device("cuda", index)
    return parsed


def parse_backends(backends: str | Sequence[str], device: torch.device | None) -> tuple[str, ...]:
    """Validates backend names (a sequence or a comma-separated string) for ``device``, before any work
    (``None``: the names alone, as the CLI checks them before importing torch)."""
    names = [b.strip() for b in backends.split(",")] if isinstance(backends, str) else [str(b) for b in backends]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        shown = ", ".join(map(repr, unknown)) if unknown else "none"
        raise BrickBackendError(f"Unknown backend(s) {shown}; valid backends: {', '.join(BACKENDS)} "
                                f"({', '.join(CUDA_ONLY_BACKENDS)} only with device='cuda').")
    cuda_only = [name for name in names if name in CUDA_ONLY_BACKENDS and device is not None and device.type != "cuda"]
    if cuda_only:
        raise BrickBackendError(f"Backend(s) {', '.join(map(repr, cuda_only))} need device='cuda' (CUDA graphs); "
                                f"the requested device is {str(device)!r}.")
    return tuple(dict.fromkeys(names))
