"""The time to write a time-based checkpoint: a real Trainer of the configured model trains a few steps, then saves
``checkpoints/timed-stepN.ckpt`` the way callbacks.mid_epoch_checkpoint does (Lightning's dump of model,
optimizer, schedule and loops, through the atomic checkpoint writer: a staged file, fsync, rename).

    python -m benchmarks.checkpoint_write [--folder F] [--repeats 3] [overrides ...]   # default: model=resnet50

The folder decides the file system measured (default: a temporary folder under /tmp, removed after). Prints and
returns the seconds of each write and the file's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

from benchmarks.suite import Setup, compose_config
from loggers.quiet import quiet_libraries
from runs.checkpoints import CHECKPOINTS, TIMED_NAME


class TimedWrites(pl.Callback):
    """After the last step: ``repeats`` time-based checkpoints, each timed from the call to the renamed file."""

    def __init__(self, repeats: int) -> None:
        self.repeats, self.seconds, self.bytes = repeats, [], 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _ in range(self.repeats):
            path = Path(trainer.default_root_dir, CHECKPOINTS, TIMED_NAME.format(step=trainer.global_step))
            start = time.perf_counter()
            trainer.save_checkpoint(path, weights_only=False)
            self.seconds.append(time.perf_counter() - start)
            self.bytes = path.stat().st_size


def measure(overrides: list[str], folder: str, repeats: int) -> dict:
    cfg = compose_config(["model=resnet50", "data.spec.image_size=64", "data.batch_size=8", *overrides], folder)
    writes = TimedWrites(repeats)
    setup = Setup(
        cfg,
        max_steps=2,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[writes],
    )
    setup.trainer.fit(setup.module, datamodule=setup.datamodule)
    return {"model": cfg.model.net.arch, "folder": folder, "mb": writes.bytes / 2**20, "seconds": writes.seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="the run folder (default: a new temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_args(argv)
    quiet_libraries()
    folder = args.folder or tempfile.mkdtemp(prefix="checkpoint-write-")
    try:
        result = measure(args.overrides, folder, args.repeats)
    finally:
        if not args.folder:
            shutil.rmtree(folder)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
