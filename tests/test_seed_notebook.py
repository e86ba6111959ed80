"""Every example of the original torchbricks README runs with only the import root changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "README.ipynb"


def seed_code_cells() -> list[str]:
    cells = json.loads(SEED.read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    # The CIFAR-10 / Lightning cell needs the seed repository's test utilities and a dataset download.
    return [source for source in sources if "utils_testing" not in source]


def to_torchbricks_fx(source: str) -> str:
    return re.sub(r"\btorchbricks\b", "torchbricks_fx", source)


@pytest.mark.skipif(not SEED.exists(), reason="the seed notebook is not beside this checkout")
def test_seed_readme_cells_run_with_only_the_import_root_changed(capsys):
    cells = seed_code_cells()
    assert len(cells) == 5
    namespace: dict = {}
    for source in cells:
        exec(compile(to_torchbricks_fx(source), str(SEED), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "dict_keys(['raw', 'processed', 'embedding', 'logits', 'softmaxed'])" in printed
    assert "metrics={'MulticlassAccuracy': tensor(" in printed
    outputs = namespace["named_outputs"]
    assert {"loss_ce", "logits", "probabilities", "class_prediction"} <= set(outputs)
    assert outputs["loss_ce"].requires_grad
    assert namespace["resnet_brick"].model.n_backbone_features == 512
    assert isinstance(namespace["metrics"]["MulticlassAccuracy"], torch.Tensor)


# ------------------------------------------------------------------------------------------- seed-era names
SEED_ERA = '''
from typing import Any, Dict

import torch
from torch import nn
from torchbricks.bricks import BrickCollection, BrickInterface, Stage
from torchbricks.custom_metrics import ConcatenatePredictionAndTarget


class Shift(BrickInterface, nn.Module):
    """A torchbricks 0.0.9 brick: forward(named_inputs, stage) returns a dict of named outputs."""

    def __init__(self) -> None:
        super().__init__(input_names=["x"], output_names=["shifted", "doubled"])

    def forward(self, named_inputs: Dict[str, Any], stage: Stage) -> Dict[str, Any]:
        x = named_inputs["x"]
        offset = 1.0 if stage == Stage.TRAIN else 0.0
        return {"shifted": x + offset, "doubled": x * 2}
'''


def test_seed_era_base_class_and_custom_metric_work_with_the_import_root_changed():
    from torchbricks_fx import compile_stage

    namespace: dict = {}
    exec(compile(to_torchbricks_fx(SEED_ERA), "seed_era.py", "exec"), namespace)
    collection = namespace["BrickCollection"]({"shift": namespace["Shift"]()})
    x = torch.arange(3.0)
    assert torch.equal(collection({"x": x}, "train")["shifted"], x + 1)
    compiled = compile_stage(collection, "inference")({"x": x})
    assert torch.equal(compiled["shifted"], x) and torch.equal(compiled["doubled"], x * 2)

    metric = namespace["ConcatenatePredictionAndTarget"]()
    metric.update(torch.tensor([1, 2]), torch.tensor([1, 0]))
    metric.update(torch.tensor([3]), torch.tensor([3]))
    predictions, targets = metric.compute()
    assert predictions.tolist() == [1, 2, 3] and targets.tolist() == [1, 0, 3]


def test_a_dict_of_input_names_written_the_other_way_round_says_how_it_maps():
    from torch import nn

    from torchbricks_fx import BrickCollection, BrickGraphError, BrickLoss, Stage

    # The oldest torchbricks read {value name: argument}; torchbricks 0.4 and torchbricks_fx read {argument: value}.
    collection = BrickCollection({"loss": BrickLoss(nn.CrossEntropyLoss(), input_names={"logits": "input",
                                                                                        "labels": "target"},
                                                    output_names=["loss"])})
    with pytest.raises(BrickGraphError, match=r"other way round: a dict maps \{argument: value name\}.*"
                                              r"input_names=\{'input': 'logits', 'target': 'labels'\}"):
        collection.plan(Stage.TRAIN)
