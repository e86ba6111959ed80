"""Real-model export coverage: torchvision models as bricks, exported with ``export_onnx`` and verified.

Every model (untrained weights, nothing downloaded) becomes a collection of a preprocessor, the model and a
loss (dead in the EXPORT stage, so absent from the file; segmentation adds an ``argmax`` mask brick).  Per
model the script reports whether ``export_onnx`` (dynamo exporter, dynamic batch, verification on the
example batch and on batch + 1) succeeded, the largest verification error, and the latency of ONNX Runtime
against the eager collection (``torch.utils.benchmark``, same thread count for both).  It also tries plain
``torch.onnx.export`` on the bare model, to show that every model the exporter handles directly also goes
through ``export_onnx`` with verification.

    python benchmarks/bench_export_coverage.py --markdown benchmarks/results/export_coverage.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from torchbricks_fx import BrickCollection, BrickLoss, BrickNotTrainable, BrickTrainable, Stage, export_onnx
from torchbricks_fx.bag_of_bricks import Preprocessor

NUM_CLASSES = 10


class SegmentationOutput(nn.Module):
    """torchvision segmentation models return ``{"out": logits, ...}``; a brick returns the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


@dataclass(frozen=True)
class ModelCase:
    name: str
    task: str  # "classification" | "segmentation"
    build: Callable[[], nn.Module]
    size: int = 64


def _classifier(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)


def _segmenter(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                                  num_classes=NUM_CLASSES, **kwargs)


CASES = (
    ModelCase("resnet18", "classification", _classifier("resnet18")),
    ModelCase("mobilenet_v2", "classification", _classifier("mobilenet_v2")),
    ModelCase("mobilenet_v3_small", "classification", _classifier("mobilenet_v3_small")),
    ModelCase("efficientnet_b0", "classification", _classifier("efficientnet_b0")),
    ModelCase("regnet_y_400mf", "classification", _classifier("regnet_y_400mf")),
    ModelCase("shufflenet_v2_x0_5", "classification", _classifier("shufflenet_v2_x0_5")),
    ModelCase("squeezenet1_0", "classification", _classifier("squeezenet1_0")),
    ModelCase("mnasnet0_5", "classification", _classifier("mnasnet0_5")),
    ModelCase("densenet121", "classification", _classifier("densenet121")),
    ModelCase("convnext_tiny", "classification", _classifier("convnext_tiny")),
    ModelCase("swin_t", "classification", _classifier("swin_t")),
    ModelCase("vit_b_16 (64 px)", "classification", _classifier("vit_b_16", image_size=64)),
    ModelCase("fcn_resnet50", "segmentation", _segmenter("fcn_resnet50"), size=96),
    ModelCase("lraspp_mobilenet_v3_large", "segmentation", _segmenter("lraspp_mobilenet_v3_large"), size=96),
    ModelCase("deeplabv3_mobilenet_v3_large", "segmentation", _segmenter("deeplabv3_mobilenet_v3_large"),
              size=96),
)


def _no_zero_weights(model: nn.Module) -> nn.Module:
    """Untrained torchvision models zero some layers (ViT's head): all-zero logits would verify trivially,
    so those weights get small random values."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                nn.init.normal_(parameter, std=0.02)
    return model


def build_collection(case: ModelCase) -> BrickCollection:
    model = _no_zero_weights(case.build())
    bricks: dict[str, Any] = {"preprocessor": BrickNotTrainable(Preprocessor(), input_names=["raw"],
                                                                output_names=["normalized"])}
    if case.task == "classification":
        bricks["model"] = BrickTrainable(model, input_names=["normalized"], output_names=["logits"])
        bricks["loss"] = BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss"])
    else:
        bricks["model"] = BrickTrainable(SegmentationOutput(model), input_names=["normalized"],
                                         output_names=["logits"])
        bricks["mask"] = BrickNotTrainable(lambda logits: logits.argmax(dim=1), input_names=["logits"],
                                           output_names=["mask"])
        bricks["loss"] = BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "masks"], output_names=["loss"])
    return BrickCollection(bricks)


@dataclass(frozen=True)
class CoverageRow:
    model: str
    task: str
    input_shape: tuple[int, ...]
    params_millions: float
    direct_ok: bool | None  # plain torch.onnx.export(dynamo=True) on the bare model
    export_ok: bool
    verified: bool
    max_abs_error: float | None
    max_rel_error: float | None
    file_mb: float | None
    export_seconds: float | None
    ort_ms: float | None
    eager_ms: float | None
    error: str = ""


def _median_ms(fn: Callable[[], Any], min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def _direct_export(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether torch.onnx.export handles the bare model (dynamic batch) without any help."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), None, dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        return True
    except Exception:
        return False


def run_case(case: ModelCase, folder: Path, batch: int, min_run_time: float, threads: int,
             direct: bool) -> CoverageRow:
    import onnxruntime as ort

    torch.manual_seed(0)
    collection = build_collection(case)
    x = torch.rand(batch, 3, case.size, case.size)
    params = sum(p.numel() for p in collection.parameters()) / 1e6
    common = {"model": case.name, "task": case.task, "input_shape": tuple(x.shape), "params_millions": params}
    direct_ok = _direct_export(collection["model"].model, x) if direct else None
    path = folder / f"{case.name.split()[0]}.onnx"
    try:
        report = export_onnx(collection, path, {"raw": x}, stage=Stage.EXPORT, overwrite=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return CoverageRow(**common, direct_ok=direct_ok, export_ok=False, verified=False, max_abs_error=None,
                           max_rel_error=None, file_mb=None, export_seconds=None, ort_ms=None, eager_ms=None,
                           error=f"{type(error).__name__}: {reason}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"raw": x.numpy()}
    ort_ms = _median_ms(lambda: session.run(None, feed), min_run_time)
    eager_ms = _median_ms(lambda: collection({"raw": x}, stage=Stage.EXPORT), min_run_time)
    path.unlink()
    return CoverageRow(**common, direct_ok=direct_ok, export_ok=True, verified=report.verified,
                       max_abs_error=report.max_abs_error, max_rel_error=report.max_rel_error,
                       file_mb=report.file_size_bytes / 1e6, export_seconds=report.export_seconds, ort_ms=ort_ms,
                       eager_ms=eager_ms)


# ------------------------------------------------------------------------------------------------ rendering
def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(rows: list[CoverageRow], threads: int, batch: int, seconds: float) -> str:
    exported = [r for r in rows if r.export_ok]
    missed = [r for r in rows if r.direct_ok and not r.export_ok]
    missed_names = f" ({', '.join(r.model for r in missed)})" if missed else ""
    lines = [
        "## Export coverage: torchvision models through `export_onnx`",
        "",
        f"Generated by `python benchmarks/bench_export_coverage.py` in {seconds:.0f} s: torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, onnxruntime {_ort_version()}, Python {platform.python_version()}, "
        f"{threads} CPU thread(s) for both torch and ONNX Runtime (CPUExecutionProvider), batch {batch}, "
        "untrained weights (all-zero weight matrices, e.g. ViT's head, re-drawn from N(0, 0.02)). Timings are "
        "medians of `torch.utils.benchmark` `blocked_autorange`; other jobs shared the machine, so treat ratios "
        "as indicative.",
        "",
        "Each model is a brick collection (preprocessor -> model [-> argmax mask] + a loss, dead in EXPORT) "
        "exported with the dynamo exporter and a dynamic batch, then verified with ONNX Runtime against eager "
        f"on the example batch and on random inputs with batch {batch + 1}. *Errors* are over every output "
        "(rel = max abs error / largest eager magnitude). *Direct* says whether plain `torch.onnx.export` "
        "handles the bare model.",
        "",
        f"**{len(exported)}/{len(rows)} exported and verified; models that torch.onnx.export handles directly "
        f"but export_onnx does not: {len(missed)}{missed_names}.**",
        "",
        "| model | task | input | params (M) | direct | export_onnx + verify | max abs err | max rel err | "
        "ONNX MB | export s | ORT ms | eager ms | eager / ORT |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.eager_ms / r.ort_ms if r.eager_ms and r.ort_ms else None
        lines.append(f"| {r.model} | {r.task} | {'x'.join(map(str, r.input_shape))} | {r.params_millions:.1f} | "
                     f"{_yes_no(r.direct_ok)} | {_yes_no(r.export_ok and r.verified)} | "
                     f"{_num(r.max_abs_error, '.2g')} | {_num(r.max_rel_error, '.2g')} | {_num(r.file_mb, '.1f')} | "
                     f"{_num(r.export_seconds, '.1f')} | {_num(r.ort_ms, '.2f')} | {_num(r.eager_ms, '.2f')} | "
                     f"{_num(ratio, '.2f')} |")
    failures = [r for r in rows if r.error]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {r.model}: {r.error}" for r in failures]
    return "\n".join(lines) + "\n"


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown section to this file")
    parser.add_argument("--models", default=None, help="comma-separated subset of: "
                        + ", ".join(c.name.split()[0] for c in CASES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per backend and model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-direct", action="store_true", help="skip plain torch.onnx.export on the bare models")
    args = parser.parse_args(argv)
    # torch.utils.benchmark imports cpp_extension, which logs a warning on machines without CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    wanted = None if args.models is None else {m.strip() for m in args.models.split(",")}
    cases = [c for c in CASES if wanted is None or c.name.split()[0] in wanted]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchbricks_fx_coverage_") as folder:
        for case in cases:
            case_start = time.perf_counter()
            try:
                row = run_case(case, Path(folder), args.batch, args.min_run_time, args.threads, not args.no_direct)
            except Exception:  # a crash outside export_onnx (model build, timing) is reported, not fatal
                traceback.print_exc()
                continue
            rows.append(row)
            print(f"[coverage] {case.name}: export {'ok' if row.export_ok else 'FAILED'}, max abs err "
                  f"{_num(row.max_abs_error, '.2g')}, ORT {_num(row.ort_ms, '.2f')} ms, eager "
                  f"{_num(row.eager_ms, '.2f')} ms ({time.perf_counter() - case_start:.0f} s)", file=sys.stderr,
                  flush=True)
    markdown = to_markdown(rows, args.threads, args.batch, time.perf_counter() - start)
    print(markdown)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    missed = [r for r in rows if r.direct_ok and not r.export_ok]
    return 1 if missed or len(rows) < len(cases) else 0


if __name__ == "__main__":
    sys.exit(main())
