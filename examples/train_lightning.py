"""Journey 4: train the multi-task model with Lightning; every step runs the compiled stage for that step.

    python examples/train_lightning.py                                   # one process
    python examples/train_lightning.py --devices 2 --strategy ddp       # two processes (DDP), CPU or GPU
    python examples/train_lightning.py --compile                        # each stage compiled for what it is

DDP starts one process per device by re-running this script, so everything runs under ``main()``.
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import lightning.pytorch as pl
import torch
from _models import loader, multitask_bricks
from lightning.pytorch.loggers import CSVLogger

from torchbricks_fx.lightning import BrickLightningModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help='"auto", "ddp", "ddp_find_unused_parameters_true", ...')
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="compile each stage for what it is (compile=True)")
    parser.add_argument("--log-dir", default=None, help="CSV logs go here (default: a temporary folder)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pl.seed_everything(0, verbose=False)
    module = BrickLightningModule(multitask_bricks(), functools.partial(torch.optim.AdamW, lr=1e-3),
                                  compile=args.compile)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="torchbricks_fx_lightning_")
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                         max_epochs=args.epochs, limit_train_batches=args.steps_per_epoch,
                         logger=CSVLogger(log_dir, name="multitask"), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    batches = 8 * args.steps_per_epoch * args.devices
    # Batches are dicts of named inputs ({"raw", "targets", "masks"}); Lightning adds a DistributedSampler
    # under DDP, so each process sees its own share.
    if args.epochs > 0:  # --epochs 0 only tests the initial weights
        trainer.fit(module, train_dataloaders=loader(size=batches, batch_size=8, shuffle=True),
                    val_dataloaders=loader(size=32, batch_size=8, seed=1))
    fitted = dict(trainer.logged_metrics)
    results = trainer.test(module, dataloaders=loader(size=32, batch_size=8, seed=2), verbose=False)
    if trainer.is_global_zero:
        print(f"world size {trainer.world_size}, strategy {type(trainer.strategy).__name__}")
        for name in sorted(fitted):
            print(f"{name}: {float(fitted[name]):.4f}")
        for name, value in sorted(results[0].items()):
            print(f"{name}: {value:.4f}")
        print(f"CSV logs in {trainer.logger.log_dir if trainer.logger else log_dir}")


if __name__ == "__main__":
    main()
