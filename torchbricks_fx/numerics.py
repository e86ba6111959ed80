"""Numerics shared by export verification, benchmarking and deployment: tolerances per dtype and device,
tensor comparison, and exact float32 on CUDA.

``|got - want| <= atol * max(1, max|want|) + rtol * |want|`` elementwise: atol is scaled by the output's
largest magnitude (at least 1), so that large logits are compared relatively and outputs near zero (ReLU
features) do not need an rtol miracle.  Integers and bools compare exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["OutputError", "compare_tensors", "exact_float32", "tolerance"]

_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
# A complex value is two floats of its part's dtype: it gets their tolerance.
_COMPLEX_PARTS: dict[torch.dtype, torch.dtype] = {torch.complex64: torch.float32, torch.complex128: torch.float64}
if hasattr(torch, "complex32"):
    _COMPLEX_PARTS[torch.complex32] = torch.float16
# cuDNN / cuBLAS pick other algorithms than onnxruntime's CUDA kernels; float32 sums differ a little more.
_CUDA_FLOAT32 = (1e-3, 1e-3)


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(rtol, atol)`` used to compare an output of ``dtype`` computed on ``device`` (integers, bool: exact;
    complex64/complex128/complex32: the tolerance of float32/float64/float16, their parts' dtype)."""
    dtype = _COMPLEX_PARTS.get(dtype, dtype)
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return _CUDA_FLOAT32
    return _TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass(frozen=True)
class Difference:
    """How far one tensor is from its reference."""

    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


def difference(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> Difference:
    """``got`` against ``want`` elementwise: equal values (equal infinities included) and NaN against NaN
    count as no error; a NaN or infinity against anything else is an infinite error.  The rtol term uses
    the finite ``want`` values only.  Compared in float64 (complex128) on the CPU, after the dtypes were
    found equal, so no conversion hides a dtype change.  Complex values follow these rules part by part
    (``nan+1j`` against ``nan+5j`` is an error); their error is the modulus of the difference."""
    if tuple(got.shape) != tuple(want.shape):
        return Difference(math.inf, math.inf, False, f"shape {list(got.shape)} != eager {list(want.shape)}")
    if got.dtype != want.dtype:
        return Difference(math.inf, math.inf, False, f"dtype {got.dtype} != eager {want.dtype}")
    if not want.numel():
        return Difference(0.0, 0.0, True)
    got, want = got.detach().cpu(), want.detach().cpu()
    if not (want.is_floating_point() or want.is_complex()):  # integers and bool: exact
        equal = bool(torch.equal(got, want))
        max_abs = float((got.double() - want.double()).abs().max())
        max_abs = max_abs if equal else max(max_abs, 1.0)  # float64 rounds large int64 differences to 0
        scale = float(want.double().abs().max())
        return Difference(max_abs, max_abs / scale if scale > 0 else max_abs, equal)
    if want.is_complex():  # real and imaginary parts as a last axis of two floats
        got64, want64 = torch.view_as_real(got.to(torch.complex128)), torch.view_as_real(want.to(torch.complex128))
    else:
        got64, want64 = got.to(torch.float64), want.to(torch.float64)
    same = (got64 == want64) | (torch.isnan(got64) & torch.isnan(want64))  # == covers equal infinities
    diff = torch.where(same, torch.zeros((), dtype=torch.float64), (got64 - want64).abs())
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)  # one-sided NaN: an error, never 0
    finite = torch.isfinite(want64)
    magnitude = torch.where(finite, want64.abs(), torch.zeros((), dtype=torch.float64))
    if want.is_complex():  # moduli: of the difference, and of the values whose parts are both finite
        diff = torch.hypot(diff[..., 0], diff[..., 1])
        magnitude = torch.where(finite.all(-1), torch.hypot(magnitude[..., 0], magnitude[..., 1]), 0.0)
    scale = float(magnitude.max())
    max_abs = float(diff.max())
    ok = bool((diff <= atol * max(1.0, scale) + rtol * magnitude).all())
    return Difference(max_abs, max_abs / scale if scale > 0 else max_abs, ok)


def compare_tensors(got: torch.Tensor, want: torch.Tensor,
                    device: torch.device | str = "cpu") -> tuple[bool, float, float]:
    """``(ok, max_abs_error, max_rel_error)`` of ``got`` against the reference ``want``, with the tolerance
    for ``want``'s dtype on ``device`` (see :func:`tolerance`).

    Equal infinities and NaN against NaN are no error (a ``masked_fill(-inf)`` output compares equal);
    a different shape or dtype is a mismatch with infinite error; the relative term uses finite ``want``
    values only; ``max_rel_error`` is the largest absolute error over ``want``'s largest finite magnitude."""
    diff = difference(got, want, *tolerance(want.dtype, device))
    return diff.ok, diff.max_abs, diff.max_rel


def compare_outputs(reference: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                    device: torch.device | str = "cpu") -> tuple[bool, float]:
    """Whether ``got`` equals ``reference`` output by output (:func:`compare_tensors`), and the largest
    absolute error.  A missing or extra output is a mismatch with infinite error."""
    matched, worst = set(reference) == set(got), 0.0 if set(reference) == set(got) else math.inf
    for name, ref in reference.items():
        value = got.get(name)
        if value is None:
            continue
        ok, max_abs, _ = compare_tensors(value, ref, device)
        matched, worst = matched and ok, max(worst, max_abs)
    return matched, worst


@dataclass(frozen=True)
class OutputError:
    """How far one exported output is from eager, over every verification input.

    ``max_rel_error`` is the largest absolute error divided by the output's largest eager magnitude (an
    elementwise ratio explodes on values near zero).  ``ok`` is the dtype-aware check
    ``|exported - eager| <= atol * max(1, max|eager|) + rtol * |eager|`` on every element (exact for
    integer and bool outputs); ``note`` says why an output failed when it is not a plain value mismatch.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    ok: bool
    note: str = ""


def output_errors(runs: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                  names: Sequence[str], device: torch.device) -> tuple[OutputError, ...]:
    """One :class:`OutputError` per output over every ``(got, reference)`` run."""
    errors = []
    for name in names:
        want = runs[0][1][name]
        rtol, atol = tolerance(want.dtype, device)
        diffs = [difference(got[name], reference[name], rtol, atol) if name in got
                 else Difference(math.inf, math.inf, False, "missing from the artifact") for got, reference in runs]
        notes = [d.note for d in diffs if d.note]
        errors.append(OutputError(name=name, dtype=str(want.dtype).replace("torch.", ""), shape=tuple(want.shape),
                                  max_abs_error=max(d.max_abs for d in diffs),
                                  max_rel_error=max(d.max_rel for d in diffs), rtol=rtol, atol=atol,
                                  ok=all(d.ok for d in diffs), note=notes[0] if notes else ""))
    return tuple(errors)


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """TF32 off on CUDA for the block (nothing on the CPU): artifacts are compared in float32, and TF32
    noise would only blur the comparison.  Uses the ``fp32_precision`` settings where torch has them
    (reading the legacy ``allow_tf32`` flags raises once a user set the new ones), the legacy flags
    otherwise; the caller's settings are restored."""
    if device.type != "cuda":
        yield
        return
    settings = [getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.cudnn, "conv", None),
                getattr(torch.backends.cudnn, "rnn", None)]
    precision = [s for s in settings if s is not None and hasattr(s, "fp32_precision")]
    if len(precision) >= 2:  # torch >= 2.9: matmul and cuDNN convolutions (RNNs too where present)
        saved_precision = [s.fp32_precision for s in precision]
        try:
            for setting in precision:
                setting.fp32_precision = "ieee"
            yield
        finally:
            for setting, value in zip(precision, saved_precision, strict=True):
                setting.fp32_precision = value
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
