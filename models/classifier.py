"""The LightningModule: an image classifier with ILSVRC metrics and the SGD recipes of the papers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from models.card import CARD, ModelCard
from models.ema import WeightEMA
from models.export import PREFIXES
from models.mixing import BatchMixing

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
MixingFactory = Callable[..., BatchMixing | None]
NoWeightDecay = Literal["norm", "norm_and_bias", "ffcv_bn_names"]
NET, EMA_NET = PREFIXES["raw"], PREFIXES["ema"]  # the state_dict's prefixes: the network, its moving average
# Normalisation layers by type, as torchvision's reference (``--norm-weight-decay``): every BatchNorm (SyncBatchNorm
# too), InstanceNorm, GroupNorm, LayerNorm and RMSNorm.
NORM_LAYERS = (
    *(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
    *(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm),
)


def _accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {f"acc{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in (1, 5)},
        prefix=prefix,
    )


def weight_decay_groups(net: nn.Module, no_weight_decay: NoWeightDecay | None) -> list[dict]:
    """The optimizer's parameter groups: every parameter decayed (``None``), or a second group without weight decay
    of

    - ``norm``: the parameters of normalisation layers, by type (torchvision's V2 recipe, ``--norm-weight-decay 0``;
      biases of convolutions and of the classifier stay decayed);
    - ``norm_and_bias``: every 1-d parameter, norm weights and all biases (NVIDIA's ResNet-50 recipe);
    - ``ffcv_bn_names``: the parameters whose name holds ``bn``, as FFCV's ImageNet example selects them (its
      ``bn_wd: 0``). In torchvision's ResNets this misses the BN of each downsample branch (``downsample.1``), which
      stays decayed: the exact selection, for a faithful reproduction of FFCV's recipe.
    """
    if no_weight_decay is None:
        return [{"params": list(net.parameters())}]
    if no_weight_decay == "norm":
        norms = [m for m in net.modules() if isinstance(m, NORM_LAYERS)]
        exempt = {id(p) for m in norms for p in m.parameters(recurse=False)}
    elif no_weight_decay == "norm_and_bias":
        exempt = {id(p) for p in net.parameters() if p.ndim <= 1}
    else:
        exempt = {id(p) for name, p in net.named_parameters() if "bn" in name}
    decayed = [p for p in net.parameters() if id(p) not in exempt]
    return [{"params": decayed}, {"params": [p for p in net.parameters() if id(p) in exempt], "weight_decay": 0.0}]


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier; top-1/top-5 accumulate on the device and are reduced across ranks per epoch.

    ``card``: the class index (output ``i`` is the wnid ``card.classes[i]``), the image spec and the architecture,
    written into every checkpoint (models/card.py), so a checkpoint names its classes and says how it was made.
    ``optimizer`` and ``scheduler`` come ready for this run (the learning rate scaled and the steps per epoch set
    once, by ``models.recipe``). ``channels_last`` keeps weights and inputs in NHWC (what DALI outputs; the fast
    layout for convolutions on tensor cores); ``compile`` compiles the network with ``torch.compile`` on its first
    batch.

    ``ema`` (models/ema.py): a moving average of the weights, the submodule ``ema_net`` (same keys as ``net``, so
    checkpoints hold ``ema_net.*`` beside ``net.*``), updated after every ``ema.every_n_steps``-th optimizer step and
    validated beside the network as ``val_ema/acc1``, ``val_ema/acc5``, ``val_ema/loss``; it stays uncompiled.
    ``mixing`` (models/mixing.py): MixUp/CutMix of each training batch; the loss takes the soft labels, and
    ``train/acc1``/``acc5`` count a prediction against the class of the larger share (argmax of the soft label; a
    tie, MixUp's 0.5 exactly, goes to the lower class index). ``test_time_flip``: each val image's logits are the
    mean of its own and its mirror's (FFCV's ``lr_tta`` sums them: the same ranking, hence accuracy; the mean keeps
    the loss comparable with a run without), for the average too. ``no_weight_decay``: see
    ``weight_decay_groups``.
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        card: ModelCard,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        no_weight_decay: NoWeightDecay | None = None,
        ema: WeightEMA | None = None,
        mixing: MixingFactory | None = None,
        test_time_flip: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if no_weight_decay not in (None, *get_args(NoWeightDecay)):
            raise ValueError(f"model.no_weight_decay={no_weight_decay}: null, or one of {get_args(NoWeightDecay)}")
        self.save_hyperparameters(ignore=["net", "card", "optimizer", "scheduler", "ema", "mixing"])
        self.card = card
        self.net = net(num_classes=len(card.classes))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.ema = ema
        self.ema_net = ema.average_of(self.net) if ema else None  # of the uncompiled network
        self.mixing = mixing(num_classes=len(card.classes)) if mixing else None
        if compile:  # in place: the state_dict keeps its keys, so checkpoints and exports are unchanged
            # static shapes: one graph per distinct input (each size of a resolution ramp, val's size and its last
            # partial batch), each with kernels for its shape, instead of one slower dynamic-shape graph
            self.net.compile(dynamic=False)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = _accuracy_metrics(len(card.classes), "train/")
        self.val_metrics = _accuracy_metrics(len(card.classes), "val/")
        # No NaN checks: each reads a device value on the host at every update (a NaN loss still shows in the
        # result). Without it torchmetrics' mean ignores weights: train batches are all full, so they are averaged
        # as equals; val batches are not, so the val loss is a sum of per-image losses over a count of images.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss_sum, self.val_images = SumMetric(nan_strategy="disable"), SumMetric(nan_strategy="disable")
        if ema:
            self.val_ema_metrics = _accuracy_metrics(len(card.classes), "val_ema/")
            self.val_ema_loss_sum = SumMetric(nan_strategy="disable")
        self.register_buffer("output_index", None, persistent=False)  # evaluate_on's subset of the outputs

    def evaluate_on(self, classes: Sequence[str]) -> None:
        """Validate on these of the card's classes only (eval.py's ``restrict_outputs``: a wider model on a class
        subset, or on ImageNet-A's and -R's 200 classes): the val scores are the network's outputs for them, in this
        order, so that a label indexes ``classes``; the card's classes: every output, as trained."""
        missing = [wnid for wnid in classes if wnid not in self.card.classes]
        if missing:
            raise ValueError(f"the model was not trained on {len(missing)} of these classes: {missing[:5]}")
        whole = tuple(classes) == self.card.classes
        self.output_index = None if whole else torch.tensor([self.card.classes.index(w) for w in classes])
        self.val_metrics = _accuracy_metrics(len(classes), "val/")
        if self.ema_net is not None:
            self.val_ema_metrics = _accuracy_metrics(len(classes), "val_ema/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(self.net, images)

    def _logits(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return net(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.mixing is not None:  # labels become rows of class shares
            images, labels = self.mixing(images, labels, key=(self.global_rank, self.global_step, batch_idx))
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_loss.update(loss.detach())
        if labels.ndim == 2:  # mixed: accuracy against the class of the larger share
            labels = labels.argmax(-1)
        self.train_metrics.update(logits.detach(), labels)
        # not prog_bar: Lightning converts progress-bar values to numbers after every batch (a host-device sync);
        # callbacks/progress.py shows it from callback_metrics when it redraws
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, then the moving average's update where due (``global_step`` counts the steps before this one;
        with gradient accumulation, optimizer steps, not batches)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self.ema.due(self.global_step + 1):
            self.ema.update(self.ema_net, self.net)

    def class_scores(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``net``'s scores of a val batch: logits, with ``test_time_flip`` the mean of the image's and its
        mirror's; for ten crops ``(batch, crops, C, H, W)``, the log of the crops' mean probability (Krizhevsky et
        al. 2012)."""
        if images.ndim == 5:
            if self.hparams.test_time_flip:
                raise ValueError(
                    "model.test_time_flip with ten-crop validation (data.val_crops=10): the ten crops already hold "
                    "each crop's mirror; use one or the other"
                )
            crops = self._evaluated(self._logits(net, images.flatten(0, 1))).unflatten(0, images.shape[:2])
            return crops.softmax(-1).mean(1).log()
        logits = self._evaluated(self._logits(net, images))
        if self.hparams.test_time_flip:
            return (logits + self._evaluated(self._logits(net, images.flip(-1)))) / 2
        return logits

    def _evaluated(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the evaluated classes (``evaluate_on``)."""
        return logits if self.output_index is None else logits.index_select(-1, self.output_index)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the network's class scores of the batch (``class_scores``) for callbacks that analyse them."""
        images, labels = batch
        logits = self.class_scores(self.net, images)
        self.val_loss_sum.update(self.criterion(logits, labels) * labels.numel())
        self.val_images.update(torch.ones_like(labels, dtype=torch.float32))  # a count made on the device
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)
        if self.ema_net is not None:
            averaged = self.class_scores(self.ema_net, images)
            self.val_ema_loss_sum.update(self.criterion(averaged, labels) * labels.numel())
            self.val_ema_metrics.update(averaged, labels)
            self.log_dict(self.val_ema_metrics, on_step=False, on_epoch=True)
        return logits

    def on_validation_epoch_end(self) -> None:
        """The mean val loss per image over every rank's images (``compute`` reduces the sums across ranks)."""
        images = self.val_images.compute()
        self.log("val/loss", self.val_loss_sum.compute() / images, prog_bar=True)
        self.val_loss_sum.reset()
        self.val_images.reset()
        if self.ema_net is not None:
            self.log("val_ema/loss", self.val_ema_loss_sum.compute() / images)
            self.val_ema_loss_sum.reset()

    def parameter_groups(self) -> list[dict]:
        return weight_decay_groups(self.net, self.hparams.no_weight_decay)

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

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Loads a checkpoint with a moving average where ``ema`` is off (its ``ema_net.*`` left out: predict.py and
        eval.py use the network), and one without where it is on (the average starts from its weights: a run
        resumed with ``model.ema`` newly set)."""
        averaged = any(key.startswith(EMA_NET) for key in state_dict)
        if self.ema_net is None and averaged:
            state_dict = {key: value for key, value in state_dict.items() if not key.startswith(EMA_NET)}
        elif self.ema_net is not None and not averaged:
            rank_zero_info("The checkpoint holds no moving average of the weights (ema_net.*): it starts from them")
            average = {EMA_NET + k.removeprefix(NET): v for k, v in state_dict.items() if k.startswith(NET)}
            state_dict = {**state_dict, **average}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming: the checkpoint's outputs must mean the classes this run's data has, in the same order."""
        saved = tuple(checkpoint.get(CARD, {}).get("classes", self.card.classes))
        if saved != self.card.classes:
            raise ValueError(
                f"the checkpoint was trained on other classes than the data holds ({len(saved)} vs "
                f"{len(self.card.classes)}, or another order): resume on the dataset and data.classes it was trained on"
            )
