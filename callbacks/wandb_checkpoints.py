"""Opt-in: the best and the last checkpoint as W&B model artifacts, with the validation metrics as metadata."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)


class WandbCheckpoints(pl.Callback):
    """At the end of fit (rank zero), ModelCheckpoint's best and last files become versions of the artifact
    ``model-<run id>``, aliased ``best`` and ``last``. Offline runs record them for ``wandb sync``. Written by hand
    because Lightning's ``WandbLogger(log_model=True)`` refuses offline runs and records only the monitored score."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        run = next((logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        checkpoints = trainer.checkpoint_callback
        if run is None or checkpoints is None:
            log.warning("callbacks.wandb_checkpoints needs logger=wandb and a ModelCheckpoint: nothing uploaded")
            return
        import wandb

        final = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        last = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor is None), "")
        for alias, path in (("best", checkpoints.best_model_path), ("last", last or checkpoints.last_model_path)):
            if not path:
                continue
            metadata = {"file": Path(path).name, "epoch": trainer.current_epoch, "final_val": final}
            score = checkpoints.best_k_models.get(path)
            if score is not None:
                metadata[checkpoints.monitor] = float(score)
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
            artifact.add_file(path)
            run.log_artifact(artifact, aliases=[alias])
            log.info("W&B artifact model-%s:%s <- %s", run.id, alias, path)
