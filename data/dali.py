"""The DALI loader (``data/loader=dali``): one pipeline definition for train and val whose decoder runs on the GPU
("mixed") or the CPU, reading image files (``readers.file``) or a shard set (``readers.webdataset``).

The reader shards by global rank with a fresh global order every epoch (``shuffle_after_epoch``, one seed for all
ranks so the shards of an epoch partition the set); augmentation seeds differ per rank. Over files that order is a
permutation of the samples; over tar shards it is a permutation of the shards, each read in order, and the samples
mix through the permutation the converter wrote and a shuffle buffer (``shuffle_buffer``; README: Sharded datasets).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from pytorch_lightning.utilities import rank_zero_info
from torchvision.transforms.v2.functional import resize

from data.affinity import affinity_mask
from data.augment import dali_augment, needs_conditionals
from data.ilsvrc import UNREADABLE_FILE_ADVICE, Split
from data.placement import BatchRequest, Placement, Shard
from data.resolution import FixedResolution, TrainResolution
from data.shard_set import IMAGE_EXTENSIONS, LABEL_EXTENSION, ShardSplit, parse_label, verify_advice
from data.spec import ConfigError, ImageSpec

log = logging.getLogger(__name__)

READER = "Reader"
OUTPUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}  # DALI has no bfloat16: autocast casts fp16 input
DEVICES = ("auto", "mixed", "cpu")
MIB = 1 << 20
# NVIDIA's ResNet-50 example (DeepLearningExamples): nvJPEG's buffers per thread, enough for the largest ILSVRC
# images without a reallocation; here the most a thread gets, less where the budget is shared by many threads.
LARGEST_DEVICE_PADDING, LARGEST_HOST_PADDING = 211_025_920, 140_544_512
SMALLEST_PADDING = 16 * MIB  # DALI's own default device padding: less and large images reallocate often
HW_STAGING_PER_IMAGE = 300 * 1024  # DALI's pinned staging per image of the hardware decoder's share


@dataclass(frozen=True)
class DecoderMemory:
    """What a ``mixed`` decoder preallocates, per DALI's documentation and source: one device buffer of
    ``device_padding`` bytes per thread, two pinned host buffers of ``host_padding`` per thread, pinned staging of
    300 KiB per image of the hardware decoder's share, and the hardware decoder's pool sized by the hints."""

    device_padding: int = 0
    host_padding: int = 0
    width_hint: int = 0
    height_hint: int = 0

    def arguments(self) -> dict:
        return dict(
            device_memory_padding=self.device_padding,
            host_memory_padding=self.host_padding,
            preallocate_width_hint=self.width_hint,
            preallocate_height_hint=self.height_hint,
        )


@dataclass(frozen=True)
class PipelineMemory:
    """The memory one ``mixed`` pipeline is built to take: ``device`` bytes on its GPU, ``pinned`` host bytes."""

    threads: int
    decoder: DecoderMemory
    output_queue: int  # the prefetched output batches on the GPU
    hw_staging: int

    @property
    def device(self) -> int:
        return self.threads * self.decoder.device_padding + self.output_queue

    @property
    def pinned(self) -> int:
        return 2 * self.threads * self.decoder.host_padding + self.hw_staging

    def describe(self, name: str) -> str:
        return (
            f"DALI {name} pipeline on the GPU: {self.threads} threads; GPU memory {self.device / MIB:.0f} MiB "
            f"({self.threads} x {self.decoder.device_padding / MIB:.0f} MiB decoder padding + "
            f"{self.output_queue / MIB:.0f} MiB of prefetched batches), pinned host memory {self.pinned / MIB:.0f} MiB "
            f"({self.threads} x 2 x {self.decoder.host_padding / MIB:.0f} MiB + {self.hw_staging / MIB:.0f} MiB "
            f"hardware-decoder staging); not counted: the hardware decoder's pool for "
            f"{self.decoder.width_hint}x{self.decoder.height_hint} images"
        )


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


def torchvision_sized(jpegs, shorter: int, orientation: str):
    """Per sample, as a DALI node: torchvision's ``Resize(shorter)`` output (height, width) for the encoded image,
    in integer arithmetic (DALI's ``resize_shorter`` rounds the longer side and keeps a sub-pixel scale: 30% of
    ILSVRC images came out a pixel larger, and 4x the pixel error; benchmarks/resize_parity.py)."""
    shape = fn.peek_image_shape(jpegs, adjust_orientation=orientation == "exif", dtype=types.INT64)
    h, w = shape[0], shape[1]
    portrait = fn.cast(h > w, dtype=types.INT64)
    height = portrait * ((shorter * h) // w) + (1 - portrait) * shorter
    width = (1 - portrait) * ((shorter * w) // h) + portrait * shorter
    return fn.cast(fn.stack(height, width), dtype=types.FLOAT)


def dali_resize(images, jpegs, size: list[int], orientation: str):
    """DALI's ``fn.resize`` as the GPU pipeline uses it: antialiased bilinear to [h, w], or for [s] to torchvision's
    size for the shorter side ``s`` (the settings closest to torchvision's resize: benchmarks/resize_parity.py)."""
    shape = torchvision_sized(jpegs, size[0], orientation) if len(size) == 1 else size
    return fn.resize(images, antialias=True, size=shape)


def _resize(images, jpegs, size: list[int], spec: ImageSpec, decoder_device: str, cpus: Sequence[int] | None):
    """[h, w], or [s] for the shorter side; antialiased bilinear on either device, sized as torchvision sizes."""
    if decoder_device == "cpu":
        resize_batch = TorchResize(size, Pipeline.current().num_threads, cpus)
        return fn.python_function(images, function=resize_batch, batch_processing=True)
    return dali_resize(images, jpegs, size, spec.orientation)


class ShardLabels:
    """The class index of each sample's ``.cls`` member, for a batch, as a DALI python function: a label that is not
    the shard set's fixed-width digits naming a class stops the pipeline with the shard and the sample's name (its
    ``source_info``, ``<tar>:<offset>:<member>``), never a wrong label. One vectorised pass per batch."""

    def __init__(self, digits: int, num_classes: int) -> None:
        self.digits, self.num_classes = digits, num_classes
        self.place_values = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)

    def __call__(self, texts: list[np.ndarray], sources: list[np.ndarray]) -> list[np.ndarray]:
        if all(text.shape == (self.digits,) for text in texts):
            digits = np.stack(texts).astype(np.int64) - ord("0")
            labels = digits @ self.place_values
            if ((digits >= 0) & (digits <= 9)).all() and (labels < self.num_classes).all():
                return list(labels[:, None].astype(np.int64))
        for text, source in zip(texts, sources):  # the first bad one, named
            tar, _, member = bytes(source).decode().rsplit(":", 2)
            parse_label(bytes(text), self.digits, self.num_classes, tar, member.rsplit(".", 1)[0])
        raise AssertionError("a batch failed the label check but none of its samples did")


def reader(split: Split | ShardSplit, shard: Shard, *, training: bool, reader_seed: int, shuffle_buffer: int):
    """The encoded images and their int64 labels, this rank's part of ``split``: a permutation of all samples
    (files) or of the shards (tar shards) every epoch in training; one contiguous part of the split in validation."""
    order = (
        dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=reader_seed) if training else dict(stick_to_shard=True)
    )
    common = dict(shard_id=shard.rank, num_shards=shard.world_size, pad_last_batch=True, name=READER, **order)
    if isinstance(split, Split):
        return fn.readers.file(files=split.paths, labels=split.labels, **common)
    if training and shuffle_buffer > 1:
        common |= dict(random_shuffle=True, initial_fill=shuffle_buffer, seed=reader_seed)
    jpegs, texts = fn.readers.webdataset(
        paths=split.tar_paths,
        index_paths=split.index_paths,
        ext=[";".join(IMAGE_EXTENSIONS), LABEL_EXTENSION],
        missing_component_behavior="error",
        **common,
    )
    parse = ShardLabels(split.label_digits, split.num_classes)
    labels = fn.python_function(texts, fn.get_property(texts, key="source_info"), function=parse, batch_processing=True)
    return jpegs, labels


@pipeline_def(enable_conditionals=False)
def ilsvrc_pipeline(
    split: Split | ShardSplit,
    spec: ImageSpec,
    training: bool,
    decoder_device: str,
    shard: Shard,
    image_size: int | None = None,
    reader_seed: int = 0,
    shuffle_buffer: int = 0,
    image_dtype: str = "float32",
    hw_decoder_load: float = 0.65,
    decoder_memory: DecoderMemory = DecoderMemory(),
    cpus: Sequence[int] | None = None,
):
    """Train: random-resized crop decoded straight from the JPEG, resized to ``image_size`` (the epoch's; default
    the spec's), the spec's automatic augmentation and random erasing (data/augment.py; built with
    ``enable_conditionals`` where it needs them), flip. Val: shorter side to ``val_resize_size``, centre crop of
    ``val_image_size``."""
    jpegs, labels = reader(split, shard, training=training, reader_seed=reader_seed, shuffle_buffer=shuffle_buffer)
    decoding = dict(device=decoder_device, output_type=types.RGB, adjust_orientation=spec.orientation == "exif")
    if decoder_device == "mixed":  # the hardware decoder's share set explicitly: its default moved across versions
        decoding |= dict(hw_decoder_load=hw_decoder_load, **decoder_memory.arguments())
        labels = labels.gpu()  # with the images: no host-to-device copy per step
    if training:
        images = fn.decoders.image_random_crop(
            jpegs,
            random_area=list(spec.train_crop_scale),
            random_aspect_ratio=list(spec.train_aspect_ratio),
            num_attempts=100,
            **decoding,
        )
        crop = image_size or spec.image_size
        size, mirror = [crop, crop], fn.random.coin_flip(probability=0.5 * spec.flip)
    else:
        images = fn.decoders.image(jpegs, **decoding)
        size, mirror, crop = [spec.val_resize_size], 0, spec.val_crop
    images = _resize(images, jpegs, size, spec, decoder_device, cpus)
    if training and (spec.auto_augment is not None or spec.random_erasing > 0):
        images = dali_augment(images, spec)
    images = fn.crop_mirror_normalize(
        images,
        dtype=OUTPUT_DTYPES[image_dtype],
        output_layout="HWC",
        crop=(crop, crop),
        mean=list(spec.mean),
        std=list(spec.std),
        mirror=mirror,
    )
    return images, labels


def _advice(split: Split | ShardSplit) -> str:
    """What to do when the pipeline cannot read or decode a sample of ``split``."""
    return verify_advice(split.root) if isinstance(split, ShardSplit) else UNREADABLE_FILE_ADVICE


def pin_threads(cpus: Sequence[int] | None, num_threads: int) -> None:
    """Pins the DALI threads of this process's pipelines built with ``set_affinity`` to ``cpus``, unless the user
    set ``DALI_AFFINITY_MASK`` already. Process-wide and left set: each thread reads it when it starts, later."""
    if cpus and "DALI_AFFINITY_MASK" not in os.environ:  # long enough for any later pipeline of the process
        os.environ["DALI_AFFINITY_MASK"] = affinity_mask(list(cpus), max(num_threads, 256))


def _iterator(pipeline, last_batch_policy: LastBatchPolicy, advice: str) -> DALIGenericIterator:
    """The pipeline built and wrapped; a build that fails (DALI's reader checks its files and index files here) says
    what to do about it."""
    try:
        return DALIGenericIterator(
            pipeline,
            ["images", "labels"],
            reader_name=READER,
            last_batch_policy=last_batch_policy,
            prepare_first_batch=False,
        )
    except RuntimeError as error:
        raise RuntimeError(f"{error}\n{advice}") from error


class DaliLoader:
    """A fixed number of ``(images, labels)`` batches per epoch from a DALI pipeline, whatever the Trainer does.

    Images come as NCHW views of DALI's NHWC output, i.e. channels_last in memory. DALI ignores a reset in
    mid-epoch (and would shorten the next epoch), so an epoch the Trainer left early (sanity validation,
    ``limit_*_batches``) is drained before the next one starts.
    """

    def __init__(
        self, pipeline, batches_per_epoch: int | None, last_batch_policy: LastBatchPolicy, advice: str
    ) -> None:
        self.last_batch_policy, self.advice = last_batch_policy, advice
        self.iterator = _iterator(pipeline, last_batch_policy, advice)
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
            try:
                batch = next(self.iterator)[0]
            except RuntimeError as error:  # DALI names the file (not always the sample of a shard): what to do
                raise RuntimeError(f"{error}\n{self.advice}") from error
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

    The image size is a constant of the pipeline's graph: an epoch whose size (``resolution``) differs from the
    last one's rebuilds the pipeline at the size from its reader's checkpoint at the epoch's start (a second or so,
    once per distinct size of a progressive-resizing run), so the order of the samples is unchanged.
    """

    def __init__(
        self,
        build_pipeline: Callable[[str | None, int], object],
        batches_per_epoch: int,
        progress: TrainProgress,
        shard: Shard,
        advice: str,
    ) -> None:
        self.image_size = progress.resolution.size(progress.current_epoch())
        super().__init__(build_pipeline(None, self.image_size), batches_per_epoch, LastBatchPolicy.DROP, advice)
        self.build_pipeline, self.progress = build_pipeline, progress
        self.rank, self.world_size = shard.rank, shard.world_size
        self.epoch_start: str | None = None  # set when an epoch starts; read only while one runs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish_epoch()
        self.epoch_start = self.iterator.checkpoints()[0]
        size = self.progress.resolution.size(self.progress.current_epoch())
        if size != self.image_size:
            self._rebuild(self.epoch_start, size)
        yield from super().__iter__()

    def _rebuild(self, checkpoint: str, image_size: int) -> None:
        self.iterator = _iterator(self.build_pipeline(checkpoint, image_size), self.last_batch_policy, self.advice)
        self.image_size = image_size

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
        self._rebuild(checkpoints[self.rank], self.progress.resolution.size(self.progress.current_epoch()))
        self.in_epoch, self.replay = False, self.progress.trained_batches()


@dataclass(frozen=True)
class TrainProgress:
    """Where the fit loop is, as the train loader asks it: the epoch (for its image size) and, on a restore, the
    batches of that epoch already trained."""

    resolution: TrainResolution
    current_epoch: Callable[[], int]
    trained_batches: Callable[[], int]


class DaliLoaders:
    """The loader node ``conf/data/loader/dali.yaml``: one DALI pipeline per split and rank.

    ``device``: ``mixed`` decodes on the GPU (nvJPEG and the hardware JPEG engine), ``cpu`` on the CPU, ``auto``
    on the rank's GPU where it has one. ``output_dtype``: ``auto`` hands float16 to 16-bit runs that decode on
    the GPU (half the bytes; DALI has no bfloat16 and autocast casts fp16 input) and float32 otherwise (a CPU
    pipeline's float16 conversion cost ~12% of its speed on 2 cores, more than the halved copy saves).
    ``prefetch_depth``: batches each pipeline prepares ahead; ``hw_decoder_load``: the share of the images the GPU's
    JPEG engine decodes; ``cpu_affinity``: pin each rank's DALI threads to its own cores.

    On the GPU, nvJPEG's buffers are per thread, so a rank with many threads preallocates GBs: ``gpu_memory_mib`` and
    ``pinned_memory_mib`` are the rank's budget for its train and val pipelines together, and the paddings are sized
    to fit it; the val pipeline decodes with ``val_threads`` threads (it runs a few minutes per epoch).

    ``shuffle_buffer``: over a shard set, the encoded samples each rank's train reader draws from at random (host
    memory: about 110 KB each for ILSVRC); 0 or 1: none. ``repeated_augmentations``: 1 only (the torchvision
    loader's sampler implements it; DALI's readers draw their own permutation).
    """

    name = "dali"
    ten_crop = False
    PREALLOCATE_HINT = (5980, 6430)  # width, height: NVIDIA's examples', ILSVRC's largest images

    def __init__(
        self,
        device: str = "auto",
        output_dtype: str = "auto",
        prefetch_depth: int = 2,
        hw_decoder_load: float = 0.65,
        cpu_affinity: bool = True,
        val_threads: int = 2,
        gpu_memory_mib: int = 1024,
        pinned_memory_mib: int = 2048,
        shuffle_buffer: int = 4096,
        repeated_augmentations: int = 1,
    ) -> None:
        if repeated_augmentations != 1:  # DALI's readers permute the samples: no sampler to repeat them through
            raise ConfigError(
                "data.loader.repeated_augmentations",
                repeated_augmentations,
                "1 with data/loader=dali (repeated augmentation: data/loader=torchvision)",
            )
        if device not in DEVICES:
            raise ConfigError("data.loader.device", device, " or ".join(DEVICES))
        if output_dtype not in ("auto", *OUTPUT_DTYPES):
            raise ConfigError("data.loader.output_dtype", output_dtype, " or ".join(("auto", *OUTPUT_DTYPES)))
        for key, value in dict(prefetch_depth=prefetch_depth, val_threads=val_threads).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.loader.{key}", value, "a whole number >= 1")
        if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 0:
            raise ConfigError("data.loader.shuffle_buffer", shuffle_buffer, "a number of samples >= 0 (0: none)")
        if not 0 <= hw_decoder_load <= 1:
            raise ConfigError("data.loader.hw_decoder_load", hw_decoder_load, "a share between 0 and 1")
        for key, value in dict(gpu_memory_mib=gpu_memory_mib, pinned_memory_mib=pinned_memory_mib).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.loader.{key}", value, "a whole number of MiB per rank")
        self.device, self.output_dtype, self.prefetch_depth = device, output_dtype, prefetch_depth
        self.hw_decoder_load, self.cpu_affinity, self.val_threads = hw_decoder_load, cpu_affinity, val_threads
        self.gpu_memory, self.pinned_memory = gpu_memory_mib * MIB, pinned_memory_mib * MIB
        self.shuffle_buffer = shuffle_buffer

    def decoder(self, placement: Placement) -> str:
        """``mixed`` or ``cpu`` for a rank placed on ``placement.device``."""
        if self.device == "mixed" and placement.device.type != "cuda":
            raise ConfigError(
                "data.loader.device", "mixed", f"cpu or auto on this rank, which runs on {placement.device} (no GPU)"
            )
        return "mixed" if self.device != "cpu" and placement.device.type == "cuda" else "cpu"

    def where_decoded(self, placement: Placement) -> str:
        """Where this rank's JPEGs are decoded, for its first log lines."""
        threads = self.threads(placement, training=True)
        if self.decoder(placement) == "mixed":
            return (
                f"GPU {placement.device} (DALI mixed: hardware JPEG decoder for {self.hw_decoder_load:.0%}, "
                f"nvJPEG for the rest; {threads} CPU thread(s), val {self.threads(placement, training=False)})"
            )
        return f"CPU (DALI, {threads} thread(s))"

    def image_dtype(self, placement: Placement) -> str:
        if self.output_dtype != "auto":
            return self.output_dtype
        return "float16" if placement.half_dtype is not None and self.decoder(placement) == "mixed" else "float32"

    def threads(self, placement: Placement, training: bool) -> int:
        """DALI threads of the rank's train or val pipeline (``num_workers=0``: one, in this process's pool)."""
        threads = max(1, placement.workers)
        return threads if training or self.decoder(placement) == "cpu" else min(threads, self.val_threads)

    def memory(self, request: BatchRequest, training: bool) -> PipelineMemory:
        """What the rank's train or val pipeline preallocates, its paddings sized so that both fit the budget.

        Fixed parts first (prefetched output batches, the hardware decoder's staging), then the budget left is
        shared by every decoder thread of both pipelines, at most NVIDIA's example's padding, at least DALI's default.
        """
        if self.decoder(request.placement) == "cpu":
            return PipelineMemory(self.threads(request.placement, training), DecoderMemory(), 0, 0)
        pixel = 3 * (2 if self.image_dtype(request.placement) == "float16" else 4)
        spec = request.spec
        # a ramp's sizes are assumed up to the size it ends at, data.spec.image_size
        queues = {split: self.prefetch_depth * request.batch_size * size**2 * pixel
                  for split, size in ((True, spec.image_size), (False, spec.val_crop))}  # fmt: skip
        staging = math.ceil(self.hw_decoder_load * request.batch_size) * HW_STAGING_PER_IMAGE
        threads = {split: self.threads(request.placement, split) for split in (True, False)}
        total = sum(threads.values())
        paddings = {}
        for key, budget, fixed, buffers, largest in (  # both pipelines: two queues, two stagings
            ("gpu_memory_mib", self.gpu_memory, sum(queues.values()), 1, LARGEST_DEVICE_PADDING),
            ("pinned_memory_mib", self.pinned_memory, 2 * staging, 2, LARGEST_HOST_PADDING),
        ):
            padding = (budget - fixed) // (buffers * total) // MIB * MIB
            if padding < SMALLEST_PADDING:
                needed = math.ceil((fixed + buffers * total * SMALLEST_PADDING) / MIB)
                raise ConfigError(
                    f"data.loader.{key}",
                    budget // MIB,
                    f">= {needed} MiB for {total} decoder threads (train and val) and batch {request.batch_size}, "
                    "or fewer threads (data.num_workers, data.loader.val_threads)",
                )
            paddings[key] = min(largest, padding)
        decoder = DecoderMemory(paddings["gpu_memory_mib"], paddings["pinned_memory_mib"], *self.PREALLOCATE_HINT)
        return PipelineMemory(threads[training], decoder, queues[training], staging)

    @staticmethod
    def batches_per_epoch(num_images: int, batch_size: int, shard: Shard) -> int:
        """floor(floor(N / world) / batch): the smallest shard's full batches, the same count on every rank."""
        return num_images // shard.world_size // batch_size

    @staticmethod
    def val_order(num_images: int, shard: Shard) -> range:
        """The split's images in the order this rank's val loader yields them: the reader's contiguous shard."""
        return range(num_images * shard.rank // shard.world_size, num_images * (shard.rank + 1) // shard.world_size)

    def train(
        self,
        request: BatchRequest,
        seed: int,
        trained_batches: Callable[[], int] = lambda: 0,
        resolution: TrainResolution | None = None,
        current_epoch: Callable[[], int] = lambda: 0,
    ) -> ResumableDaliLoader:
        """Every rank runs ``batches_per_epoch`` steps: the same count on each, full batches only.

        ``trained_batches`` tells, when a checkpoint is restored, how many batches of its epoch were trained;
        ``resolution`` the image size of each epoch (default: the spec's) and ``current_epoch`` the epoch.
        """
        build_pipeline = partial(
            ilsvrc_pipeline,
            enable_conditionals=needs_conditionals(request.spec),
            training=True,
            reader_seed=seed,
            shuffle_buffer=self.shuffle_buffer,
            seed=seed + 1 + request.shard.rank,
            enable_checkpointing=True,
            **self.pipeline_arguments(request, training=True),
        )
        steps = self.batches_per_epoch(len(request.split), request.batch_size, request.shard)
        progress = TrainProgress(resolution or FixedResolution(request.spec.image_size), current_epoch, trained_batches)
        return ResumableDaliLoader(
            lambda checkpoint, image_size: build_pipeline(checkpoint=checkpoint, image_size=image_size),
            steps,
            progress,
            request.shard,
            advice=_advice(request.split),
        )

    def val(self, request: BatchRequest, ten_crop: bool = False) -> DaliLoader:
        """Each rank its own contiguous shard, the last batch partial: every image counted exactly once."""
        if ten_crop:
            raise ConfigError("data.val_crops", 10, "1 with data/loader=dali (ten crops: data/loader=torchvision)")
        pipeline = ilsvrc_pipeline(training=False, **self.pipeline_arguments(request, training=False))
        return DaliLoader(pipeline, None, LastBatchPolicy.PARTIAL, advice=_advice(request.split))

    def pipeline_arguments(self, request: BatchRequest, training: bool) -> dict:
        """What the pipeline reads and makes, where it decodes, which shard it reads, how it uses the machine."""
        shard, placement = request.shard, request.placement
        decoder = self.decoder(placement)
        memory = self.memory(request, training)
        if decoder == "mixed":
            rank_zero_info(memory.describe("train" if training else "val"))
        threads = memory.threads
        cpus = placement.cpus if self.cpu_affinity else ()
        pin_threads(cpus, threads)
        return dict(
            split=request.split,
            spec=request.spec,
            batch_size=request.batch_size,
            decoder_device=decoder,
            device_id=placement.device.index if decoder == "mixed" else None,
            shard=shard,
            num_threads=threads,
            set_affinity=bool(cpus),
            cpus=cpus or None,
            prefetch_queue_depth=self.prefetch_depth,
            hw_decoder_load=self.hw_decoder_load,
            decoder_memory=memory.decoder,
            image_dtype=self.image_dtype(placement),
        )
