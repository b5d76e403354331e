"""Classify image files or folders with a checkpoint: the top-k classes with names and probabilities.

python predict.py ckpt=outputs/train/<run>/checkpoints/last.ckpt inputs=[cat.jpg,holiday/]
Files that cannot be decoded are reported and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from data import affinity
from data.ilsvrc import IMAGE_SUFFIXES, wordnet_names
from data.spec import ImageSpec
from data.torchvision_backend import decode, val_transform
from models.card import ModelCard, configured_by_card
from models.export import load_weights_only

log = logging.getLogger(__name__)


def image_files(inputs: Sequence[str]) -> list[Path]:
    """The files given, and the images below the folders given, sorted."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            files.append(item)
    return files


class Images(Dataset):
    """(index, uint8 image or None, error) per file: a bad file becomes a reported error, not a crash."""

    def __init__(self, files: list[Path], spec: ImageSpec) -> None:
        self.files, self.spec, self.transform = files, spec, val_transform(spec)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(decode(str(self.files[index]), self.spec)), None
        except (RuntimeError, OSError) as error:
            return index, None, str(error).splitlines()[0] or type(error).__name__


def predictions(cfg: DictConfig) -> Iterator[tuple[Path, list[tuple[float, str, str]] | None, str | None]]:
    """Per file: its top-k (probability, wnid, name), or None and the reason it could not be read."""
    checkpoint = load_weights_only(cfg.ckpt)
    card = ModelCard.of_checkpoint(checkpoint, cfg.ckpt)
    cfg = configured_by_card(cfg, card)
    spec, wnids = instantiate(cfg.data.spec), card.classes
    module = instantiate(cfg.model, _partial_=True)(card=card)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    names = wordnet_names()
    files = image_files(cfg.inputs)
    workers = affinity.data_workers(cfg.data.num_workers, affinity.rank_cpus(0, 1))
    loader = DataLoader(
        Images(files, spec),
        batch_size=cfg.data.batch_size,
        num_workers=workers,
        collate_fn=list,
    )
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    for batch in loader:
        good = [(i, image) for i, image, _ in batch if image is not None]
        scores = {}
        if good:
            with torch.no_grad():
                images = (torch.stack([image for _, image in good]).float() - mean) / std
                top = module(images).softmax(-1).topk(min(cfg.top_k, len(wnids)))
            for (i, _), probs, classes in zip(good, top.values.tolist(), top.indices.tolist()):
                scores[i] = [(p, wnids[c], names.get(wnids[c], wnids[c])) for p, c in zip(probs, classes)]
        for i, _, error in batch:
            yield files[i], scores.get(i), error


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    failed = done = 0
    for path, top, error in predictions(cfg):
        if top is None:
            failed += 1
            log.warning("%s: skipped, cannot be decoded (%s)", path, error)
            continue
        done += 1
        print(f"{path}: " + " | ".join(f"{p:.3f} {wnid} {name}" for p, wnid, name in top))
    log.info("%d image(s) classified, %d skipped", done, failed)
    if not done:
        raise SystemExit(f"no image could be classified in {list(cfg.inputs)}")


if __name__ == "__main__":
    main()
