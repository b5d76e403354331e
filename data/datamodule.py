"""The LightningDataModule: one ILSVRC-layout dataset, an image spec, and a loader node that makes the batches.

Sharding lives here (``use_distributed_sampler=False`` in the trainer) so that training epochs have the same
length on every rank while validation counts every image exactly once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Protocol

import pytorch_lightning as pl
import torch

from compat import launches_its_ranks_by_rerunning_the_script, trained_batches_in_epoch
from data.eval_sets import load_eval_set
from data.ilsvrc import ILSVRCLayout, Split
from data.index import MODES, SCOPES, IndexRole, job_run_token, shared_layout, usable_cores
from data.placement import BatchRequest, Placement, Shard, placement_of, shard_of
from data.resolution import FixedResolution, ResolutionRamp, TrainResolution
from data.shard_set import ShardSet, ShardSetError, ShardSplit, is_shard_set
from data.spec import ConfigError, ImageSpec
from data.wordnet import select_classes

log = logging.getLogger(__name__)


class Loader(Protocol):
    """What a loader node (``conf/data/loader/<name>.yaml``) provides: train and val batches as a ``BatchRequest``
    asks (a split, the spec, the batch size, the rank's shard and placement)."""

    name: str
    ten_crop: bool

    def batches_per_epoch(self, num_images: int, batch_size: int, shard: Shard) -> int: ...

    @staticmethod
    def val_order(num_images: int, shard: Shard) -> Sequence[int]: ...

    def train(
        self,
        request: BatchRequest,
        seed: int,
        trained_batches: Callable[[], int],
        resolution: TrainResolution | None,
        current_epoch: Callable[[], int],
    ) -> Iterable: ...

    def val(self, request: BatchRequest, ten_crop: bool = False) -> Iterable: ...

    def where_decoded(self, placement: Placement) -> str: ...


class ImageNetDataModule(pl.LightningDataModule):
    """Batches of ``(images, int64 labels)``: normalised floating-point NCHW images, once on the device.

    ``batch_size`` is per device; ``num_workers``: DataLoader workers or DALI threads per rank, ``auto`` for the
    rank's share of the node's cores less one; ``index``: how the files are checked before training
    (data/index.py); ``index_scope``: which rank checks them and scans the folders for the others, ``node`` (local
    rank 0 of each node) or ``job`` (global rank 0, for a ``cache_dir`` that every node shares), and
    ``index_wait_s``: how long the others wait for its result; ``val_crops``: 1, or 10 for the ten-crop protocol;
    ``resolution``: progressive resizing (data/resolution.py), ending at ``spec.image_size``; null: every epoch at it.
    ``classes``: the classes to use, null for all of ``root``'s: wnids, a file of them, a WordNet node or a ready list
    (data/wordnet.py), of which ``sample_classes`` (null: all) are drawn with ``classes_seed``; the class index is the
    subset's sorted wnids (what the model card records).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        spec: ImageSpec,
        loader: Loader,
        batch_size: int = 256,
        num_workers: int | str = "auto",
        seed: int = 0,
        index: str = "fast",
        cache_dir: str | os.PathLike = "~/.cache/imagenet-pipeline",
        index_scope: str = "node",
        index_wait_s: float = 3600.0,
        val_crops: int = 1,
        resolution: ResolutionRamp | None = None,
        classes: str | Sequence[str] | None = None,
        sample_classes: int | None = None,
        classes_seed: int = 0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if backend is not None:
            raise ConfigError("data.backend", backend, f"null (removed): choose the loader with data/loader={backend}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError("data.batch_size", batch_size, "a whole number of images per device, >= 1")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ConfigError("data.num_workers", num_workers, "auto, or a count >= 0")
        if index not in MODES:
            raise ConfigError("data.index", index, " or ".join(MODES))
        if index_scope not in SCOPES:
            raise ConfigError(
                "data.index_scope",
                index_scope,
                "node (local rank 0 of each node indexes) or job (global rank 0 does: a cache_dir every node shares)",
            )
        if isinstance(index_wait_s, bool) or not isinstance(index_wait_s, int | float) or not index_wait_s > 0:
            raise ConfigError("data.index_wait_s", index_wait_s, "seconds > 0 that a rank waits for the indexing rank")
        if val_crops not in (1, 10) or (val_crops == 10 and not loader.ten_crop):
            allowed = "1 or 10" if loader.ten_crop else f"1 with data/loader={loader.name} (ten crops: torchvision)"
            raise ConfigError("data.val_crops", val_crops, allowed)
        if resolution is not None and resolution.end_size != spec.image_size:
            raise ConfigError(
                "data.resolution.end_size",
                resolution.end_size,
                f"data.spec.image_size ({spec.image_size}): the ramp ends at the size the model card records",
            )
        self.resolution = resolution or FixedResolution(spec.image_size)
        if classes is None and sample_classes is not None:
            raise ConfigError(
                "data.sample_classes",
                sample_classes,
                "null without data.classes: draw from a selection, e.g. data.classes=n00001740 (entity: all 1000)",
            )
        self.class_selection = select_classes(classes, sample_classes, classes_seed)
        self.root, self.spec, self.loader, self.batch_size = root, spec, loader, batch_size
        self.num_workers, self.seed, self.index, self.cache_dir = num_workers, seed, index, cache_dir
        self.index_scope, self.index_wait_s, self.val_crops = index_scope, index_wait_s, val_crops
        self.index_role = IndexRole()  # alone, until share_index_with names the run's ranks
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def share_index_with(self, trainer: pl.Trainer) -> None:
        """One rank of the Trainer's (per node, or per job: ``index_scope``) scans and checks the dataset and the
        others read its result: called before the layout is first read, which is before ``fit`` attaches the
        Trainer."""
        self.index_role = IndexRole(
            trainer.global_rank,
            trainer.local_rank,
            trainer.world_size,
            self.index_scope,
            job_run_token(launches_its_ranks_by_rerunning_the_script(trainer)),
        )

    @cached_property
    def layout(self) -> ILSVRCLayout | ShardSet:
        """The dataset: a shard set where ``root`` holds a manifest (data/shard_set.py; its files were checked when it
        was converted), else the scanned and checked folders without unreadable files. ``DatasetLayoutError`` or
        ``ShardSetError`` names a path at fault."""
        selected = self.class_selection.wnids if self.class_selection else None
        if self.class_selection:
            log.info("Classes (data.classes): %s", self.class_selection.description)
        if is_shard_set(self.root):
            layout = ShardSet.open(self.root)
            if selected is not None and tuple(layout.wnids) != selected:
                raise ShardSetError(
                    f"{layout.root} holds {layout.num_classes} classes, not the {len(selected)} of data.classes "
                    f"({self.class_selection.description}): convert that subset into a shard set of its own "
                    "(python -m data.shards SRC OUT --classes ..., the same selection)"
                )
            for name, split in (("train", layout.train), ("val", layout.val)):
                if not len(split):
                    raise ShardSetError(f"{layout.root}: its {name} split is empty (converted with --splits): "
                                        "training needs train and val")  # fmt: skip
            if self.index == "full":
                log.info("data.index=full: the converter checked the files (python -m data.shards --index full)")
        else:
            layout = shared_layout(
                self.root,
                self.index,
                self.cache_dir,
                usable_cores(),
                self.index_role,
                self.index_wait_s,
                classes=selected,
            )
        log.info("Dataset %s", layout.summary())
        return layout

    def eval_set(self, root: str | os.PathLike) -> ILSVRCLayout:
        """The evaluation set at ``root`` (data/eval_sets.py: ImageNet-V2, -A, -R, -Sketch), checked as this module's
        dataset is (``index``, by one rank for the others), all its classes: assign a subset of it to ``layout`` to
        validate on it."""
        return shared_layout(
            root,
            self.index,
            self.cache_dir,
            usable_cores(),
            self.index_role,
            self.index_wait_s,
            scan=load_eval_set,
        )

    @property
    def classes(self) -> list[str]:
        """The class index: output ``i`` is the wnid ``classes[i]``."""
        return list(self.layout.wnids)

    def train_batches_per_epoch(self, world_size: int) -> int:
        """Full batches each of ``world_size`` ranks trains per epoch; a batch that no rank can fill is an error."""
        images, shard = len(self.layout.train), Shard(0, world_size)
        batches = self.loader.batches_per_epoch(images, self.batch_size, shard)
        if batches < 1:
            share = self.loader.batches_per_epoch(images, 1, shard)
            raise ConfigError(
                "data.batch_size",
                self.batch_size,
                f"at most {share}: each of the {world_size} rank(s) gets {share} of the {images} train images, "
                "and an epoch needs one full batch",
            )
        return batches

    @property
    def shard(self) -> Shard:
        return shard_of(self.trainer)

    @cached_property
    def placement(self) -> Placement:
        """This rank's device, precision, data workers and cores, read from the Trainer once it is attached."""
        return placement_of(self.trainer, self.num_workers)

    def train_dataloader(self) -> Iterable:
        return self.loader.train(
            self._request(self.layout.train),
            seed=self.seed,
            trained_batches=self._trained_batches,
            resolution=self.resolution,
            current_epoch=self._current_epoch,
        )

    def val_dataloader(self) -> Iterable:
        return self.loader.val(self._request(self.layout.val), ten_crop=self.val_crops == 10)

    def _request(self, split: Split | ShardSplit) -> BatchRequest:
        return BatchRequest(split, self.spec, self.batch_size, self.shard, self.placement)

    def val_order(self) -> Sequence[int]:
        """Which image of the val split each of this rank's val samples is, in order."""
        return self.loader.val_order(len(self.layout.val), self.shard)

    def _trained_batches(self) -> int:
        """Batches of the current epoch already trained, as the fit loop restored them from a checkpoint."""
        return trained_batches_in_epoch(self.trainer)

    def _current_epoch(self) -> int:
        """The epoch the fit loop is in (restored from a checkpoint on resume)."""
        return self.trainer.current_epoch

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int):
        images, labels = batch
        if images.dtype == torch.uint8:
            if images.device not in self._stats:
                self._stats[images.device] = tuple(
                    torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (self.spec.mean, self.spec.std)
                )
            mean, std = self._stats[images.device]
            images = (images.float() - mean) / std
        return images, labels.long()
