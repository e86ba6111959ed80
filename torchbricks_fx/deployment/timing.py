"""Latency of a candidate per batch size, with the benchmark's rules: ``torch.utils.benchmark``'s
``blocked_autorange`` on the exact call a user makes (``BoundCall.stmt``), untimed warm-up calls first,
medians and IQRs over the measurements, the same thread count for torch and onnxruntime."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchbricks_fx.benchmarking import WARMUP_CALLS, time_statement
from torchbricks_fx.deployment.report import Latency
from torchbricks_fx.runners import BoundCall
from torchbricks_fx.runtime import resize_batch

__all__: list[str] = []  # internals of deploy(); the public API is torchbricks_fx.deployment


def batch_inputs(named_inputs: Mapping[str, torch.Tensor], batch_sizes: Sequence[int], input_names: Sequence[str],
                 device: torch.device) -> dict[int, dict[str, torch.Tensor]]:
    """The example inputs at each batch size (dimension 0 repeated or sliced, as the benchmark does)."""
    return {size: {name: value.to(device) for name, value in resize_batch(named_inputs, size, input_names).items()
                   if name in input_names}
            for size in batch_sizes}


def time_candidate(bind: Callable[[Mapping[str, torch.Tensor]], BoundCall],
                   inputs: Mapping[int, Mapping[str, torch.Tensor]], *, threads: int, min_run_time: float,
                   name: str) -> tuple[Latency, ...]:
    """Median latency of ``bind(inputs).stmt`` at every batch size, without recording gradients."""
    latencies = []
    with torch.no_grad():
        for batch_size, batch in inputs.items():
            call = bind(batch)
            code = compile(call.stmt, f"<deploy {name}>", "eval")
            globals_: dict[str, Any] = dict(call.globals)
            for _ in range(WARMUP_CALLS):
                eval(code, globals_)
            measurement = time_statement(call.stmt, call.globals, threads=threads, min_run_time=min_run_time,
                                         label="deploy", description=name)
            latencies.append(Latency(batch_size=batch_size, median_s=float(measurement.median),
                                     iqr_s=float(measurement.iqr), runs=len(measurement.times)))
    return tuple(latencies)
