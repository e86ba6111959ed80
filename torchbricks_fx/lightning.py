"""Training a brick collection with Lightning (optional extra: ``pip install -e ".[lightning]"``).

:class:`BrickLightningModule` injects a collection into Lightning: each step runs the compiled stage for
that step (``training_step``: TRAIN, ``validation_step``: VALIDATION, ``test_step``: TEST,
``predict_step``: INFERENCE), sums the stage's losses and logs them, and logs the stage's metrics at the end
of each epoch.

Logged keys (``<stage>`` is ``train``, ``validation`` or ``test``):

- ``"<stage>/<loss name>"`` for every loss and ``"<stage>/total_loss"`` for their sum (a key no loss name can
  take, so a loss output named ``"loss"`` is fine).  In TRAIN each comes twice: ``..._step`` (this process's
  value at every step, not synchronized) and ``..._epoch`` (the epoch mean, averaged over processes once per
  epoch); in VALIDATION and TEST only the epoch value, without a suffix.
- ``"<stage>/<metric name>"`` for every metric at epoch end; a 1-D metric (per class) as
  ``"<stage>/<metric name>/<index>"``.  Other results (matrices, non-tensors) are not logged; a warning names
  each such metric once.

Only TRAIN needs a loss; VALIDATION and TEST log the losses alive there, if any (a collection may keep its
losses in TRAIN and its metrics in VALIDATION).

Scaling out: the module works with ``Trainer(strategy="ddp", devices=N)`` (one process per device, on one or
many machines).  The collection is a registered submodule, so DDP synchronizes its gradients; torchmetrics
synchronize metric states across processes when ``summarize`` calls ``compute()``.  When some trainable
brick does not run in the TRAIN stage (e.g. a head alive only in INFERENCE), use
``strategy="ddp_find_unused_parameters_true"``: DDP otherwise waits forever for its gradients.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from torchbricks_fx.collection import BrickCollection
from torchbricks_fx.compile_options import CompileOptions, compile_options_of
from torchbricks_fx.errors import BrickError
from torchbricks_fx.fx import compile_stage
from torchbricks_fx.runtime import batch_size_of
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["BrickLightningModule", "OptimizerFactory"]

_TOTAL_LOSS = "total_loss"  # logged key of the losses' sum; "loss" would clash with a loss named "loss"

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Any]
"""Takes the trainable parameters; returns whatever ``LightningModule.configure_optimizers`` may return
(an optimizer, or a dict with ``"optimizer"`` and ``"lr_scheduler"``), e.g.
``functools.partial(torch.optim.SGD, lr=0.1)``."""


def _scalars(name: str, value: Any) -> list[tuple[str, Any]] | None:
    """Loggable scalars of one metric result: a 0-D tensor (or a number) as itself, a 1-D tensor (a per-class
    metric) as ``name/0``, ``name/1``, ...; ``None`` for anything else (matrices, dicts, strings)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [(name, value)]
        if value.dim() == 1:
            return [(f"{name}/{index}", item) for index, item in enumerate(value)]
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(name, value)]
    return None


_Cached = tuple[int, Callable[[dict[str, Any]], dict[str, Any]]]  # (collection revision, stage module)


class BrickLightningModule(pl.LightningModule):
    """A ``LightningModule`` around a :class:`BrickCollection`.

    ``optimizer_factory`` receives the trainable parameters (``functools.partial(torch.optim.AdamW,
    lr=1e-3)``).  Batches are dicts of named inputs, or tuples/lists mapped to ``batch_names`` in order
    (``(images, labels)`` -> ``{"raw": images, "targets": labels}``).  ``outputs`` selects, per stage, the
    values its module returns (e.g. ``{"inference": ["class_prediction"]}`` for ``predict_step``; default:
    every value); keep the losses among them in TRAIN.  Each stage is compiled on first use and rebuilt only
    when its plan or one of its bricks' modules changes.  ``compile=True`` compiles each stage for what it
    is (``compile_stage(..., compile=...)``): TRAIN forward and backward; TEST and predict (INFERENCE) as
    inference graphs, frozen where that measures faster; VALIDATION as an inference graph without freezing,
    because the weights change between validation epochs and refreezing would recompile every epoch.  A
    ``CompileOptions`` sets the options of every stage, except that TRAIN leaves out ``autocast`` (an eval-stage
    option; train in mixed precision with Lightning's ``precision=``).
    Checkpoints hold the collection's weights under ``collection.``.
    """

    def __init__(self, collection: BrickCollection | Mapping[str, Any], optimizer_factory: OptimizerFactory,
                 compile: bool | CompileOptions = False, batch_names: Sequence[str] = ("raw", "targets"),
                 outputs: Mapping[Stage | str, Sequence[str]] | None = None) -> None:
        super().__init__()
        # A registered submodule: the optimizer, DDP and checkpoints see every brick's parameters.
        self.collection = collection if isinstance(collection, BrickCollection) else BrickCollection(collection)
        self.optimizer_factory = optimizer_factory
        compile_options_of(compile)  # refused now rather than at the first step
        self.use_compile = compile  # not self.compile: that is nn.Module.compile()
        self.batch_names = tuple(batch_names)
        self.outputs = {parse_stage(stage): tuple(names) for stage, names in (outputs or {}).items()}
        # Kept out of the module tree (a plain dict): stage modules share the collection's modules, and
        # registering them would duplicate every weight in the state dict.
        self._stage_modules: dict[Stage, _Cached] = {}
        self._unlogged_metrics: set[str] = set()

    # ------------------------------------------------------------------ stages
    def stage_module(self, stage: Stage | str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The compiled module of ``stage``, built on first use and rebuilt only when the collection's plans
        change (a brick's connections, stages or module; not when unrelated bricks are built elsewhere)."""
        stage = parse_stage(stage)
        cached: _Cached | None = self._stage_modules.get(stage)
        revision = self.collection.revision
        if cached is None or cached[0] != revision:
            module = compile_stage(self.collection, stage, outputs=self.outputs.get(stage),
                                   compile=self._compile_options(stage))
            cached = (revision, module)
            self._stage_modules[stage] = cached
        return cached[1]

    def _compile_options(self, stage: Stage) -> CompileOptions | bool:
        if self.use_compile is True:
            return CompileOptions(freeze=False if stage is Stage.VALIDATION else None)
        if isinstance(self.use_compile, CompileOptions) and stage is Stage.TRAIN:
            # Autocast is an eval-stage option (verified against float32 eager); training stays float32 here
            # (Lightning's precision="bf16-mixed" is the way to train in mixed precision).
            return dataclasses.replace(self.use_compile, autocast=None)
        return self.use_compile

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

    def forward(self, named_inputs: dict[str, Any], stage: Stage | str = Stage.INFERENCE) -> dict[str, Any]:
        return self.stage_module(stage)(named_inputs)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: Stage) -> torch.Tensor | None:
        named_inputs = self.named_inputs(batch)
        outputs = self.stage_module(stage)(named_inputs)
        losses = self.collection.extract_losses(outputs)
        if not losses:
            return None
        if _TOTAL_LOSS in losses:
            raise BrickError(f"A loss named {_TOTAL_LOSS!r} would be logged under the key of the losses' sum, "
                             f"'{stage.value}/{_TOTAL_LOSS}'; rename that loss output.")
        not_scalar = {name: tuple(loss.shape) for name, loss in losses.items() if loss.dim() != 0}
        if not_scalar:
            raise BrickError(f"Losses must be scalars to be summed; got shapes {not_scalar} in stage {stage.value} "
                             f"(reduce them in the loss brick, e.g. reduction='mean').")
        total = torch.stack([loss.float() for loss in losses.values()]).sum()
        batch_size = _batch_size(named_inputs)
        for name, value in losses.items():
            self._log_loss(f"{stage.value}/{name}", value.detach(), stage, batch_size)
        self._log_loss(f"{stage.value}/{_TOTAL_LOSS}", total.detach(), stage, batch_size, prog_bar=True)
        return total

    def _log_loss(self, key: str, value: torch.Tensor, stage: Stage, batch_size: int | None,
                  prog_bar: bool = False) -> None:
        # Synchronizing every step would all-reduce once per loss and step under DDP; the epoch value is
        # synchronized once, at epoch end.  Validation and test log the epoch value only (no suffix).
        epoch_key = key
        if stage is Stage.TRAIN:
            self.log(f"{key}_step", value, on_step=True, on_epoch=False, sync_dist=False, batch_size=batch_size,
                     prog_bar=prog_bar)
            epoch_key = f"{key}_epoch"
        self.log(epoch_key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size,
                 prog_bar=prog_bar)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, Stage.TRAIN)
        if loss is None:
            raise BrickError("No loss in stage train: mark a brick's outputs as losses (BrickLoss, or "
                             "loss_output_names=...) alive in TRAIN (with outputs=..., keep them among the TRAIN "
                             "outputs).")
        return loss

    # With several validation or test dataloaders, Lightning passes dataloader_idx and logs the losses per
    # dataloader; the metric bricks accumulate over all of them (one state per stage).
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        # No loss here is fine: e.g. losses alive only in TRAIN and metrics in VALIDATION.
        return self._step(batch, Stage.VALIDATION)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        return self._step(batch, Stage.TEST)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.stage_module(Stage.INFERENCE)(self.named_inputs(batch))

    # ------------------------------------------------------------------ metrics at epoch end
    def _log_metrics(self, stage: Stage) -> None:
        # torchmetrics' compute() already gathers the states of every process, so every process holds the
        # same global values; sync_dist only averages identical numbers (and silences Lightning's warning).
        for name, value in self.collection.summarize(stage, reset=True).items():
            key = f"{stage.value}/{name}"
            scalars = _scalars(key, value)
            if scalars is None:
                if name not in self._unlogged_metrics:  # warn once per metric, not every epoch
                    self._unlogged_metrics.add(name)
                    what = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                            else f"a {type(value).__name__}")
                    warnings.warn(f"Metric {key!r} is not logged: it is {what}, and only 0-D and 1-D tensors are; "
                                  f"read it from collection.summarize() instead.", stacklevel=2)
                continue
            for scalar_key, scalar in scalars:
                self.log(scalar_key, scalar, sync_dist=True)

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
    # Lightning cannot tell which entry of a dict batch carries the batch size; the first batched tensor does.
    return batch_size_of({n: v for n, v in named_inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0})
