"""``CompileOptions``: how ``compile_stage(..., compile=...)`` compiles a stage, checked when made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torchbricks_fx.errors import BrickBackendError

__all__ = ["CompileOptions", "compile_options_of"]

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass(frozen=True)
class CompileOptions:
    """How ``compile_stage(..., compile=CompileOptions(...))`` compiles a stage (``compile=True``: defaults).

    ``freeze`` (eval stages): ``True`` folds the weights into the compiled code as constants (refrozen when
    they change), ``False`` keeps them inputs, ``None`` (default) measures on the first call the frozen,
    unfrozen and plain graph and keeps the fastest (a graph Inductor cannot build is left out, with a
    warning).  ``dynamic_batch`` (default): the batch sizes of warm-up get graphs specialized to them, and
    every other batch size shares one graph with a dynamic batch axis (compiled once, when first needed);
    ``False``: a graph per batch size.
    ``fail_on_recompile``: after warm-up (the first call, or ``StageModule.warm_up``), a call that would
    recompile raises instead, naming the guard that failed.
    ``channels_last``: convolution weights (in place, values unchanged) and 4-D inputs in channels-last
    layout.  ``autocast`` (eval stages): ``torch.bfloat16`` or ``torch.float16`` autocast, accepted only
    when the first call's outputs match float32 eager within that dtype's tolerance; outputs keep their
    float32 dtype.  ``mode``: ``torch.compile``'s mode.  Values of other types are refused when made.
    """

    freeze: bool | None = None
    dynamic_batch: bool = True
    fail_on_recompile: bool = False
    channels_last: bool = False
    autocast: torch.dtype | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        # `is True` tests downstream would read freeze="yes" as "measure", and a truthy string as "on".
        if not isinstance(self.freeze, (bool, type(None))):
            raise BrickBackendError(f"CompileOptions(freeze={self.freeze!r}): freeze takes True, False or None "
                                    f"(measure both).")
        for name in ("dynamic_batch", "fail_on_recompile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise BrickBackendError(f"CompileOptions({name}={getattr(self, name)!r}): {name} takes True or "
                                        f"False.")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise BrickBackendError(f"CompileOptions(autocast={self.autocast!r}): autocast takes torch.bfloat16 or "
                                    f"torch.float16 (or None for float32).")
        if self.mode is not None and self.mode not in MODES:
            raise BrickBackendError(f"CompileOptions(mode={self.mode!r}): torch.compile's modes are "
                                    f"{', '.join(MODES)} (or None).")


def compile_options_of(compile: Any) -> CompileOptions | None:
    """``compile_stage``'s ``compile=``: ``False``/``None`` (not compiled), ``True`` (defaults) or options."""
    if compile is True:
        return CompileOptions()
    if compile is False or compile is None:
        return None
    if isinstance(compile, CompileOptions):
        return compile
    raise BrickBackendError(f"compile={compile!r}: compile takes True, False or a CompileOptions(...).")
