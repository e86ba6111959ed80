"""Journey 2: export the EXPORT stage of the multi-task model to ONNX with a dynamic batch, verify it against
eager, and run it with onnxruntime.

    python examples/export_onnx.py [--out model.onnx]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _models import example_batch, multitask_bricks

from torchbricks_fx import Stage, export_onnx

OUTPUTS = ["classify/probabilities", "classify/class_prediction", "segment/class_prediction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="ONNX file to write (default: in a temporary folder)")
    args = parser.parse_args()
    path = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="torchbricks_fx_onnx_")) / "multitask.onnx"

    torch.manual_seed(0)
    collection = multitask_bricks()
    # EXPORT needs only the image: losses and metrics are dead in that stage, so they are not in the file.
    print(collection.plan(Stage.EXPORT, outputs=OUTPUTS).describe())
    batch = example_batch(batch_size=2)
    report = export_onnx(collection, path, {"raw": batch["raw"]}, stage=Stage.EXPORT, outputs=OUTPUTS,
                         dynamic_batch=True, verify=True, overwrite=True)
    print(report.to_markdown())

    # The file runs without torch or torchbricks_fx: onnxruntime, named inputs and outputs, any batch size.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print("inputs:", [(i.name, i.shape) for i in session.get_inputs()])
    print("outputs:", [(o.name, o.shape) for o in session.get_outputs()])
    images = example_batch(batch_size=5)["raw"]
    got = dict(zip(OUTPUTS, session.run(OUTPUTS, {"raw": images.numpy()}), strict=True))
    expected = collection({"raw": images}, Stage.EXPORT)
    for name in OUTPUTS:
        np.testing.assert_allclose(got[name], expected[name].numpy(), rtol=1e-4, atol=1e-4)
        print(f"{name}: onnxruntime {got[name].shape} matches eager")


if __name__ == "__main__":
    main()
