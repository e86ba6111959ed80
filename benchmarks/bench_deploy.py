"""Deploy: the candidate table (metrics, latency per candidate, the chosen one's speed-up over eager) for

1. the digits model of ``examples/digits.py``: real data (scikit-learn's bundled handwritten digits), trained
   with Lightning, judged by its own accuracy and cross-entropy metric bricks on the validation split;
2. ResNet-18 (torchvision, random weights, nothing downloaded) on **synthetic** data: random images, and as
   "targets" eager's own top-1 predictions on them, so the accuracy metric brick measures agreement with
   float32 eager (1.0 for eager by construction).  Random labels would say nothing; agreement says how
   much a candidate changes the model's decisions.

    python benchmarks/bench_deploy.py --markdown benchmarks/results/deploy.md
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchbricks_fx import BrickCollection, BrickMetricSingle, BrickNotTrainable, BrickTrainable, DeployReport, deploy
from torchbricks_fx.bag_of_bricks import ImageClassifier, Preprocessor, resnet_to_brick
from torchbricks_fx.reporting import cpu_model

COMMAND = "python benchmarks/bench_deploy.py --markdown benchmarks/results/deploy.md"
ROOT = Path(__file__).resolve().parents[1]


def _progress(tag: str) -> Callable[[str], None]:
    return lambda line: print(f"[deploy {tag}] {line}", file=sys.stderr, flush=True)


def _digits() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy_digits(folder: Path, args: argparse.Namespace) -> tuple[DeployReport, dict[str, float]]:
    digits = _digits()
    collection, test_metrics = digits.trained()
    report = deploy(collection, folder / "digits", {"raw": digits.splits()["validation"].images[:2]},
                    outputs=digits.OUTPUTS, validation=digits.validation(), max_metric_drop=0.01,
                    batch_sizes=[1, 32], threads=args.threads, min_run_time=args.min_run_time,
                    progress=_progress("digits"))
    return report, test_metrics


def resnet18(num_classes: int = 10) -> BrickCollection:
    torch.manual_seed(0)
    backbone = resnet_to_brick(torchvision.models.resnet18(weights=None, num_classes=num_classes),
                               input_name="normalized", output_name="features")
    return BrickCollection({
        "preprocessor": BrickNotTrainable(Preprocessor(), input_names=["raw"], output_names=["normalized"]),
        "backbone": backbone,
        "head": BrickTrainable(ImageClassifier(num_classes=num_classes, n_features=backbone.model.n_backbone_features),
                               input_names=["features"], output_names=["logits", "probabilities", "class_prediction"]),
        "agreement": BrickMetricSingle(MulticlassAccuracy(num_classes=num_classes, average="micro"),
                                       input_names=["class_prediction", "targets"], metric_name="agreement"),
    })


def deploy_resnet(folder: Path, args: argparse.Namespace) -> DeployReport:
    collection = resnet18()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(8, 3, args.size, args.size, generator=generator) for _ in range(args.resnet_batches)]
    predictions = [collection({"raw": batch}, "export")["class_prediction"] for batch in images]
    validation = [{"raw": batch, "targets": targets} for batch, targets in zip(images, predictions, strict=True)]
    return deploy(collection, folder / "resnet18", {"raw": images[0][:2]},
                  outputs=["probabilities", "class_prediction"], validation=validation, max_metric_drop=0.01,
                  batch_sizes=[1, 8], threads=args.threads, min_run_time=args.min_run_time,
                  progress=_progress("resnet18"))


def to_markdown(digits: tuple[DeployReport, dict[str, float]], resnet: DeployReport, args: argparse.Namespace,
                seconds: float) -> str:
    import onnxruntime

    digits_report, test_metrics = digits
    lines = [
        "## Deploy: the fastest artifact the collection's metrics accept",
        "",
        f"Command: `{COMMAND}`  ",
        f"Machine: {cpu_model()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python "
        f"{platform.python_version()}, {args.threads} thread(s) for torch and ONNX Runtime, "
        f"{args.min_run_time:g} s of `blocked_autorange` per measurement, {seconds:.0f} s in all. Each table states "
        "the machine's load while it was timed: latencies measured above the number of cores are indicative; "
        "the metrics do not depend on it.",
        "",
        "### Digits: real data (scikit-learn's handwritten digits, `examples/digits.py`)",
        "",
        f"Trained with `BrickLightningModule` for 6 epochs: test accuracy {test_metrics['test/accuracy']:.4f}. "
        "Candidates are judged by the collection's own metric bricks (accuracy, cross-entropy) on the 359-image "
        "validation split, budget 0.01 per metric.",
        "",
        digits_report.to_markdown().rstrip(),
        "",
        f"### ResNet-18: synthetic data ({args.size}x{args.size} random images)",
        "",
        "torchvision `resnet18(weights=None)` as preprocessor, backbone and head bricks. The validation set is "
        f"{args.resnet_batches} batches of 8 random images whose *targets are eager's own predictions*, and the "
        "metric brick is top-1 accuracy against them: *agreement* with float32 eager (1.0 for eager by "
        "construction), budget 0.01.",
        "",
        resnet.to_markdown().rstrip(),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown section to this file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=224, help="ResNet-18 image size")
    parser.add_argument("--resnet-batches", type=int, default=8, help="synthetic validation batches of 8 images")
    args = parser.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torchbricks_fx_bench_deploy_") as folder:
        digits = deploy_digits(Path(folder), args)
        resnet = deploy_resnet(Path(folder), args)
    text = to_markdown(digits, resnet, args, time.perf_counter() - start)
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
