"""The LightningModule: an image classifier with ILSVRC metrics and the SGD recipes of the papers."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from models.card import CARD, ModelCard

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def _accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {f"acc{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in (1, 5)},
        prefix=prefix,
    )


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier; top-1/top-5 accumulate on the device and are reduced across ranks per epoch.

    ``card``: the class index (output ``i`` is the wnid ``card.classes[i]``), the image spec and the architecture,
    written into every checkpoint (models/card.py), so a checkpoint names its classes and says how it was made.
    ``optimizer`` and ``scheduler`` come ready for this run (the learning rate scaled and the steps per epoch set
    once, by ``models.recipe``). ``channels_last`` keeps weights and inputs in NHWC (what DALI outputs; the fast
    layout for convolutions on tensor cores); ``compile`` compiles the network with ``torch.compile`` on its first
    batch.
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        card: ModelCard,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        weight_decay_on_norm_and_bias: bool = True,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "card", "optimizer", "scheduler"])
        self.card = card
        self.net = net(num_classes=len(card.classes))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        if compile:  # in place: the state_dict keeps its keys, so checkpoints and exports are unchanged
            self.net.compile()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = _accuracy_metrics(len(card.classes), "train/")
        self.val_metrics = _accuracy_metrics(len(card.classes), "val/")
        # No NaN checks: each reads a device value on the host at every update (a NaN loss still shows in the
        # result). Without it torchmetrics' mean ignores weights: train batches are all full, so they are averaged
        # as equals; val batches are not, so the val loss is a sum of per-image losses over a count of images.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss_sum, self.val_images = SumMetric(nan_strategy="disable"), SumMetric(nan_strategy="disable")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_loss.update(loss.detach())
        self.train_metrics.update(logits.detach(), labels)
        # not prog_bar: Lightning converts progress-bar values to numbers after every batch (a host-device sync);
        # callbacks/progress.py shows it from callback_metrics when it redraws
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the batch's class scores (log-probabilities for ten crops) for callbacks that analyse them."""
        images, labels = batch
        if images.ndim == 5:  # (batch, crops, C, H, W): the crops' mean probability (Krizhevsky et al. 2012)
            logits = self(images.flatten(0, 1)).unflatten(0, images.shape[:2]).softmax(-1).mean(1).log()
        else:
            logits = self(images)
        self.val_loss_sum.update(self.criterion(logits, labels) * labels.numel())
        self.val_images.update(torch.ones_like(labels, dtype=torch.float32))  # a count made on the device
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)
        return logits

    def on_validation_epoch_end(self) -> None:
        """The mean val loss per image over every rank's images (``compute`` reduces the sums across ranks)."""
        self.log("val/loss", self.val_loss_sum.compute() / self.val_images.compute(), prog_bar=True)
        self.val_loss_sum.reset()
        self.val_images.reset()

    def parameter_groups(self) -> list[dict]:
        """Norm weights and biases (every 1-d parameter) optionally without weight decay."""
        if self.hparams.weight_decay_on_norm_and_bias:
            return [{"params": list(self.net.parameters())}]
        decayed = [p for p in self.net.parameters() if p.ndim > 1]
        exempt = [p for p in self.net.parameters() if p.ndim <= 1]
        return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CARD] = self.card.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming: the checkpoint's outputs must mean the classes this run's data has, in the same order."""
        saved = tuple(checkpoint.get(CARD, {}).get("classes", self.card.classes))
        if saved != self.card.classes:
            raise ValueError(
                f"the checkpoint was trained on other classes than the data holds ({len(saved)} vs "
                f"{len(self.card.classes)}, or another order): resume on the dataset it was trained on"
            )
