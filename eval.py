"""Evaluate a checkpoint on the val split: top-1/top-5 accuracy and error, single- or ten-crop, with an error
analysis in WordNet terms (callbacks/error_analysis.py); or over several test-time resolutions in one command.

python eval.py ckpt=outputs/train/<run>/checkpoints/last.ckpt                   # a demo run's model
python eval.py data=imagenet_dali data.root=/datasets/ILSVRC2012 ckpt=... trainer=gpu trainer.devices=8
python eval.py data.root=/datasets/ILSVRC2012 ckpt=... data.val_crops=10        # ten crops (torchvision loader)
python eval.py data.root=/datasets/ILSVRC2012 ckpt=... resolutions=[160,192,224,256,288] crop_ratio=0.875
python eval.py ckpt=... weights=ema                                             # the run's moving average (model.ema)
python eval.py data.root=/datasets/ILSVRC2012 ckpt=... test_sets=[/datasets/imagenetv2-matched-frequency-format-val]
python eval.py data.root=... ckpt=... test_sets=[/datasets/imagenet-a,/datasets/imagenet-r] restrict_outputs=true
python eval.py data.root=... ckpt=... data.classes=imagenette restrict_outputs=true  # a 1000-class model on 10

The architecture, the image spec and the classes come from the checkpoint; an override of the first two is logged
where it differs. The model is evaluated on its own classes of the dataset (all of them must be there), or with
``restrict_outputs=true`` on a subset of them (``data.classes``, or the classes a set holds), its outputs restricted
to the subset's. Beside ILSVRC top-1/top-5: ReaL top-1 (data/real_labels.py) where the val images are ILSVRC-2012's,
each test set's top-1/top-5 and its gap to val (``sets.csv``), and the published figures for the architecture
(models/published.py).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
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
from callbacks.error_analysis import PREDICTIONS, ErrorAnalysis
from data.ilsvrc import DatasetLayoutError, ILSVRCLayout
from data.real_labels import ReaLLabels, ReaLResult, real_accuracy, val_image_id
from data.spec import ConfigError
from loggers.quiet import quiet_libraries
from models.card import ModelCard, configured_by_card
from models.export import PREFIXES, load_weights_only, network_state_dict
from models.published import format_record

log = logging.getLogger(__name__)

TABLE, PLOT, SETS, REAL, RECORD = "resolutions.csv", "resolutions.png", "sets.csv", "real.json", "record.md"
COLUMNS = ("val_image_size", "val_resize_size", "input", "top1", "top5", "loss", "real_top1")
SET_COLUMNS = ("set", "root", "classes", "images", "top1", "top5", "top1_gap", "top5_gap", "loss", "real_top1")
REAL_AGREEMENT = 0.5  # ILSVRC-2012's own val labels are in ReaL's lists for most images; a set named alike is not


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
    """Validation metrics of ``cfg.ckpt`` (loaded weights-only; ``cfg.weights``: raw or ema) with its architecture,
    image spec and classes on the val split of ``cfg.data``, one row per resolution of ``cfg.resolutions`` (null:
    one, at the configured val size), then one per set of ``cfg.test_sets``; writes the reports. The checkpoint is
    loaded once, and one Trainer serves every evaluation: only the val spec or the layout, hence the loader, changes
    between them."""
    require_cuda_where_asked(cfg)
    test_sets = named_test_sets(cfg.test_sets)
    if cfg.resolutions is not None and test_sets:
        raise ConfigError("test_sets", list(cfg.test_sets), "[] with resolutions: evaluate them in two commands")
    if cfg.real_labels not in (None, "auto") and not Path(str(cfg.real_labels)).expanduser().is_file():
        raise ConfigError("real_labels", cfg.real_labels, "auto, null, or a file of ReaL labels (real.json's format)")
    checkpoint = load_weights_only(cfg.ckpt)
    card = ModelCard.of_checkpoint(checkpoint, cfg.ckpt)
    state = chosen_weights(checkpoint["state_dict"], cfg.weights, cfg.ckpt)
    cfg = configured_by_card(cfg, card)
    if cfg.data.classes is None and not cfg.restrict_outputs:
        cfg.data.classes = list(card.classes)  # the model's classes, of a dataset that may hold more
    datamodule = instantiate(cfg.data)
    sizes = sweep_sizes(cfg, datamodule.spec.val_crop, datamodule.spec.val_resize_size)
    analysis, seen = ErrorAnalysis(cfg.report_dir), ValInputSize()
    trainer = instantiate(cfg.trainer, callbacks=[analysis, seen], logger=instantiate_all(cfg.logger))
    datamodule.share_index_with(trainer)  # before the layout is read: one rank indexes, the others read its result
    try:
        classes = card.evaluated_classes(datamodule.classes, cfg.restrict_outputs, str(datamodule.root))
    except DatasetLayoutError as error:
        raise ValueError(
            f"{cfg.ckpt} was trained on {len(card.classes)} classes: {error}. Evaluate on the dataset it was trained "
            "on, or on the classes of it that the dataset holds with restrict_outputs=true (and data.classes)"
        ) from None
    module = instantiate(cfg.model, _partial_=True)(card=card)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{cfg.ckpt} does not fit model.net.arch={cfg.model.net.arch}: drop the model override\n{str(error)[:500]}"
        ) from None
    module.evaluate_on(classes)
    rows = []
    for size, resize in sizes:
        datamodule.spec = replace(datamodule.spec, val_image_size=size, val_resize_size=resize)
        if cfg.resolutions is not None:  # each resolution's error analysis in its own folder
            analysis.folder = Path(cfg.report_dir) / f"{size}px"
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        if seen.size not in (None, (size, size)):  # None: this rank had no val batch
            raise RuntimeError(f"data/loader={datamodule.loader.name} made val batches of {seen.size}, not {size} px")
        real = real_top1(cfg.real_labels, analysis.folder, datamodule.layout) if trainer.is_global_zero else None
        rows.append(
            {
                "val_image_size": size,
                "val_resize_size": resize,
                "input": "x".join(map(str, seen.size or (size, size))),
                "top1": float(metrics["val/acc1"]),
                "top5": float(metrics["val/acc5"]),
                "loss": float(metrics["val/loss"]),
                "real_top1": real.top1 if real else None,
            }
        )
    if cfg.resolutions is not None:
        if trainer.is_global_zero:
            report_resolutions(rows, Path(cfg.report_dir), trained_at=card.image_spec.image_size, title=str(cfg.ckpt))
        return rows
    val = {"set": "val", "root": str(datamodule.layout.root), "classes": len(classes), **rows[0]}
    val["images"] = len(datamodule.layout.val)
    sets = [val]
    wanted = datamodule.class_selection.wnids if datamodule.class_selection else card.classes
    for root, name in test_sets:
        layout = datamodule.eval_set(root)
        subset = [wnid for wnid in layout.wnids if wnid in wanted]
        if not subset:
            raise ValueError(f"test set {root} holds none of the {len(wanted)} classes evaluated")
        datamodule.layout = layout.subset(subset)
        module.evaluate_on(card.evaluated_classes(subset, cfg.restrict_outputs, root))
        analysis.folder = Path(cfg.report_dir) / name
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        sets.append(
            {
                "set": name,
                "root": root,
                "classes": len(subset),
                "images": len(datamodule.layout.val),
                "top1": float(metrics["val/acc1"]),
                "top5": float(metrics["val/acc5"]),
                "loss": float(metrics["val/loss"]),
            }
        )
    if trainer.is_global_zero:
        report_sets(sets, Path(cfg.report_dir), arch=card.architecture["arch"])
    return sets


def named_test_sets(roots: Sequence[str]) -> list[tuple[str, str]]:
    """(root, name) of each test set, named by its folder: each name once, since it names the set's report folder."""
    if isinstance(roots, str) or not all(isinstance(root, str) for root in roots):
        raise ConfigError("test_sets", roots, "a list of folders, e.g. test_sets=[/datasets/imagenet-r]")
    named = [(str(root), Path(str(root)).expanduser().resolve().name) for root in roots]
    names = [name for _, name in named]
    repeated = sorted({name for name in names if names.count(name) > 1} | ({"val"} & set(names)))
    if repeated:
        raise ConfigError("test_sets", list(roots), f"folders of distinct names, and none named val: {repeated}")
    return named


def real_top1(setting: str | None, folder: Path, layout: ILSVRCLayout) -> ReaLResult | None:
    """ReaL top-1 of the predictions that the error analysis wrote to ``folder`` (every image once, all ranks'):
    ``setting`` null: none; a file: its labels; ``auto``: the project's copy, where the val images are ILSVRC-2012's
    (named by val id, and their labels agree with ReaL's). Why there is none is logged."""
    if setting is None:
        return None
    with open(folder / PREDICTIONS, newline="") as file:
        rows = list(csv.reader(file, delimiter="\t"))[1:]
    paths = [row[0] for row in rows]
    index = {wnid: i for i, wnid in enumerate(layout.wnids)}
    top1 = [index[row[2].split()[0]] for row in rows]
    original = [index[row[1]] for row in rows]
    if setting == "auto":
        unnamed = [path for path in paths if val_image_id(path) is None]
        if unnamed:
            log.info(
                "ReaL top-1: not measured: %d val images are not named by ILSVRC-2012 val id, e.g. %s",
                len(unnamed),
                unnamed[0],
            )
            return None
        result = real_accuracy(paths, top1, layout.wnids, ReaLLabels.load(), original=original)
        agreeing = (result.agreement or 0.0) * result.counted / len(paths)  # of all: a label elsewhere disagrees
        if agreeing < REAL_AGREEMENT:
            log.warning(
                "ReaL top-1: not measured: the val labels of %s are among ReaL's for %.1f%% of its images named by "
                "ILSVRC-2012 val id: not ILSVRC-2012's val images (real_labels=FILE measures against a file anyway)",
                layout.root,
                100 * agreeing,
            )
            return None
    else:
        result = real_accuracy(paths, top1, layout.wnids, ReaLLabels.load(setting), original=original)
    log.info("%s", result.summary())
    (folder / REAL).write_text(json.dumps(result.to_dict(), indent=1))
    return result


def report_sets(rows: list[dict], folder: Path, arch: str) -> None:
    """``sets.csv``: top-1/top-5 of val and of each test set, with the gap to val; the table to the log, and the
    published figures for ``arch`` beside val's errors (``record.md``)."""
    val = rows[0]
    for row in rows:
        row["top1_gap"], row["top5_gap"] = row["top1"] - val["top1"], row["top5"] - val["top5"]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / SETS, "w", newline="") as file:
        writer = csv.DictWriter(file, SET_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    real = "" if val.get("real_top1") is None else f", ReaL top-1 {val['real_top1']:.4f}"
    lines = [
        "| set | classes | images | top-1 | top-5 | top-1 gap to val | top-5 gap to val |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['set']} | {r['classes']} | {r['images']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['top1_gap']:+.4f} "
            f"| {r['top5_gap']:+.4f} |"
            for r in rows
        ),
    ]
    log.info("Val (%s%s) and test sets: %s\n%s", val["root"], real, folder / SETS, "\n".join(lines))
    split = f"{Path(val['root']).name} val ({val['classes']} classes, {val['images']} images)"
    record = format_record(arch, 100 * (1 - val["top1"]), 100 * (1 - val["top5"]), split)
    (folder / RECORD).write_text(record)
    log.info("The record for %s:\n%s", arch, record)


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
    """Returns val's top-1 (the best of a resolution sweep), for Hydra's sweepers."""
    quiet_libraries()
    rows = evaluate(cfg)
    if cfg.resolutions is None:
        crops = f"{cfg.data.val_crops} crop{'s' * (cfg.data.val_crops > 1)}"
        log.info("Validation metrics (%s, %s weights): %s", crops, cfg.weights, rows[0])
    return rows[0]["top1"] if cfg.resolutions is None else max(row["top1"] for row in rows)


if __name__ == "__main__":
    main()
