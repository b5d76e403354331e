"""Train an image classifier: config -> data -> trainer -> model -> fit (the trainer before the model: the world
size it resolves sizes the learning rate and the schedule, computed once in models/recipe.py).

python train.py                                   # ResNet-18 on the embedded demo dataset, CPU
python train.py experiment=resnet50 data.root=/datasets/ILSVRC2012 trainer.devices=8
python train.py run_id=<an earlier run>          # continue that run from its newest checkpoint (ckpt_path=auto)
sbatch slurm/single_node.sbatch experiment=resnet50 data.root=...          # on SLURM (see slurm/README.md)
python train.py -m hydra/launcher=slurm trainer=slurm model=resnet18,resnet50  # a sweep on SLURM
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from accelerator_check import require_cuda_where_asked
from assemble import instantiate_all, training_module
from loggers import wandb_logger
from loggers.quiet import quiet_libraries
from loggers.run_metadata import run_config
from runs.resume import resume_from
from sweeps.summary import METRICS, refuse_subprocess_ddp_in_multirun

log = logging.getLogger(__name__)
VALIDATION = ("val/", "val_ema/")  # the final metrics a run returns and writes: its weights' and their moving average's


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit as configured; returns the final validation metrics."""
    require_cuda_where_asked(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.callbacks), logger=instantiate_all(cfg.logger)
    )
    refuse_subprocess_ddp_in_multirun(trainer)
    # one job per run folder, since runs resume from it: global rank 0 holds it until the run has ended
    with instantiate(cfg.run_lock)(trainer.default_root_dir) if trainer.is_global_zero else nullcontext():
        datamodule.share_index_with(trainer)  # before the layout is read: one rank indexes, the others read its result
        module = training_module(cfg, datamodule, trainer)
        for logger in trainer.loggers:
            logger.log_hyperparams(run_config(cfg, trainer.world_size))
        ckpt_path = resume_from(cfg.ckpt_path, trainer.default_root_dir, global_rank=trainer.global_rank)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # never runs pickled code
        wandb_logger.finish(trainer)
        metrics = {
            name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith(VALIDATION)
        }
        if trainer.is_global_zero:  # what a sweep's summary reads (sweeps/summary.py)
            Path(cfg.paths.output_dir, METRICS).write_text(json.dumps(metrics, indent=1))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_libraries()
    metrics = train(cfg)
    log.info("Final validation metrics: %s", metrics)
    return metrics.get("val/acc1")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
