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
