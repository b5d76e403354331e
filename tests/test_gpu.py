"""The GPU check's own tests (scripts/gpu_check.sh runs them with the gpu tests of the other files): DALI's GPU
decoder ("mixed") in 2-GPU DDP over NCCL and in a mid-epoch resume, 16-mixed with fused SGD, torch.compile's
recompilations, and the GPU's JPEG engine at work. Each skips without CUDA (tests/conftest.py); the DDP one also
with fewer than 2 GPUs.

The training runs read the demo dataset (classes that a short run learns); the JPEG engine test reads real JPEGs:
the folder GPU_CHECK_JPEGS names (the check's JPEG_DIR), else ../shared/data/imagenet-samples. Where GPU_CHECK_OUT
is set, the tests write what they measured there, one JSON file each, for the check's summary.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from data.ilsvrc import Split
from data.placement import Placement
from data.spec import ImageSpec
from tests.loaders import loader
from train import train

from .conftest import LEARN, SHARED_DATA, SMALL_RUN, run_train

GPU = ["trainer=gpu"]  # one GPU, bf16-mixed, cudnn benchmark
TWO_GPUS = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2", "trainer.precision=bf16-mixed"]
MIXED = ["data/loader=dali", "data.loader.device=mixed"]  # DALI decodes on the GPU, or the run stops


def report(name: str, figures: dict) -> None:
    """The test's measurements, for the GPU check's summary, where it asked for them (GPU_CHECK_OUT)."""
    folder = os.environ.get("GPU_CHECK_OUT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(figures))


def _fingerprints(batch) -> list:
    images, labels = batch
    return [labels.tolist(), [round(float(x), 2) for x in images.double().sum(dim=(1, 2, 3))]]


class RankBatches(pl.Callback):
    """Each rank writes ``rank<R>.json``: the epoch, labels and a fingerprint (pixel sum: content and augmentation)
    of every image of each trained batch, and per validation the same of each batch; the batches' devices and
    dtypes; its world size, global step and metrics."""

    def __init__(self, folder: str) -> None:
        self.folder, self.train, self.val, self.devices, self.dtypes = Path(folder), [], [], set(), set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append([trainer.current_epoch, *_fingerprints(batch)])  # a resumed epoch has no epoch start
        self.devices.add(str(batch[0].device))
        self.dtypes.add(str(batch[0].dtype))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append([])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val[-1].append(_fingerprints(batch))

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "devices": sorted(self.devices),
            "dtypes": sorted(self.dtypes),
            "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
            "train": self.train,
            "val": self.val,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _ranks(folder: Path, world_size: int) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def _gpu_decoded(rank: dict, device: str) -> bool:
    """The batches reached the model on ``device`` in float16, the dtype that data.loader.output_dtype=auto gives
    only a 16-bit run whose DALI pipeline decodes on the GPU (data/dali.py): where the pixels were made."""
    return rank["devices"] == [device] and rank["dtypes"] == ["torch.float16"]


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA GPUs for NCCL DDP; this machine has {torch.cuda.device_count()}",
)
def test_two_gpus_over_nccl_with_gpu_decoding_learn_and_see_every_image_once(tmp_path: Path):
    folder = tmp_path / "ranks"
    result = run_train(
        *LEARN,
        *MIXED,
        *TWO_GPUS,
        "+trainer.num_sanity_val_steps=0",
        "+callbacks.batches._target_=tests.test_gpu.RankBatches",
        f"+callbacks.batches.folder={folder}",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Learning rate 0.0585938 = 0.3 x global batch 50 / 256 (25 per device x 2 devices" in result.stderr
    ranks = _ranks(folder, 2)
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert _gpu_decoded(ranks[0], "cuda:0") and _gpu_decoded(ranks[1], "cuda:1")
    # 400 train images / 2 ranks / 25 per batch: 8 full batches per rank and epoch, so each epoch every image once
    assert [rank["global_step"] for rank in ranks] == [64, 64]
    for epoch in range(8):
        batches = [(labels, sums) for rank in ranks for e, labels, sums in rank["train"] if e == epoch]
        assert len(batches) == 16 and all(len(labels) == 25 for labels, _ in batches)
        assert Counter(label for labels, _ in batches for label in labels) == {c: 100 for c in range(4)}
    # 60 val images: 30 per rank (a batch of 25 and one of 5), the same pixels in every epoch, each image once
    for rank in ranks:
        assert len(rank["val"]) == 8 and all(run == rank["val"][0] for run in rank["val"])
        assert [len(labels) for labels, _ in rank["val"][0]] == [25, 5]
    seen = [{(label, x) for labels, sums in rank["val"][0] for label, x in zip(labels, sums)} for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 30 and not seen[0] & seen[1]
    assert Counter(label for images in seen for label, _ in images) == {c: 15 for c in range(4)}
    # the val metrics are reduced over both ranks: the same on each; the model learned
    synced = [name for name in ranks[0]["metrics"] if name not in ("train/loss", "img/s")]
    assert {name: ranks[0]["metrics"][name] for name in synced} == {name: ranks[1]["metrics"][name] for name in synced}
    assert ranks[0]["metrics"]["val/acc1"] >= 0.45, f"chance is 0.25 on 4 classes; got {ranks[0]['metrics']}"


@pytest.mark.gpu
def test_mid_epoch_resume_with_gpu_decoding_replays_the_exact_samples(make_cfg, tmp_path: Path):
    """As tests/test_dali.py's CPU version on one GPU: interrupted after step 14 (2 batches into epoch 2 of 3),
    resumed: the run trains the uninterrupted sequence of images, crops and flips, also in the epoch after."""
    run = [*SMALL_RUN, *MIXED, *GPU, "trainer.max_epochs=3", "+callbacks.batches._target_=tests.test_gpu.RankBatches"]
    train(make_cfg(*run, f"+callbacks.batches.folder={tmp_path / 'straight'}"))
    checkpoint = tmp_path / "preempted.ckpt"
    interrupt = [
        "+callbacks.interrupt._target_=tests.observers.InterruptAtStep",
        "+callbacks.interrupt.step=14",
        f"+callbacks.interrupt.path={checkpoint}",
    ]
    train(make_cfg(*run, *interrupt, f"+callbacks.batches.folder={tmp_path / 'first'}"))
    train(make_cfg(*run, f"ckpt_path={checkpoint}", f"+callbacks.batches.folder={tmp_path / 'second'}"))
    reference, head, tail = (_ranks(tmp_path / part, 1)[0] for part in ("straight", "first", "second"))
    assert all(_gpu_decoded(part, "cuda:0") for part in (reference, head, tail))
    batches = [part["train"] for part in (reference, head, tail)]
    assert [len(part) for part in batches] == [36, 14, 22]  # 240 images / 20 per batch = 12 steps per epoch
    assert batches[1] + batches[2] == batches[0]  # and each batch in the same epoch
    assert tail["global_step"] == reference["global_step"] == 36


class ScalerWatch(pl.Callback):
    """The optimizer the trainer built, the 16-mixed loss scale when fit ends and the first convolution's
    weights before training (the last instance is kept for tests)."""

    last: ScalerWatch | None = None

    def __init__(self) -> None:
        ScalerWatch.last = self

    def on_train_start(self, trainer, pl_module) -> None:
        (self.optimizer,) = trainer.optimizers
        self.initial = pl_module.net.conv1.weight.detach().float().cpu().clone()

    def on_fit_end(self, trainer, pl_module) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # None: no loss scaling (bf16, or fp16 on a CPU)
        self.scale = None if scaler is None else float(scaler.get_scale())


@pytest.mark.gpu
def test_fp16_mixed_with_fused_sgd_learns_and_saves_its_loss_scale(make_cfg, tmp_path: Path):
    """16-mixed's GradScaler with the fused SGD kernel (which unscales the gradients itself): the run learns, and
    the checkpoint holds the scale the run ended with."""
    run = [*LEARN, *MIXED, *GPU, "trainer.precision=16-mixed", "optimizer.fused=true", "model.channels_last=true"]
    metrics = train(make_cfg(*run, "+callbacks.scaler._target_=tests.test_gpu.ScalerWatch"))
    watch = ScalerWatch.last
    assert isinstance(watch.optimizer, torch.optim.SGD) and watch.optimizer.defaults["fused"] is True
    assert watch.scale is not None, "the 16-mixed run had no GradScaler"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    scale = state["MixedPrecision"]["scale"]
    assert scale == watch.scale and scale >= 1 and math.log2(scale).is_integer()
    weights = state["state_dict"]["net.conv1.weight"].float()
    assert torch.isfinite(weights).all() and not torch.equal(weights, watch.initial)
    buffers = [value["momentum_buffer"] for value in state["optimizer_states"][0]["state"].values()]
    assert buffers and all(torch.isfinite(buffer).all() for buffer in buffers)
    report("fp16-fused-sgd", {"scale": scale, "val/acc1": metrics["val/acc1"], "global_step": state["global_step"]})
    assert state["global_step"] == 128  # 400 images / 25 per batch, 8 epochs
    assert metrics["val/acc1"] >= 0.45, f"chance is 0.25 on 4 classes; got {metrics}"


class CompileCounts(pl.Callback):
    """Dynamo's count of the graphs it compiled, as each training epoch starts and when fit ends."""

    last: CompileCounts | None = None

    def __init__(self) -> None:
        self.at_epoch_start: list[int] = []
        self.at_end: int | None = None
        CompileCounts.last = self

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.at_epoch_start.append(self.graphs())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.at_end = self.graphs()


@pytest.mark.gpu
def test_compiled_training_compiles_each_mode_once(make_cfg):
    """model.compile=true over 2 epochs, with sanity validation and a partial last val batch (52 val images, 20 per
    batch). The net is compiled at most 3 times, all in the first epoch: eval mode (the sanity check), train mode
    (BatchNorm and autograd differ), and eval again for the partial batch (Dynamo then compiles a graph with a
    dynamic batch size, ImageNet's val set ends with one too). The second epoch compiles nothing: a recompilation
    there would recur every epoch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = [*SMALL_RUN, *MIXED, *GPU, "model.compile=true", "model.channels_last=true", "trainer.max_epochs=2"]
    start = time.perf_counter()
    train(make_cfg(*run, "data.root.val_per_class=13", "+callbacks.compiles._target_=tests.test_gpu.CompileCounts"))
    counts = CompileCounts.last
    seconds = round(time.perf_counter() - start, 1)
    report("compile", {"graphs_at_epoch_start": counts.at_epoch_start, "graphs": counts.at_end, "seconds": seconds})
    assert len(counts.at_epoch_start) == 2 and counts.at_epoch_start[0] >= 1  # the sanity check ran compiled
    assert counts.at_end == counts.at_epoch_start[1], "the second epoch recompiled"
    assert counts.at_end <= 3, f"{counts.at_end} graphs compiled (TORCH_LOGS=recompiles says why)"


@pytest.mark.gpu
def test_a_compiled_ramp_with_gpu_augmentation_compiles_once_per_size(make_cfg):
    """Progressive resizing 16 -> 32 px over epochs 0..2 (sizes 16, 16, 32, 32), DALI decoding on the GPU with
    TrivialAugment and random erasing in the pipeline, model.compile=true: one graph per distinct input (train at
    16 and at 32, eval at the val size and its partial last batch), none after the ramp ends."""
    torch._dynamo.reset()
    ramp = ["_target_=data.resolution.ResolutionRamp", "start_size=16", "end_size=32", "start_epoch=1",
            "end_epoch=2", "multiple=16"]  # fmt: skip
    run = [*SMALL_RUN, *MIXED, *GPU, "model.compile=true", "model.channels_last=true", "trainer.max_epochs=4",
           "data.spec.auto_augment=trivial_augment_wide", "data.spec.random_erasing=0.5",
           *(f"+data.resolution.{entry}" for entry in ramp)]  # fmt: skip
    start = time.perf_counter()
    train(make_cfg(*run, "data.root.val_per_class=13", "+callbacks.compiles._target_=tests.test_gpu.CompileCounts"))
    counts = CompileCounts.last
    seconds = round(time.perf_counter() - start, 1)
    report(
        "compile_ramp", {"graphs_at_epoch_start": counts.at_epoch_start, "graphs": counts.at_end, "seconds": seconds}
    )
    assert counts.at_end == counts.at_epoch_start[3], "an epoch after the ramp recompiled"
    assert counts.at_end <= 4, f"{counts.at_end} graphs for 2 train sizes and one val size (TORCH_LOGS=recompiles)"


def _real_jpegs() -> list[str]:
    folder = Path(os.environ.get("GPU_CHECK_JPEGS") or SHARED_DATA / "imagenet-samples")
    files = sorted(str(p) for p in folder.glob("*") if p.suffix.lower() in (".jpeg", ".jpg")) if folder.is_dir() else []
    if not files:
        pytest.skip(f"no JPEGs in {folder}: set GPU_CHECK_JPEGS to a folder of real JPEGs")
    return files


def parse_dmon(output: str) -> list[dict[str, int | None]]:
    """The samples of ``nvidia-smi dmon -s u``: its first header line names the columns (``# gpu sm mem enc dec
    jpg ofa``); a value is None where the GPU has no such unit ('-')."""
    columns, samples = None, []
    for line in output.splitlines():
        if line.startswith("#"):
            columns = columns or line.lstrip("#").split()
        elif columns and len(line.split()) == len(columns):
            samples.append({c: int(v) if v.isdigit() else None for c, v in zip(columns, line.split())})
    return samples


def _jpeg_engine_use(files: list[str], train: bool, load: float, samples: int = 5) -> dict:
    """Decodes ``files`` through the project's DALI pipeline on the GPU with ``hw_decoder_load=load`` while
    ``nvidia-smi dmon`` takes ``samples`` samples of the utilisation of the GPU's units, one a second."""
    device = torch.device("cuda", torch.cuda.current_device())
    batches = loader(
        "dali",
        Split(files, list(range(len(files)))),
        train=train,
        batch_size=64,
        spec=ImageSpec(),
        placement=Placement(device, workers=4),
        device="mixed",
        hw_decoder_load=load,
    )
    for _ in batches:  # a first epoch: the pipeline built, its decoders and buffers allocated
        pass
    # dmon ends by itself after its samples (-c), so its output is complete; the decoding goes on until then
    command = ["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-c", str(samples)]
    dmon = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    images, start = 0, time.perf_counter()
    try:
        while dmon.poll() is None and time.perf_counter() - start < 60:
            images += sum(len(labels) for _, labels in batches)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    finally:
        if dmon.poll() is None:
            dmon.kill()
        output = dmon.communicate(timeout=30)[0]
    taken = parse_dmon(output)
    jpg = [sample.get("jpg") for sample in taken]
    return {
        "images_per_s": round(images / elapsed),
        "samples": len(taken),
        "jpg": None if not jpg or None in jpg else {"mean": sum(jpg) / len(jpg), "max": max(jpg)},
        "sm_mean": sum(sample.get("sm") or 0 for sample in taken) / max(1, len(taken)),
    }


def test_dmon_output_is_parsed_by_its_header():
    output = (
        "# gpu     sm    mem    enc    dec    jpg    ofa \n"
        "# Idx      %      %      %      %      %      % \n"
        "    0     31      8      0      0     12      0 \n"
        "    0      5      1      0      -      0      - \n"
    )
    samples = parse_dmon(output)
    assert [s["jpg"] for s in samples] == [12, 0] and [s["sm"] for s in samples] == [31, 5]
    assert samples[1]["dec"] is None and samples[0]["ofa"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("pipeline", ["train", "val"])
def test_the_gpu_jpeg_engine_decodes_what_the_pipeline_hands_it(pipeline: str):
    """The hardware JPEG decoder (the GPU's JPEG engine, `jpg` in nvidia-smi dmon) is used, in the train pipeline
    (it decodes only the random crop's region) and in the val pipeline: busy with hw_decoder_load=1.0, idler with
    0.0 (nvJPEG's CUDA kernels decode everything then)."""
    files = _real_jpegs()
    engine = {load: _jpeg_engine_use(files, pipeline == "train", load) for load in (1.0, 0.0)}
    report(f"jpeg-engine-{pipeline}", {f"hw_decoder_load={load}": use for load, use in engine.items()})
    on, off = engine[1.0], engine[0.0]
    assert on["samples"] >= 3, f"nvidia-smi dmon gave {on['samples']} samples of 5"
    if on["jpg"] is None:
        pytest.skip(f"{torch.cuda.get_device_name()} reports no JPEG engine ('-' in dmon's jpg column)")
    assert on["jpg"]["max"] > 0, f"hw_decoder_load=1.0 left the JPEG engine idle: {engine}"
    assert on["jpg"]["mean"] > off["jpg"]["mean"], engine
