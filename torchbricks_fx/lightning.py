"""Training a brick collection with Lightning (optional extra: ``pip install -e ".[lightning]"``).

:class:`BrickLightningModule` injects a collection into Lightning: each step runs the compiled stage for
that step (``training_step``: TRAIN, ``validation_step``: VALIDATION, ``test_step``: TEST,
``predict_step``: INFERENCE), sums the stage's losses, logs every loss under ``"<stage>/<loss name>"`` and,
at the end of each epoch, the stage's metrics under ``"<stage>/<metric name>"``.

Scaling out: the module works with ``Trainer(strategy="ddp", devices=N)`` (one process per device, on one or
many machines).  The collection is a registered submodule, so DDP synchronizes its gradients; torchmetrics
synchronize metric states across processes when ``summarize`` calls ``compute()``.  When some trainable
brick does not run in the TRAIN stage (e.g. a head alive only in INFERENCE), use
``strategy="ddp_find_unused_parameters_true"``: DDP otherwise waits forever for its gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from torchbricks_fx.bricks import structure_version
from torchbricks_fx.collection import BrickCollection
from torchbricks_fx.errors import BrickError
from torchbricks_fx.fx import StageModule, compile_stage
from torchbricks_fx.stage import Stage

__all__ = ["BrickLightningModule", "OptimizerFactory"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Any]
"""Takes the trainable parameters; returns whatever ``LightningModule.configure_optimizers`` may return
(an optimizer, or a dict with ``"optimizer"`` and ``"lr_scheduler"``), e.g.
``functools.partial(torch.optim.SGD, lr=0.1)``."""


def _scalars(name: str, value: Any) -> Iterable[tuple[str, Any]]:
    """Loggable scalars: a per-class metric (a vector) is logged as ``name/0``, ``name/1``, ..."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        for index, item in enumerate(value.flatten()):
            yield f"{name}/{index}", item
    elif isinstance(value, (torch.Tensor, int, float)):
        yield name, value


class BrickLightningModule(pl.LightningModule):
    """A ``LightningModule`` around a :class:`BrickCollection`.

    ``optimizer_factory`` receives the trainable parameters (``functools.partial(torch.optim.AdamW,
    lr=1e-3)``).  Batches are dicts of named inputs, or tuples/lists mapped to ``batch_names`` in order
    (``(images, labels)`` -> ``{"raw": images, "targets": labels}``).  Each stage is compiled once, on first
    use (``compile=True`` also wraps it in ``torch.compile``).  Checkpoints hold the collection's weights under
    ``collection.``.
    """

    def __init__(self, collection: BrickCollection | Mapping[str, Any], optimizer_factory: OptimizerFactory,
                 compile: bool = False, batch_names: Sequence[str] = ("raw", "targets")) -> None:
        super().__init__()
        # A registered submodule: the optimizer, DDP and checkpoints see every brick's parameters.
        self.collection = collection if isinstance(collection, BrickCollection) else BrickCollection(collection)
        self.optimizer_factory = optimizer_factory
        self.use_compile = compile  # not self.compile: that is nn.Module.compile()
        self.batch_names = tuple(batch_names)
        # Kept out of the module tree (a plain dict): stage modules share the collection's modules, and
        # registering them would duplicate every weight in the state dict.
        self._stage_modules: dict[Stage, tuple[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}

    # ------------------------------------------------------------------ stages
    def stage_module(self, stage: Stage) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The compiled module of ``stage``, built on first use and again after the collection's bricks or
        connections change."""
        version = structure_version()
        cached = self._stage_modules.get(stage)
        if cached is None or cached[0] != version:
            module: StageModule = compile_stage(self.collection, stage)
            cached = (version, torch.compile(module) if self.use_compile else module)
            self._stage_modules[stage] = cached
        return cached[1]

    def named_inputs(self, batch: Any) -> dict[str, Any]:
        """A batch as a dict of named inputs (see ``batch_names``)."""
        if isinstance(batch, Mapping):
            return dict(batch)
        if isinstance(batch, (tuple, list)):
            if len(batch) > len(self.batch_names):
                raise BrickError(f"A batch of {len(batch)} items but batch_names names {len(self.batch_names)}: "
                                 f"{list(self.batch_names)}; pass batch_names with one name per item.")
            return dict(zip(self.batch_names, batch, strict=False))  # (images,) is fine
        if isinstance(batch, torch.Tensor):
            return {self.batch_names[0]: batch}
        raise BrickError(f"Batches must be dicts of named inputs, tuples/lists or tensors, not "
                         f"{type(batch).__name__}.")

    def forward(self, named_inputs: dict[str, Any], stage: Stage = Stage.INFERENCE) -> dict[str, Any]:
        return self.stage_module(stage)(named_inputs)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: Stage) -> torch.Tensor:
        named_inputs = self.named_inputs(batch)
        outputs = self.stage_module(stage)(named_inputs)
        losses = self.collection.extract_losses(outputs)
        if not losses:
            raise BrickError(f"No loss in stage {stage.value}: mark a brick's outputs as losses (BrickLoss, or "
                             f"loss_output_names=...) alive in that stage.")
        not_scalar = {name: tuple(loss.shape) for name, loss in losses.items() if loss.dim() != 0}
        if not_scalar:
            raise BrickError(f"Losses must be scalars to be summed; got shapes {not_scalar} in stage {stage.value} "
                             f"(reduce them in the loss brick, e.g. reduction='mean').")
        total = torch.stack([loss.float() for loss in losses.values()]).sum()
        on_step = stage is Stage.TRAIN
        batch_size = _batch_size(named_inputs)
        # sync_dist averages the epoch value over processes under DDP (a no-op on one process).
        log = dict(on_step=on_step, on_epoch=True, sync_dist=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"{stage.value}/{name}", value.detach(), **log)  # type: ignore[arg-type]
        self.log(f"{stage.value}/loss", total.detach(), prog_bar=True, **log)  # type: ignore[arg-type]
        return total

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, Stage.TRAIN)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, Stage.VALIDATION)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, Stage.TEST)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.stage_module(Stage.INFERENCE)(self.named_inputs(batch))

    # ------------------------------------------------------------------ metrics at epoch end
    def _log_metrics(self, stage: Stage) -> None:
        # torchmetrics' compute() already gathers the states of every process, so every process holds the
        # same global values; sync_dist only averages identical numbers (and silences Lightning's warning).
        for name, value in self.collection.summarize(stage, reset=True).items():
            for key, scalar in _scalars(f"{stage.value}/{name}", value):
                self.log(key, scalar, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._log_metrics(Stage.TRAIN)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(Stage.VALIDATION)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(Stage.TEST)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        return self.optimizer_factory([p for p in self.collection.parameters() if p.requires_grad])


def _batch_size(named_inputs: Mapping[str, Any]) -> int | None:
    # Lightning cannot tell which entry of a dict batch carries the batch size; the first tensor does.
    first = next((v for v in named_inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return None if first is None else int(first.shape[0])
