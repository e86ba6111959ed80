"""Journey 1: a multi-task model, inspected and compiled per stage, trained through its compiled TRAIN stage.

    python examples/compile_per_stage.py
"""

from __future__ import annotations

import torch
from _models import example_batch, loader, multitask_bricks

from torchbricks_fx import Stage, compile_stage


def main() -> None:
    torch.manual_seed(0)
    collection = multitask_bricks()
    collection.check()  # every stage is valid: no missing inputs, duplicate outputs or cycles

    # Each stage has its own plan: what runs, what it needs, what it returns and what is pruned, and why.
    for stage in (Stage.TRAIN, Stage.INFERENCE):
        print(collection.plan(stage).describe(), end="\n\n")
    print(collection.to_mermaid(Stage.INFERENCE), end="\n\n")

    train = compile_stage(collection, Stage.TRAIN)
    inference = compile_stage(collection, Stage.INFERENCE, outputs=["classify/class_prediction",
                                                                    "segment/class_prediction"])
    print(f"TRAIN inputs {list(train.input_names)}; INFERENCE inputs {list(inference.input_names)}")
    print(f"INFERENCE pruned {dict(inference.pruned)}")
    print(inference.graph_module.code)

    # Stage modules share the collection's modules: training through TRAIN updates INFERENCE too.
    optimizer = torch.optim.AdamW(collection.parameters(), lr=1e-3)
    for step, batch in enumerate(loader(size=48, batch_size=8)):
        outputs = train(batch)
        losses = collection.extract_losses(outputs)  # {"classify/loss_ce": ..., "segment/loss_segmentation": ...}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        print(f"step {step}: " + ", ".join(f"{name} {value.item():.3f}" for name, value in losses.items()))
    metrics = collection.summarize(Stage.TRAIN, reset=True)  # the compiled stage updated the metrics
    print("train metrics:", {name: round(float(value), 3) for name, value in metrics.items()})

    batch = example_batch()
    compiled = inference({"raw": batch["raw"]})
    eager = collection({"raw": batch["raw"]}, Stage.INFERENCE)
    for name, value in compiled.items():
        torch.testing.assert_close(value, eager[name])
    print("compiled INFERENCE == eager:", {name: tuple(value.shape) for name, value in compiled.items()})


if __name__ == "__main__":
    main()
