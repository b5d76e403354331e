"""Stop a run whose loss or weights stopped being finite, before such a state becomes its newest checkpoint."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from callbacks.cpu_group import cpu_group
from callbacks.heartbeat import collective
from runs.restart_marker import restart_would_not_help

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss or a weight is NaN or infinite; the message names the step and where it was found."""


def require_finite(
    trainer: pl.Trainer, pl_module: pl.LightningModule, when: str, *, loss: torch.Tensor | None, weights: bool = False
) -> None:
    """Raises NonFiniteLoss on every rank when the loss (if given) or, with ``weights``, a weight of any rank is not
    finite. One device-to-host copy and one CPU all-reduce: at logging steps and before checkpoints, never per step."""
    checks = [torch.isfinite(loss.detach()).all()] if loss is not None else []
    if weights:
        checks += [torch.isfinite(p.detach()).all() for p in pl_module.parameters()]
    finite = torch.stack(checks).all().to("cpu", torch.int32).reshape(1)
    group = cpu_group()
    if group is not None:
        with collective("finite-loss check"):
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
    if finite.item():
        return
    if loss is not None and not torch.isfinite(loss).all():
        what = f"the training loss is {float(loss):g} on rank {trainer.global_rank}"
    elif weights and not all(torch.isfinite(p).all() for p in pl_module.parameters()):
        what = f"a weight is NaN or infinite on rank {trainer.global_rank}"
    else:
        what = "another rank's training loss or weights are not finite"
    if trainer.is_global_zero:
        restart_would_not_help()  # a diverged run diverges again from its checkpoint
    raise NonFiniteLoss(
        f"{what} at global step {trainer.global_step} (epoch {trainer.current_epoch}, {when}): stopped "
        f"before it is saved; the newest checkpoint in {trainer.default_root_dir} precedes it. Lower optimizer.lr, "
        f"lengthen the warm-up, or check the data (with 16-mixed: bf16-mixed has float32's range)"
    )


class StopOnNonFiniteLoss(pl.Callback):
    """Checks the loss at every logging step (where Lightning already copies it to the host) and the weights before
    the epoch's end checkpoints (top-k and last, written after validation); mid-epoch checkpoints check their own
    step (callbacks/mid_epoch_checkpoint.py)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            require_finite(trainer, pl_module, "a logging step", loss=outputs["loss"])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            require_finite(trainer, pl_module, "before validation and the epoch's checkpoints", loss=None, weights=True)

