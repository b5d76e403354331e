"""The DALI backend: one pipeline definition for train and val whose decoder runs on the GPU ("mixed") or the CPU.

The reader shards by global rank with a fresh global permutation every epoch (``shuffle_after_epoch``, one seed
for all ranks so the shards of an epoch partition the set); augmentation seeds differ per rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from torchvision.transforms.v2.functional import resize

from data.affinity import affinity_mask
from data.ilsvrc import PIXEL_MEAN, PIXEL_STD, Split

READER = "Reader"
OUTPUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}  # DALI has no bfloat16: autocast casts fp16 input


class TorchResize:
    """Antialiased bilinear resize of a batch of HWC uint8 images with torchvision's kernel, in a pool of threads.

    Why not DALI's: on the CPU its resampler takes ~6x as long (1.35 vs 0.23 ms for an average ImageNet crop, one
    core), a third of the pipeline's time. ``size``: [h, w], or [s] for the shorter side. Torch releases the GIL.
    """

    def __init__(self, size: list[int], threads: int, cpus: Sequence[int] | None) -> None:
        self.size = size
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # this thread, like DALI's own threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dali-resize", initializer=pin)

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.pool.map(self.resize_one, images))

    def resize_one(self, image: np.ndarray) -> np.ndarray:
        chw = torch.from_numpy(image).permute(2, 0, 1)  # channels-last strides: torch's fast uint8 path
        return resize(chw, self.size, antialias=True).permute(1, 2, 0).contiguous().numpy()


def _resize(images, size: list[int], decoder_device: str, cpus: Sequence[int] | None):
    """[h, w], or [s] for the shorter side; antialiased bilinear on either device."""
    if decoder_device == "cpu":
        resize_batch = TorchResize(size, Pipeline.current().num_threads, cpus)
        return fn.python_function(images, function=resize_batch, batch_processing=True)
    shape = dict(resize_y=size[0], resize_x=size[1]) if len(size) == 2 else dict(resize_shorter=size[0])
    return fn.resize(images, antialias=True, **shape)


@pipeline_def(enable_conditionals=False)
def ilsvrc_pipeline(
    split: Split,
    training: bool,
    decoder_device: str,
    shard_id: int,
    num_shards: int,
    image_size: int,
    resize_size: int,
    crop_scale: Sequence[float],
    reader_seed: int,
    image_dtype: str = "float32",
    hw_decoder_load: float = 0.65,
    cpus: Sequence[int] | None = None,
):
    """Train: random-resized crop decoded straight from the JPEG, resize, flip. Val: shorter side, centre crop."""
    jpegs, labels = fn.readers.file(
        files=split.paths,
        labels=split.labels,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        name=READER,
        **(
            dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=reader_seed)
            if training
            else dict(stick_to_shard=True)
        ),
    )
    gpu_options = {}
    if decoder_device == "mixed":  # the hardware decoder's share set explicitly: its default moved across versions
        gpu_options = dict(
            hw_decoder_load=hw_decoder_load, device_memory_padding=211_025_920, host_memory_padding=140_544_512
        )
    if training:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decoder_device,
            output_type=types.RGB,
            random_area=list(crop_scale),
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=100,
            **gpu_options,
        )
        size, mirror = [image_size, image_size], fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **gpu_options)
        size, mirror = [resize_size], 0
    images = _resize(images, size, decoder_device, cpus)
    images = fn.crop_mirror_normalize(
        images,
        dtype=OUTPUT_DTYPES[image_dtype],
        output_layout="HWC",
        crop=(image_size, image_size),
        mean=list(PIXEL_MEAN),
        std=list(PIXEL_STD),
        mirror=mirror,
    )
    return images, labels


def pin_threads(cpus: Sequence[int] | None, num_threads: int) -> None:
    """Pins the DALI threads of this process's pipelines built with ``set_affinity`` to ``cpus``, unless the user
    set ``DALI_AFFINITY_MASK`` already. Process-wide and left set: each thread reads it when it starts, later."""
    if cpus and "DALI_AFFINITY_MASK" not in os.environ:  # long enough for any later pipeline of the process
        os.environ["DALI_AFFINITY_MASK"] = affinity_mask(list(cpus), max(num_threads, 256))


def _iterator(pipeline, last_batch_policy: LastBatchPolicy) -> DALIGenericIterator:
    return DALIGenericIterator(
        pipeline,
        ["images", "labels"],
        reader_name=READER,
        last_batch_policy=last_batch_policy,
        prepare_first_batch=False,
    )


class DaliLoader:
    """A fixed number of ``(images, labels)`` batches per epoch from a DALI pipeline, whatever the Trainer does.

    Images come as NCHW views of DALI's NHWC output, i.e. channels_last in memory. DALI ignores a reset in
    mid-epoch (and would shorten the next epoch), so an epoch the Trainer left early (sanity validation,
    ``limit_*_batches``) is drained before the next one starts.
    """

    def __init__(self, pipeline, batches_per_epoch: int | None, last_batch_policy: LastBatchPolicy) -> None:
        self.last_batch_policy = last_batch_policy
        self.iterator = _iterator(pipeline, last_batch_policy)
        self.batches_per_epoch = len(self.iterator) if batches_per_epoch is None else batches_per_epoch
        self.in_epoch = False
        self.replay = 0  # batches of this epoch to read again without yielding (a resumed epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish_epoch()
        self.in_epoch = True
        replay, self.replay = self.replay, 0  # now: Lightning may never resume this generator after its last batch
        for index in range(self.batches_per_epoch):
            batch = next(self.iterator)[0]
            if index >= replay:
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


class ResumableDaliLoader(DaliLoader):
    """The train loader, whose position travels in the Lightning checkpoint (Lightning saves and restores the
    state of loaders that have ``state_dict``/``load_state_dict``).

    The state is every rank's DALI checkpoint at the start of the current epoch, gathered because only rank zero
    writes the file. Resuming rebuilds each rank's pipeline there and reads again, without yielding, the batches
    already trained: exact, whatever Lightning prefetched, at the cost of decoding those batches once more.
    """

    def __init__(
        self,
        build_pipeline: Callable[[str | None], object],
        batches_per_epoch: int,
        trained_batches: Callable[[], int],
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(build_pipeline(None), batches_per_epoch, LastBatchPolicy.DROP)
        self.build_pipeline, self.trained_batches = build_pipeline, trained_batches
        self.rank, self.world_size = rank, world_size
        self.epoch_start: str | None = None  # set when an epoch starts; read only while one runs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish_epoch()
        self.epoch_start = self.iterator.checkpoints()[0]
        yield from super().__iter__()

    def state_dict(self) -> dict:
        checkpoint = self.epoch_start if self.in_epoch else self.iterator.checkpoints()[0]
        gathered = [checkpoint]
        if self.world_size > 1 and torch.distributed.is_initialized():
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, checkpoint)
        return {"dali_epoch_start": gathered}

    def load_state_dict(self, state: dict) -> None:
        checkpoints = state["dali_epoch_start"]
        if len(checkpoints) != self.world_size:
            raise ValueError(
                f"the checkpoint holds the DALI reader state of {len(checkpoints)} ranks, this run has "
                f"{self.world_size}: resume mid-epoch with the same number of devices and nodes"
            )
        self.iterator = _iterator(self.build_pipeline(checkpoints[self.rank]), self.last_batch_policy)
        self.in_epoch, self.replay = False, self.trained_batches()


def decoder_device(device: str) -> str:
    """``auto`` -> ``mixed`` (nvJPEG and the hardware decoder) where there is a GPU, ``cpu`` elsewhere."""
    if device not in ("auto", "cpu", "mixed"):
        raise ValueError(f"data.dali_device must be auto, cpu or mixed, got {device!r}")
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    return device


def batches_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """floor(floor(N / world) / batch): the smallest shard's full batches, the same count on every rank."""
    steps = num_images // world_size // batch_size
    if steps == 0:
        raise ValueError(f"{num_images} train images over {world_size} ranks make no full batch of {batch_size}")
    return steps


def _placement(
    num_threads: int,
    device: str,
    device_id: int,
    rank: int,
    world_size: int,
    cpus: Sequence[int] | None,
    prefetch_depth: int,
    hw_decoder_load: float,
) -> dict:
    """Pipeline arguments that say where it decodes, which shard it reads, and how it uses the machine."""
    decoder = decoder_device(device)
    pin_threads(cpus, num_threads)
    return dict(
        decoder_device=decoder,
        device_id=device_id if decoder == "mixed" else None,
        shard_id=rank,
        num_shards=world_size,
        set_affinity=bool(cpus),
        cpus=cpus,
        prefetch_queue_depth=prefetch_depth,
        hw_decoder_load=hw_decoder_load,
    )


def train_loader(
    split: Split,
    batch_size: int,
    image_size: int,
    crop_scale: Sequence[float],
    num_threads: int,
    rank: int,
    world_size: int,
    seed: int,
    device: str,
    device_id: int,
    trained_batches: Callable[[], int] = lambda: 0,
    output_dtype: str = "float32",
    cpus: Sequence[int] | None = None,
    prefetch_depth: int = 2,
    hw_decoder_load: float = 0.65,
) -> ResumableDaliLoader:
    """Every rank runs ``batches_per_epoch`` steps: the same count on each, full batches only.

    ``trained_batches`` tells, when a checkpoint is restored, how many batches of its epoch were trained;
    ``cpus``, the cores this rank's DALI threads are pinned to (none: unpinned).
    """
    build_pipeline = partial(
        ilsvrc_pipeline,
        split=split,
        training=True,
        image_size=image_size,
        resize_size=image_size,
        crop_scale=crop_scale,
        reader_seed=seed,
        batch_size=batch_size,
        num_threads=num_threads,
        seed=seed + 1 + rank,
        enable_checkpointing=True,
        image_dtype=output_dtype,
        **_placement(num_threads, device, device_id, rank, world_size, cpus, prefetch_depth, hw_decoder_load),
    )
    steps = batches_per_epoch(len(split), world_size, batch_size)
    return ResumableDaliLoader(
        lambda checkpoint: build_pipeline(checkpoint=checkpoint),
        steps,
        trained_batches,
        rank,
        world_size,
    )


def val_loader(
    split: Split,
    batch_size: int,
    image_size: int,
    resize_size: int,
    num_threads: int,
    rank: int,
    world_size: int,
    device: str,
    device_id: int,
    output_dtype: str = "float32",
    cpus: Sequence[int] | None = None,
    prefetch_depth: int = 2,
    hw_decoder_load: float = 0.65,
) -> DaliLoader:
    """Each rank its own contiguous shard, the last batch partial: every image counted exactly once."""
    pipeline = ilsvrc_pipeline(
        split=split,
        training=False,
        image_size=image_size,
        resize_size=resize_size,
        crop_scale=(1.0, 1.0),
        reader_seed=0,
        batch_size=batch_size,
        num_threads=num_threads,
        image_dtype=output_dtype,
        **_placement(num_threads, device, device_id, rank, world_size, cpus, prefetch_depth, hw_decoder_load),
    )
    return DaliLoader(pipeline, None, LastBatchPolicy.PARTIAL)
