"""Evaluate a checkpoint on the val split: top-1/top-5 accuracy and error, single- or ten-crop, with an error
analysis in WordNet terms (callbacks/error_analysis.py).

python eval.py ckpt=outputs/train/<run>/checkpoints/last.ckpt                   # a demo run's model
python eval.py data=imagenet_dali data.root=/datasets/ILSVRC2012 ckpt=... trainer=gpu trainer.devices=8
python eval.py data.root=/datasets/ILSVRC2012 ckpt=... data.val_crops=10        # ten crops (torchvision loader)

The architecture and the image spec come from the checkpoint; an override of either is logged where it differs.
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from accelerator_check import require_cuda_where_asked
from assemble import instantiate_all
from callbacks.error_analysis import ErrorAnalysis
from loggers.quiet import quiet_libraries
from models.card import ModelCard, configured_by_card
from models.export import load_weights_only

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validation metrics of ``cfg.ckpt`` (loaded weights-only) with its architecture and image spec, on the val
    split of ``cfg.data``; writes the report."""
    require_cuda_where_asked(cfg)
    checkpoint = load_weights_only(cfg.ckpt)
    card = ModelCard.of_checkpoint(checkpoint, cfg.ckpt)
    cfg = configured_by_card(cfg, card)
    datamodule = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, callbacks=[ErrorAnalysis(cfg.report_dir)], logger=instantiate_all(cfg.logger))
    datamodule.share_index_with(trainer)  # before the layout is read: one rank indexes, the others read its result
    if tuple(datamodule.classes) != card.classes:
        raise ValueError(
            f"{cfg.ckpt} was trained on {len(card.classes)} classes, {datamodule.root} holds {len(datamodule.classes)} "
            "others (or in another order): evaluate on the dataset it was trained on"
        )
    module = instantiate(cfg.model, _partial_=True)(card=card)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"{cfg.ckpt} does not fit model.net.arch={cfg.model.net.arch}: drop the model override\n{str(error)[:500]}"
        ) from None
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in metrics.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    metrics = evaluate(cfg)
    log.info("Validation metrics (%d crop%s): %s", cfg.data.val_crops, "s" * (cfg.data.val_crops > 1), metrics)
    return metrics["val/acc1"]


if __name__ == "__main__":
    main()
