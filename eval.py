"""Evaluate a checkpoint on the val split: top-1/top-5 accuracy and error, single- or ten-crop, with an error
analysis in WordNet terms (callbacks/error_analysis.py); or over several test-time resolutions in one command.

python eval.py ckpt=outputs/train/<run>/checkpoints/last.ckpt                   # a demo run's model
python eval.py data=imagenet_dali data.root=/datasets/ILSVRC2012 ckpt=... trainer=gpu trainer.devices=8
python eval.py data.root=/datasets/ILSVRC2012 ckpt=... data.val_crops=10        # ten crops (torchvision loader)
python eval.py data.root=/datasets/ILSVRC2012 ckpt=... resolutions=[160,192,224,256,288] crop_ratio=0.875
python eval.py ckpt=... weights=ema                                             # the run's moving average (model.ema)

The architecture and the image spec come from the checkpoint; an override of either is logged where it differs.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import DictConfig

from accelerator_check import require_cuda_where_asked
from assemble import instantiate_all
from callbacks.error_analysis import ErrorAnalysis
from data.spec import ConfigError
from loggers.quiet import quiet_libraries
from models.card import ModelCard, configured_by_card
from models.export import PREFIXES, load_weights_only, network_state_dict

log = logging.getLogger(__name__)

TABLE, PLOT = "resolutions.csv", "resolutions.png"
COLUMNS = ("val_image_size", "val_resize_size", "input", "top1", "top5", "loss")


def chosen_weights(state: dict[str, torch.Tensor], weights: str, path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict`` as the module (without EMA) loads it: ``net.*`` as trained (``raw``) or
    their moving average (``ema``: the checkpoint's ``ema_net.*``, models/export.py's rule); every other key as
    saved, so that the strict load still checks it."""
    if weights not in PREFIXES:
        raise ConfigError("weights", weights, "raw (as trained) or ema (their moving average: a run with model.ema)")
    try:
        network = network_state_dict({"state_dict": state}, weights)
    except ValueError as error:
        raise ValueError(f"weights={weights}: {path}: {error}") from None
    others = {key: value for key, value in state.items() if not key.startswith(tuple(PREFIXES.values()))}
    return others | {PREFIXES["raw"] + key: value for key, value in network.items()}


def sweep_sizes(cfg: DictConfig, val_image_size: int, val_resize_size: int) -> list[tuple[int, int]]:
    """(centre crop, shorter side) per evaluation: each of ``cfg.resolutions`` resized by ``cfg.crop_ratio`` (null:
    the configured crop over shorter side), or just the configured pair."""
    if cfg.resolutions is None:
        return [(val_image_size, val_resize_size)]
    if not cfg.resolutions or not all(isinstance(r, int) and not isinstance(r, bool) for r in cfg.resolutions):
        raise ConfigError("resolutions", cfg.resolutions, "a list of centre crops in pixels, or null: one evaluation")
    ratio = val_image_size / val_resize_size if cfg.crop_ratio is None else cfg.crop_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError("crop_ratio", ratio, "the centre crop over the shorter side, 0 < crop_ratio <= 1, or null")
    return [(size, round(size / ratio)) for size in cfg.resolutions]


class ValInputSize(pl.Callback):
    """The height and width of the val batches the model saw: the table shows what reached it, not what was
    asked."""

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.size: tuple[int, int] | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.size = tuple(batch[0].shape[-2:])


def evaluate(cfg: DictConfig) -> list[dict[str, float | int | str]]:
    """Validation metrics of ``cfg.ckpt`` (loaded weights-only; ``cfg.weights``: raw or ema) with its architecture
    and image spec on the val split of ``cfg.data``, one row per resolution of ``cfg.resolutions`` (null: one, at
    the configured val size); writes the reports. The checkpoint is loaded once, and one Trainer and one dataset
    index serve every resolution: only the val spec, hence the loader, changes between them."""
    require_cuda_where_asked(cfg)
    checkpoint = load_weights_only(cfg.ckpt)
    card = ModelCard.of_checkpoint(checkpoint, cfg.ckpt)
    state = chosen_weights(checkpoint["state_dict"], cfg.weights, cfg.ckpt)
    cfg = configured_by_card(cfg, card)
    datamodule = instantiate(cfg.data)
    sizes = sweep_sizes(cfg, datamodule.spec.val_crop, datamodule.spec.val_resize_size)
    analysis, seen = ErrorAnalysis(cfg.report_dir), ValInputSize()
    trainer = instantiate(cfg.trainer, callbacks=[analysis, seen], logger=instantiate_all(cfg.logger))
    datamodule.share_index_with(trainer)  # before the layout is read: one rank indexes, the others read its result
    if tuple(datamodule.classes) != card.classes:
        raise ValueError(
            f"{cfg.ckpt} was trained on {len(card.classes)} classes, {datamodule.root} holds {len(datamodule.classes)} "
            "others (or in another order): evaluate on the dataset it was trained on"
        )
    module = instantiate(cfg.model, _partial_=True)(card=card)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{cfg.ckpt} does not fit model.net.arch={cfg.model.net.arch}: drop the model override\n{str(error)[:500]}"
        ) from None
    rows = []
    for size, resize in sizes:
        datamodule.spec = replace(datamodule.spec, val_image_size=size, val_resize_size=resize)
        if cfg.resolutions is not None:  # each resolution's error analysis in its own folder
            analysis.folder = Path(cfg.report_dir) / f"{size}px"
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        if seen.size not in (None, (size, size)):  # None: this rank had no val batch
            raise RuntimeError(f"data/loader={datamodule.loader.name} made val batches of {seen.size}, not {size} px")
        rows.append(
            {
                "val_image_size": size,
                "val_resize_size": resize,
                "input": "x".join(map(str, seen.size or (size, size))),
                "top1": float(metrics["val/acc1"]),
                "top5": float(metrics["val/acc5"]),
                "loss": float(metrics["val/loss"]),
            }
        )
    if cfg.resolutions is not None and trainer.is_global_zero:
        report_resolutions(rows, Path(cfg.report_dir), trained_at=card.image_spec.image_size, title=str(cfg.ckpt))
    return rows


def report_resolutions(rows: list[dict], folder: Path, trained_at: int, title: str) -> None:
    """``resolutions.csv`` and ``resolutions.png`` (top-1 and top-5 against the val centre crop, the training crop
    marked) in ``folder``; the table also to the log."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TABLE, "w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| val_image_size | val_resize_size | input | top-1 | top-5 | loss |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['val_image_size']} | {r['val_resize_size']} | {r['input']} | {r['top1']:.4f} | {r['top5']:.4f} "
            f"| {r['loss']:.4f} |"
            for r in rows
        ),
    ]
    log.info(
        "Top-1 against the val resolution (trained at %d px): %s\n%s", trained_at, folder / TABLE, "\n".join(lines)
    )
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    ordered = sorted(rows, key=lambda r: r["val_image_size"])
    sizes = [r["val_image_size"] for r in ordered]
    for column, label in (("top1", "top-1"), ("top5", "top-5")):
        ax.plot(sizes, [r[column] for r in ordered], marker="o", label=label)
    ax.axvline(trained_at, color="grey", linestyle="--", label=f"trained at {trained_at} px")
    ax.set(title=title, xlabel="val centre crop (px)", ylabel="accuracy", xticks=sizes)
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / PLOT, dpi=100)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    """Returns the top-1 (the best of a sweep), for Hydra's sweepers."""
    quiet_libraries()
    rows = evaluate(cfg)
    if cfg.resolutions is None:
        crops = f"{cfg.data.val_crops} crop{'s' * (cfg.data.val_crops > 1)}"
        log.info("Validation metrics (%s, %s weights): %s", crops, cfg.weights, rows[0])
    return max(row["top1"] for row in rows)


if __name__ == "__main__":
    main()
