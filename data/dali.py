"""The DALI backend: one pipeline definition for train and val whose decoder runs on the GPU ("mixed") or the CPU.

The reader shards by global rank with a fresh global permutation every epoch (``shuffle_after_epoch``, one seed
for all ranks so the shards of an epoch partition the set); augmentation seeds differ per rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from data.ilsvrc import Split

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
READER = "Reader"


@pipeline_def(enable_conditionals=False)
def ilsvrc_pipeline(
    split: Split, training: bool, decoder_device: str, shard_id: int, num_shards: int, image_size: int,
    resize_size: int, crop_scale: Sequence[float], reader_seed: int,
):
    """Train: random-resized crop decoded straight from the JPEG, resize, flip. Val: shorter side, centre crop."""
    jpegs, labels = fn.readers.file(
        files=split.paths, labels=split.labels, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, name=READER,
        **(dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=reader_seed) if training else dict(stick_to_shard=True)),
    )
    gpu_options = {}
    if decoder_device == "mixed":  # the hardware decoder's share set explicitly: its default moved across versions
        gpu_options = dict(hw_decoder_load=0.65, device_memory_padding=211_025_920, host_memory_padding=140_544_512)
    if training:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder_device, output_type=types.RGB, random_area=list(crop_scale),
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100, **gpu_options,
        )
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **gpu_options)
        images = fn.resize(images, resize_shorter=resize_size, antialias=True)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="HWC", crop=(image_size, image_size), mean=list(MEAN),
        std=list(STD), mirror=mirror,
    )
    return images, labels


class DaliLoader:
    """A fixed number of ``(images, labels)`` batches per epoch from a DALI pipeline, whatever the Trainer does.

    Images come as NCHW views of DALI's NHWC output, i.e. channels_last in memory. DALI ignores a reset in
    mid-epoch (and would shorten the next epoch), so an epoch the Trainer left early (sanity validation,
    ``limit_*_batches``) is drained before the next one starts.
    """

    def __init__(self, pipeline, batches_per_epoch: int | None, last_batch_policy: LastBatchPolicy) -> None:
        self.iterator = DALIGenericIterator(
            pipeline, ["images", "labels"], reader_name=READER, last_batch_policy=last_batch_policy,
            prepare_first_batch=False,
        )
        self.batches_per_epoch = len(self.iterator) if batches_per_epoch is None else batches_per_epoch
        self.in_epoch = False

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish_epoch()
        self.in_epoch = True
        for _ in range(self.batches_per_epoch):
            batch = next(self.iterator)[0]
            yield batch["images"].permute(0, 3, 1, 2), batch["labels"].view(-1)
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        if self.in_epoch:
            while True:  # the rest of this rank's shard, if any (`for` would call iter(), a reset in mid-epoch)
                try:
                    next(self.iterator)
                except StopIteration:
                    break
            self.iterator.reset()
            self.in_epoch = False


def decoder_device(device: str) -> str:
    """``auto`` -> ``mixed`` (nvJPEG and the hardware decoder) where there is a GPU, ``cpu`` elsewhere."""
    if device not in ("auto", "cpu", "mixed"):
        raise ValueError(f"data.dali_device must be auto, cpu or mixed, got {device!r}")
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    return device


def train_loader(
    split: Split, batch_size: int, image_size: int, crop_scale: Sequence[float], num_threads: int,
    rank: int, world_size: int, seed: int, device: str, device_id: int,
) -> DaliLoader:
    """Every rank runs floor(floor(N / world) / batch) steps: the same count on each, full batches only."""
    decoder = decoder_device(device)
    pipeline = ilsvrc_pipeline(
        split=split, training=True, decoder_device=decoder, shard_id=rank, num_shards=world_size,
        image_size=image_size, resize_size=image_size, crop_scale=crop_scale, reader_seed=seed,
        batch_size=batch_size, num_threads=num_threads, device_id=device_id if decoder == "mixed" else None,
        seed=seed + 1 + rank,
    )
    steps = len(split) // world_size // batch_size
    if steps == 0:
        raise ValueError(f"{len(split)} train images over {world_size} ranks make no full batch of {batch_size}")
    return DaliLoader(pipeline, steps, LastBatchPolicy.DROP)


def val_loader(
    split: Split, batch_size: int, image_size: int, resize_size: int, num_threads: int, rank: int,
    world_size: int, device: str, device_id: int,
) -> DaliLoader:
    """Each rank its own contiguous shard, the last batch partial: every image counted exactly once."""
    decoder = decoder_device(device)
    pipeline = ilsvrc_pipeline(
        split=split, training=False, decoder_device=decoder, shard_id=rank, num_shards=world_size,
        image_size=image_size, resize_size=resize_size, crop_scale=(1.0, 1.0), reader_seed=0,
        batch_size=batch_size, num_threads=num_threads, device_id=device_id if decoder == "mixed" else None,
    )
    return DaliLoader(pipeline, None, LastBatchPolicy.PARTIAL)


def dali_version() -> str:
    from nvidia.dali import __version__

    return __version__
