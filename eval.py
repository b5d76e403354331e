"""Evaluate a checkpoint on the val split: top-1/top-5 accuracy and error, single- or ten-crop, with an error
analysis in WordNet terms (callbacks/error_analysis.py).

python eval.py ckpt=outputs/train/<run>/checkpoints/last.ckpt                   # the demo run's model (resnet18)
python eval.py experiment=resnet50 data.root=/datasets/ILSVRC2012 ckpt=... data.val_crops=10 trainer.devices=8
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from callbacks.error_analysis import ErrorAnalysis
from models.export import load_weights_only
from train import instantiate_all

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validation metrics of ``cfg.ckpt`` (loaded weights-only) under ``cfg.data``; writes the report."""
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, classes=datamodule.classes, image_spec=datamodule.spec)
    state = load_weights_only(cfg.ckpt)["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{cfg.ckpt} does not fit model={cfg.model.net.arch} with {len(datamodule.classes)} classes: pass the "
            f"model= of the run that wrote it (its .hydra/config.yaml)\n{str(error)[:500]}"
        ) from None
    trainer = instantiate(cfg.trainer, callbacks=[ErrorAnalysis(cfg.report_dir)], logger=instantiate_all(cfg.logger))
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in metrics.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    metrics = evaluate(cfg)
    log.info("Validation metrics (%d crop%s): %s", cfg.data.val_crops, "s" * (cfg.data.val_crops > 1), metrics)
    return metrics["val/acc1"]


if __name__ == "__main__":
    main()
