"""Where a benchmark runs: torch's threads, the collection moved to the asked device and back, inputs on
that device, and the random number generator kept (the caller's state restored; every compared call
started from one seed).  Used by ``benchmark``, ``profile_bricks`` and deployment."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from torchbricks_fx.errors import BrickBackendError

__all__ = ["COMPARE_SEED", "kept_rng", "moved_to", "seeded_call", "to_device", "torch_threads"]

COMPARE_SEED = 0
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- inputs
def to_device(named_inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in named_inputs.items()}


# --------------------------------------------------------------------------------------------- state
@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Sets torch's intra-op threads for the block (``None``: keep the current setting); restores them."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise BrickBackendError(f"threads must be a positive integer or None, not {threads!r}.")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _home_device(module: torch.nn.Module) -> torch.device | None:
    """The one device ``module``'s tensors are on (``None`` without tensors); ``BrickBackendError`` for a
    collection spread over several devices, which a benchmark could not move and put back as it was."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        raise BrickBackendError(f"The collection's parameters and buffers are on several devices "
                                f"({', '.join(sorted(map(str, devices)))}); move it to one device before "
                                f"benchmarking it.")
    return next(iter(devices), None)


@contextlib.contextmanager
def _on_device(module: torch.nn.Module, home: torch.device | None, device: torch.device) -> Iterator[None]:
    """Moves ``module`` from ``home`` (its one device, see ``_home_device``) to ``device`` for the block and
    back afterwards, also when the move itself fails half-way (out of memory)."""
    if home is None or home == device:
        yield
        return
    try:
        module.to(device)
        yield
    finally:
        module.to(home)


def _on_cuda_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``device`` as the current CUDA device for the block: ``Timer`` synchronizes the current device, and
    ``torch.compile`` / CUDA graphs capture on it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def moved_to(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``module`` on ``device`` (and ``device`` the current CUDA device) for the block, back on its own device
    afterwards; ``BrickBackendError`` for a module spread over several devices.  For tools that run a
    collection where the user asked, as ``benchmark`` does (deployment)."""
    with _on_device(module, _home_device(module), device), _on_cuda_device(device):
        yield


@contextlib.contextmanager
def kept_rng(device: torch.device) -> Iterator[None]:
    """Restores the RNG state of the CPU (and of ``device`` when it is CUDA) after the block: timing a stage
    with dropout draws random numbers, which must not change what the caller's code draws next."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def seeded_call(fn: Callable[[], T], device: torch.device) -> T:
    """``fn()`` from the RNG state every compared call starts from (eager's reference, each backend's
    outputs): a stage that draws random numbers (TRAIN's dropout) then draws the same ones on every backend
    that uses torch's generators.  Only the compared calls pay for this, never the timed ones."""
    with kept_rng(device):
        # Not torch.manual_seed: it also seeds every other CUDA device, which kept_rng does not restore.
        torch.default_generator.manual_seed(COMPARE_SEED)
        if device.type == "cuda":
            torch.cuda.manual_seed(COMPARE_SEED)  # the current device is ``device`` (_on_cuda_device)
        return fn()
