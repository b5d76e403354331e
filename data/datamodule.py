"""The LightningDataModule: one ILSVRC-layout dataset, sharded per rank by the datamodule itself.

Sharding lives here (``use_distributed_sampler=False`` in the trainer) so that training epochs have the same
length on every rank while validation counts every image exactly once.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from functools import cached_property

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from data import affinity, dali, torchvision_backend
from data.ilsvrc import PIXEL_MEAN, PIXEL_STD, ILSVRCLayout, load_layout
from data.index import indexed_layout

log = logging.getLogger(__name__)

BACKENDS = ("torchvision", "dali")


class ImageNetDataModule(pl.LightningDataModule):
    """Batches of ``(images, int64 labels)``: normalised floating-point NCHW images, once on the device."""

    def __init__(
        self,
        root: str | os.PathLike,
        backend: str = "torchvision",
        batch_size: int = 256,
        image_size: int = 224,
        val_resize_size: int = 256,
        train_crop_scale: Sequence[float] = (0.08, 1.0),
        num_workers: int | str = "auto",
        pin_memory: bool = True,
        seed: int = 0,
        dali_device: str = "auto",
        dali_output_dtype: str = "auto",
        dali_prefetch_depth: int = 2,
        dali_hw_decoder_load: float = 0.65,
        cpu_affinity: bool = True,
        index: str = "fast",
        index_workers: int | None = None,
        cache_dir: str | os.PathLike = "~/.cache/imagenet-pipeline",
        val_crops: int = 1,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"data.backend={backend!r} is not one of {BACKENDS}")
        if val_crops not in (1, 10) or (val_crops == 10 and backend != "torchvision"):
            raise ValueError(
                f"data.val_crops must be 1, or 10 with data.backend=torchvision; got {val_crops} ({backend})"
            )
        self.val_crops = val_crops
        self.root, self.backend, self.batch_size = root, backend, batch_size
        self.image_size, self.val_resize_size, self.train_crop_scale = image_size, val_resize_size, train_crop_scale
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.dali_device = dali.decoder_device(dali_device) if backend == "dali" else None
        if dali_output_dtype not in ("auto", *dali.OUTPUT_DTYPES):
            raise ValueError(
                f"data.dali_output_dtype must be auto or one of {list(dali.OUTPUT_DTYPES)}, got {dali_output_dtype!r}"
            )
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"data.num_workers must be auto or a count >= 0, got {num_workers!r}")
        self.dali_output_dtype = dali_output_dtype
        self.dali_prefetch_depth, self.dali_hw_decoder_load = dali_prefetch_depth, dali_hw_decoder_load
        self.cpu_affinity = cpu_affinity
        self.index, self.index_workers, self.cache_dir = index, index_workers or os.cpu_count(), cache_dir
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def layout(self) -> ILSVRCLayout:
        """The scanned and checked dataset without unreadable files; ``DatasetLayoutError`` names a path at fault."""
        layout = indexed_layout(load_layout(self.root), self.index, self.cache_dir, self.index_workers)
        log.info("Dataset %s", layout.summary())
        return layout

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    def state_dict(self) -> dict:
        """The class index (wnid per output) travels in checkpoints: predict.py names classes with it."""
        return {"wnids": list(self.layout.wnids)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("wnids", self.layout.wnids) != list(self.layout.wnids):
            raise ValueError(
                f"the checkpoint was trained on other classes than {self.root} holds "
                f"({len(state['wnids'])} vs {self.num_classes}): resume on the dataset it was trained on"
            )

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @cached_property
    def rank_cpus(self) -> list[int]:
        """The cores of this rank's share of the node (data/affinity.py), near its GPU where one decodes."""
        trainer = self.trainer
        local_world = trainer.num_devices if trainer is not None else 1
        gpu_local = affinity.gpu_local_cpus(self._local_rank()) if self.dali_device == "mixed" else None
        return affinity.rank_cpus(self._local_rank(), local_world, gpu_local)

    @property
    def workers(self) -> int:
        """DataLoader workers or DALI threads per rank: ``num_workers``, or with ``auto`` the rank's cores less one."""
        return affinity.data_workers(self.num_workers, self.rank_cpus)

    def _dali_options(self) -> dict:
        """What the DALI loaders take from the machine and the run: threads, cores, prefetch, output dtype."""
        dtype = self.dali_output_dtype
        if dtype == "auto":  # GPU-decoded batches in 16-bit runs: half the bytes (DALI has no bfloat16). A CPU
            # pipeline stays float32: its float16 conversion cost ~12% of its speed on this project's 2-core machine
            precision = str(self.trainer.precision) if self.trainer is not None else "32-true"
            half = precision.startswith(("16", "bf16")) and self.dali_device == "mixed"
            dtype = "float16" if half else "float32"
        return dict(
            num_threads=max(1, self.workers),  # num_workers=0 means "in this process" for the DataLoader
            device=self.dali_device,
            device_id=self._local_rank(),
            output_dtype=dtype,
            cpus=self.rank_cpus if self.cpu_affinity else None,
            prefetch_depth=self.dali_prefetch_depth,
            hw_decoder_load=self.dali_hw_decoder_load,
        )

    def _trained_batches(self) -> int:
        """Batches of the current epoch already trained, as the fit loop restored them from a checkpoint."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _local_rank(self) -> int:
        return self.trainer.local_rank if self.trainer is not None else 0

    def train_batches_per_epoch(self, world_size: int) -> int:
        """Full batches each rank trains per epoch (both backends drop the last partial batch)."""
        if self.backend == "dali":
            return dali.batches_per_epoch(len(self.layout.train), world_size, self.batch_size)
        return math.ceil(len(self.layout.train) / world_size) // self.batch_size  # DistributedSampler pads

    def train_dataloader(self) -> DataLoader | dali.DaliLoader:
        rank, world_size = self._rank_and_world()
        shared = dict(
            split=self.layout.train,
            batch_size=self.batch_size,
            image_size=self.image_size,
            crop_scale=self.train_crop_scale,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            trained_batches=self._trained_batches,
        )
        if self.backend == "dali":
            return dali.train_loader(**shared, **self._dali_options())
        return torchvision_backend.train_loader(**shared, num_workers=self.workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | dali.DaliLoader:
        rank, world_size = self._rank_and_world()
        shared = dict(
            split=self.layout.val,
            batch_size=self.batch_size,
            image_size=self.image_size,
            resize_size=self.val_resize_size,
            rank=rank,
            world_size=world_size,
        )
        if self.backend == "dali":
            return dali.val_loader(**shared, **self._dali_options())
        return torchvision_backend.val_loader(
            **shared, num_workers=self.workers, pin_memory=self.pin_memory, ten_crop=self.val_crops == 10
        )

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int):
        images, labels = batch
        if images.dtype == torch.uint8:
            if images.device not in self._stats:
                self._stats[images.device] = tuple(
                    torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (PIXEL_MEAN, PIXEL_STD)
                )
            mean, std = self._stats[images.device]
            images = (images.float() - mean) / std
        return images, labels.long()
