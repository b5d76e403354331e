"""Images/s of this trainer against a plain PyTorch loop: same model, data, optimizer, batches and steps.

    python benchmarks/trainer_vs_loop.py [--steps 60] [--warmup 10] [--repeats 3] [hydra overrides ...]

Both sides take their data, model and optimizer from the project's config (default: experiment=demo), and are
timed from the end of warm-up step ``--warmup`` to the end of the last step; the median over repeats is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from train import instantiate_all  # noqa: E402


class StepClock(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def compose_config(overrides: list[str], output_dir: str) -> DictConfig:
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)
    return cfg


def trainer_run(cfg: DictConfig, steps: int, warmup: int) -> float:
    pl.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, num_classes=datamodule.num_classes)
    clock = StepClock(warmup)
    callbacks = [c for c in instantiate_all(cfg.callbacks) if not isinstance(c, pl.callbacks.ModelCheckpoint)]
    trainer = instantiate(
        cfg.trainer,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, clock],
        logger=instantiate_all(cfg.logger),
    )
    trainer.fit(module, datamodule=datamodule)
    return (steps - warmup) * datamodule.batch_size / (clock.end - clock.start)


def plain_loop(cfg: DictConfig, steps: int, warmup: int) -> float:
    """What a hand-written loop does: the same loader, model, loss, optimizer and per-step schedule."""
    pl.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, num_classes=datamodule.num_classes)
    net, criterion = module.net, module.criterion
    optimizer = instantiate(cfg.optimizer)(net.parameters())
    loader = datamodule.train_dataloader()
    scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=len(loader))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16-mixed")
    net.train()
    step, start = 0, 0.0
    while step < steps:
        for batch in loader:
            images, labels = datamodule.on_after_batch_transfer(batch, 0)
            with autocast:
                loss = criterion(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == warmup:
                start = time.perf_counter()
            if step == steps:
                break
    return (steps - warmup) * datamodule.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    results: dict[str, list[float]] = {"trainer": [], "plain loop": []}
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = compose_config(overrides, output_dir)
        with open_dict(cfg):
            del cfg.hydra
        for _ in range(args.repeats):  # alternate, so drifts in the machine's speed hit both alike
            results["trainer"].append(trainer_run(cfg, args.steps, args.warmup))
            results["plain loop"].append(plain_loop(cfg, args.steps, args.warmup))
    print(
        f"\nmodel {cfg.model.net.arch}, batch {cfg.data.batch_size}, image {cfg.data.image_size}px, "
        f"precision {cfg.trainer.precision}, {args.steps - args.warmup} timed steps after {args.warmup}, "
        f"{args.repeats} repeats, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    )
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"{name:>10}: {medians[name]:8.1f} img/s (median; runs {', '.join(f'{v:.1f}' for v in values)})")
    print(f"     ratio: {medians['trainer'] / medians['plain loop']:.3f} (trainer / plain loop)")


if __name__ == "__main__":
    main()
