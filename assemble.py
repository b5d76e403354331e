"""A run's objects assembled from its config, for every entry point (train.py, eval.py, the benchmark suite): the
callbacks and loggers groups, and the LightningModule with the run's numbers computed once from the data, the
Trainer and the recipe (the learning rate scaled by the global batch, Goyal et al. 2017, and the schedule's steps
per epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_info

from data.datamodule import ImageNetDataModule
from models.card import ModelCard, architecture_of
from models.classifier import ImageClassifier


def instantiate_all(group: DictConfig | None) -> list:
    """Every object of a named-entries group (callbacks, logger); a ``null`` entry, or a factory that returns None,
    switches one off."""
    objects = [instantiate(entry) for entry in (group or {}).values() if entry is not None]
    return [instance for instance in objects if instance is not None]


@dataclass(frozen=True)
class TrainingPlan:
    """``lr``: the rate used, ``base_lr`` per ``lr_reference_batch`` images scaled to the real global batch (per
    device x world size x accumulation); ``steps_per_epoch``: optimizer steps each rank takes per epoch."""

    base_lr: float
    lr_reference_batch: int | None
    batch_size: int
    world_size: int
    accumulate: int
    steps_per_epoch: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulate

    @property
    def lr(self) -> float:
        reference = self.lr_reference_batch
        return self.base_lr * self.global_batch / reference if reference else self.base_lr

    def describe(self) -> str:
        if not self.lr_reference_batch:
            return f"Learning rate {self.lr:g} (no batch scaling); global batch {self.global_batch}"
        return (
            f"Learning rate {self.lr:g} = {self.base_lr:g} x global batch {self.global_batch} / "
            f"{self.lr_reference_batch} ({self.batch_size} per device x {self.world_size} devices x "
            f"{self.accumulate} accumulated)"
        )


def training_plan(cfg: DictConfig, datamodule: ImageNetDataModule, trainer: pl.Trainer) -> TrainingPlan:
    """The plan of this run: ``limit_train_batches`` and gradient accumulation applied to the loader's batches."""
    batches = datamodule.train_batches_per_epoch(trainer.world_size)
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    return TrainingPlan(
        base_lr=cfg.optimizer.lr,
        lr_reference_batch=cfg.lr_reference_batch,
        batch_size=datamodule.batch_size,
        world_size=trainer.world_size,
        accumulate=trainer.accumulate_grad_batches,
        steps_per_epoch=max(1, math.ceil(batches / trainer.accumulate_grad_batches)),
    )


def training_module(cfg: DictConfig, datamodule: ImageNetDataModule, trainer: pl.Trainer) -> ImageClassifier:
    """``cfg.model`` with this run's card (classes, image spec, architecture), its optimizer and schedule sized by
    the plan."""
    plan = training_plan(cfg, datamodule, trainer)
    rank_zero_info(plan.describe())
    card = ModelCard(tuple(datamodule.classes), datamodule.spec, architecture_of(cfg.model.net))
    return instantiate(cfg.model, _partial_=True)(  # objects as they are: instantiate's kwargs go through OmegaConf
        card=card,
        optimizer=instantiate(cfg.optimizer, lr=plan.lr),
        scheduler=instantiate(cfg.scheduler, steps_per_epoch=plan.steps_per_epoch) if cfg.scheduler else None,
    )
