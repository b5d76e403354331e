"""Classify image files or folders, or tar shards, with a checkpoint: the top-k classes with names and probabilities.

python predict.py ckpt=outputs/train/<run>/checkpoints/last.ckpt inputs=[cat.jpg,holiday/,shards/,val-000000.tar]
A shard set's folder (it holds manifest.json) stands for its val split, the held-out images (its train split is what
a model was fitted on); a ``.tar`` for its samples, its DALI index ``.idx`` beside it. A shard's sample is named
``<tar>:<key>``. Images that cannot be decoded are reported and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from data import affinity
from data.ilsvrc import IMAGE_SUFFIXES, wordnet_names
from data.shard_reader import ShardReader
from data.shard_set import ShardSet, ShardSetError, is_shard_set
from data.spec import ImageSpec
from data.torchvision_backend import decode, val_transform
from data.wordnet import select_classes
from models.card import ModelCard, configured_by_card
from models.export import load_weights_only

log = logging.getLogger(__name__)


class Files:
    """Image files as ``Images`` reads them: a name and a decoded image per index."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def image(self, index: int, spec: ImageSpec) -> torch.Tensor:
        return decode(str(self.paths[index]), spec)


def image_sources(inputs: Sequence[str]) -> list[Files | ShardReader]:
    """Per input: the file, the images below the folder (sorted), or the samples of the shard set's val split or
    of the tar shard."""
    sources = []
    for item in map(Path, inputs):
        if is_shard_set(item):
            sources.append(ShardReader.of_split(ShardSet.open(item).val))
        elif item.is_dir():
            sources.append(
                Files(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
            )
        elif item.suffix == ".tar" and item.is_file():
            sources.append(ShardReader.of_tar(item))
        else:
            sources.append(Files([item]))  # a missing file is reported as one that cannot be read
    return sources


class Images(Dataset):
    """(name, uint8 image or None, error) per image of a source: a bad image becomes a reported error, not a crash."""

    def __init__(self, source: Files | ShardReader, spec: ImageSpec) -> None:
        self.source, self.spec, self.transform = source, spec, val_transform(spec)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        name = self.source.name(index)
        try:
            return name, self.transform(self.source.image(index, self.spec)), None
        except (RuntimeError, OSError, ShardSetError) as error:
            return name, None, str(error).splitlines()[0] or type(error).__name__


def predictions(cfg: DictConfig) -> Iterator[tuple[str, list[tuple[float, str, str]] | None, str | None]]:
    """Per image: its name, its top-k (probability, wnid, name), or None and the reason it could not be read."""
    checkpoint = load_weights_only(cfg.ckpt)
    card = ModelCard.of_checkpoint(checkpoint, cfg.ckpt)
    cfg = configured_by_card(cfg, card)
    spec = instantiate(cfg.data.spec)
    module = instantiate(cfg.model, _partial_=True)(card=card)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    selection = select_classes(cfg.data.classes, cfg.data.sample_classes, cfg.data.classes_seed)
    wnids = card.evaluated_classes(selection.wnids if selection else card.classes, cfg.restrict_outputs, "data.classes")
    module.evaluate_on(wnids)
    names = wordnet_names()
    sources = image_sources(cfg.inputs)
    if not sources:
        return
    images = ConcatDataset([Images(source, spec) for source in sources])
    workers = affinity.data_workers(cfg.data.num_workers, affinity.rank_cpus(0, 1))
    loader = DataLoader(
        images,
        batch_size=cfg.data.batch_size,
        num_workers=workers,
        collate_fn=list,
    )
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    for batch in loader:
        good = [(i, image) for i, (_, image, _) in enumerate(batch) if image is not None]
        scores = {}
        if good:
            with torch.no_grad():
                pixels = (torch.stack([image for _, image in good]).float() - mean) / std
                top = module.class_scores(module.net, pixels).softmax(-1).topk(min(cfg.top_k, len(wnids)))
            for (i, _), probs, classes in zip(good, top.values.tolist(), top.indices.tolist()):
                scores[i] = [(p, wnids[c], names.get(wnids[c], wnids[c])) for p, c in zip(probs, classes)]
        for i, (name, _, error) in enumerate(batch):
            yield name, scores.get(i), error


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    failed = done = 0
    for name, top, error in predictions(cfg):
        if top is None:
            failed += 1
            log.warning("%s: skipped, cannot be decoded (%s)", name, error)
            continue
        done += 1
        print(f"{name}: " + " | ".join(f"{p:.3f} {wnid} {name}" for p, wnid, name in top))
    log.info("%d image(s) classified, %d skipped", done, failed)
    if not done:
        raise SystemExit(f"no image could be classified in {list(cfg.inputs)}")


if __name__ == "__main__":
    main()
