"""What a deployment found: one :class:`CandidateResult` per candidate (and the eager baseline) and the
:class:`DeployReport`.  Data only; ``reporting.render_deploy_report`` renders it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torchbricks_fx.numerics import OutputError
from torchbricks_fx.plan import FrozenMap
from torchbricks_fx.stage import Stage

__all__ = ["CandidateResult", "DeployReport", "Latency"]

BASELINE = "baseline"  # eager: what every candidate is measured against
ACCEPTED = "accepted"  # passed every gate
REJECTED = "rejected"  # ran, but a gate refused it (the reasons say which)
FAILED = "failed"  # could not be built, run or timed (the reason is the error)
SKIPPED = "skipped"  # not tried: a package or device is missing


@dataclass(frozen=True)
class Latency:
    """Median and IQR of one call at one batch size (seconds), over ``runs`` measurements of
    ``torch.utils.benchmark``'s ``blocked_autorange``."""

    batch_size: int
    median_s: float
    iqr_s: float
    runs: int


@dataclass(frozen=True)
class CandidateResult:
    """One candidate artifact and how it did.

    ``metrics`` are the metric bricks' values over the whole validation set with this candidate's outputs,
    ``metric_drops`` how much worse each is than eager's (positive: worse; for lower-is-better metrics the
    rise).  ``output_errors`` compare the outputs with eager's on the verification inputs (the example
    batch and a random one with batch size + 1); ``tolerance_ok`` is ``None`` where tolerance does not
    decide (reduced precision).  ``reasons`` say why a candidate was rejected, failed or skipped; ``notes``
    add what is worth knowing either way."""

    name: str
    status: str
    precision: str  # "float32" | "int8" | "float16"
    format: str  # "onnx" | "pt2" | "torch" (not a file: eager, the compiled stage)
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=FrozenMap)
    metric_drops: Mapping[str, float] = field(default_factory=FrozenMap)
    output_errors: tuple[OutputError, ...] = ()
    tolerance_ok: bool | None = None
    latencies: tuple[Latency, ...] = ()
    file_size_bytes: int | None = None
    build_seconds: float | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    @property
    def max_abs_error(self) -> float | None:
        """The largest absolute error of the floating-point outputs against eager (integer outputs, e.g. class
        ids, are exact or not: ``output_errors`` says which)."""
        return max((e.max_abs_error for e in self.output_errors if e.dtype.startswith(("float", "bfloat"))),
                   default=None)

    def latency(self, batch_size: int) -> Latency | None:
        return next((lat for lat in self.latencies if lat.batch_size == batch_size), None)

    @property
    def mean_latency_s(self) -> float | None:
        """Geometric mean of the median latencies over the batch sizes (``None`` unless timed on all of them):
        the ranking key, in which every batch size counts equally."""
        if not self.latencies:
            return None
        return math.exp(sum(math.log(lat.median_s) for lat in self.latencies) / len(self.latencies))


@dataclass(frozen=True)
class DeployReport:
    """A deployment: the eager baseline, every candidate, the chosen one and the bundle written.

    ``metric_budgets`` is the largest drop accepted per metric (``None``: tolerance alone decided, so only
    float32 candidates could pass).  ``speedups`` is the chosen candidate's speed-up over eager per batch
    size.  ``to_markdown()`` renders the candidate table."""

    folder: Path
    stage: Stage
    metric_stage: Stage | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    chosen: str | None
    eager: CandidateResult
    candidates: tuple[CandidateResult, ...]
    metric_budgets: Mapping[str, float] | None
    batch_sizes: tuple[int, ...]
    threads: int
    device: str
    validation_batches: int
    validation_samples: int
    notes: tuple[str, ...] = ()
    load_average: float | None = None  # the machine's 1-minute load when timing started

    def candidate(self, name: str) -> CandidateResult:
        found = next((c for c in (self.eager, *self.candidates) if c.name == name), None)
        if found is None:
            raise KeyError(f"No candidate {name!r}; candidates: {[c.name for c in self.candidates]}.")
        return found

    @property
    def chosen_result(self) -> CandidateResult | None:
        return None if self.chosen is None else self.candidate(self.chosen)

    @property
    def speedups(self) -> dict[int, float]:
        """Eager's median over the chosen candidate's, per batch size."""
        chosen = self.chosen_result
        if chosen is None:
            return {}
        out = {}
        for base in self.eager.latencies:
            mine = chosen.latency(base.batch_size)
            if mine is not None and mine.median_s > 0:
                out[base.batch_size] = base.median_s / mine.median_s
        return out

    def to_markdown(self) -> str:
        from torchbricks_fx.reporting import render_deploy_report

        return render_deploy_report(self)

    def __str__(self) -> str:
        return self.to_markdown()
