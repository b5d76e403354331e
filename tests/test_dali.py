"""The DALI backend on the CPU: real pipelines over real JPEG files, sharding, exact counts, fixed epoch lengths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.dali import DaliLoaders
from data.ilsvrc import Split, load_layout
from data.placement import BatchRequest, Placement, Shard
from data.spec import ConfigError, ImageSpec
from tests.loaders import loader, small_spec, unnormalised
from train import train

from .conftest import PROJECT_ROOT, SHARED_DATA, SMALL_RUN, run_train


def _identified(paths: list[str]) -> Split:
    """The files with label = position, so every sample a loader yields can be told apart."""
    return Split(paths, list(range(len(paths))))


def _ids(batches) -> list[int]:
    return [int(i) for _, labels in batches for i in labels]


def _train(split: Split, shard: Shard | None = None):
    return loader("dali", split, train=True, batch_size=8, spec=small_spec(), shard=shard or Shard())


def _val(split: Split, shard: Shard):
    return loader("dali", split, train=False, batch_size=8, spec=small_spec(32, 36), shard=shard)


@pytest.fixture(scope="module")
def odd_split(small_demo_root: Path) -> Split:
    paths = load_layout(small_demo_root).train.paths
    return _identified(paths[: len(paths) - 1])  # 239 files


def test_train_batches_are_normalised_channels_last_rgb(small_demo_root: Path):
    split = load_layout(small_demo_root).train
    batches = loader("dali", split, train=True, batch_size=16, spec=small_spec(), placement=Placement(workers=2))
    images, labels = next(iter(batches))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (16,) and set(labels.tolist()) <= {0, 1, 2, 3}
    assert -2.2 < images.min() < -1.0 and 1.5 < images.max() < 2.7  # ImageNet-normalised 0..255 pixels
    assert len(batches) == 240 // 16


def _crop_offset(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int] | None:
    """The (dy, dx) in {0, 1} by which our crop of the same resized image starts later, if the pixels agree."""
    for dy, dx in ((0, 0), (1, 0), (0, 1)):
        h, w = ours.shape[1] - dy, ours.shape[2] - dx
        if (ours[:, :h, :w] - theirs[:, dy:, dx:]).abs().max() < 0.01:
            return dy, dx
    return None


@pytest.mark.parametrize("source", ["demo", "imagenet-samples"])
def test_val_matches_the_torchvision_backend(small_demo_root: Path, source: str):
    """Same decoder (libjpeg-turbo) and the same resize (torchvision's): the same pixels. DALI rounds the centre
    crop's offset half up, torchvision half to even, so where the excess is odd the crops are a pixel apart."""
    if source == "demo":
        split = load_layout(small_demo_root).val
    else:
        samples = sorted(map(str, (SHARED_DATA / "imagenet-samples").glob("*.JPEG")))[::25]  # 40, 2 grayscale among
        if not samples:
            pytest.skip("../shared/data/imagenet-samples is absent")
        split = _identified(samples)
    spec = small_spec(56, 64)
    theirs = loader("torchvision", split, train=False, batch_size=8, spec=spec, placement=Placement())
    ours = loader("dali", split, train=False, batch_size=8, spec=spec, placement=Placement(workers=2))
    pairs = list(zip(theirs, ours))
    assert len(pairs) == len(theirs) == len(ours)
    offsets = []
    for (reference, reference_labels), (images, labels) in pairs:
        assert torch.equal(labels.long(), torch.as_tensor(reference_labels))
        assert images.shape == reference.shape
        offsets += [_crop_offset(image, pixels) for image, pixels in zip(unnormalised(images, spec), reference.float())]
    assert None not in offsets
    assert (0, 0) in offsets and len(offsets) == len(split)


def test_two_shards_partition_each_epoch(odd_split: Split):
    """Every epoch: both ranks the same number of batches, disjoint shards, and a fresh global permutation, so a
    rank's shard is a new random half of the set (a fixed split that the ranks swap, or that each rank reshuffles
    in place, would keep its halves apart)."""
    loaders = [_train(odd_split, Shard(r, 2)) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [14, 14]  # floor(floor(239 / 2) / 8) on both ranks
    epochs = []
    for _ in range(3):
        shards = [_ids(loader) for loader in loaders]
        assert [len(s) for s in shards] == [112, 112]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0])) == 112
        epochs.append(shards)
    for before, after in zip(epochs, epochs[1:]):
        for rank in (0, 1):
            # two random halves of 239 share ~52 of 112 (sd ~4); a fixed split shares 0 or 112
            shared = [len(set(after[rank]) & set(before[r])) for r in (0, 1)]
            assert all(20 < n < 92 for n in shared), shared
    assert len({tuple(shards[0]) for shards in epochs}) == 3


def test_mid_epoch_state_of_another_world_size_is_refused(odd_split: Split):
    """DALI's reader state is per rank: a checkpoint of 2 ranks cannot resume exactly on 1, and says so."""
    batches = _train(odd_split)
    (state,) = batches.state_dict()["dali_epoch_start"]
    with pytest.raises(ValueError, match="reader state of 2 ranks, this run has 1: resume mid-epoch with the same"):
        batches.load_state_dict({"dali_epoch_start": [state, state]})
    batches.load_state_dict({"dali_epoch_start": [state]})


def test_val_counts_every_image_once_over_two_ranks(odd_split: Split):
    shards = [_ids(_val(odd_split, Shard(r, 2))) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(239))
    assert shards == [list(DaliLoaders.val_order(239, Shard(r, 2))) for r in (0, 1)]  # what eval's report relies on
    again = [_ids(_val(odd_split, Shard(r, 2))) for r in (0, 1)]
    assert again == shards


def test_epochs_keep_their_length_whatever_the_trainer_does(odd_split: Split):
    def make():
        return _train(odd_split)

    uninterrupted = make()
    epochs = [_ids(uninterrupted) for _ in range(3)]
    left_early = make()
    for _, _ in zip(range(3), left_early):  # the Trainer leaves an epoch early (limit_train_batches, sanity check)
        pass
    # the rest of that epoch is skipped, not read into the next: epochs 2 and 3 are those of an uninterrupted run
    assert [_ids(left_early) for _ in range(2)] == epochs[1:]
    assert [len(e) for e in epochs] == [len(uninterrupted) * 8] * 3 == [232] * 3


@pytest.mark.slow
def test_trainer_epochs_with_dali(make_cfg, tmp_path: Path):
    """3 epochs with sanity validation and limit_val_batches: every train epoch has all its batches."""
    from tests.observers import BatchCounter

    cfg = make_cfg(
        *SMALL_RUN,
        "data/loader=dali",
        "trainer.max_epochs=3",
        "+trainer.limit_val_batches=2",
        "+trainer.num_sanity_val_steps=2",
        "+callbacks.counter._target_=tests.observers.BatchCounter",
    )
    train(cfg)
    counts = BatchCounter.last.train_batches_per_epoch
    assert counts == [12, 12, 12]  # 240 images / batch 20
    assert BatchCounter.last.val_batches_per_run == [2, 2, 2, 2]  # sanity check + one per epoch
    assert BatchCounter.last.train_samples_per_epoch == [240, 240, 240]
    assert BatchCounter.last.val_samples_per_run == [40, 40, 40, 40]


@pytest.mark.gpu
def test_mixed_decoding_on_the_gpu_matches_the_cpu_pipeline(small_demo_root: Path):
    split, spec = load_layout(small_demo_root).val, small_spec(32, 36)
    gpu = Placement(torch.device("cuda", torch.cuda.current_device()), workers=2)
    on_gpu = loader("dali", split, train=False, batch_size=8, spec=spec, placement=gpu, device="mixed")
    on_cpu = loader("dali", split, train=False, batch_size=8, spec=spec, placement=Placement(workers=2))
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(on_gpu, on_cpu):
        assert gpu_images.is_cuda and gpu_images.is_contiguous(memory_format=torch.channels_last)
        assert gpu_labels.device == gpu_images.device  # no host-to-device copy of the labels per step
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        assert (gpu_images.cpu() - cpu_images).abs().mean() < 0.1  # nvJPEG vs libjpeg-turbo IDCT


def _recorded(folder: Path) -> list[list]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_mid_epoch_resume_replays_the_exact_samples_on_two_ranks(tmp_path: Path, backend: str):
    """Interrupted after step 8 (2 batches into epoch 2 of 3), resumed: each rank trains the uninterrupted sequence,
    also in the epoch after the resumed one."""
    run = [
        *SMALL_RUN,
        f"data/loader={backend}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=3",
        "+callbacks.recorder._target_=tests.observers.SampleRecorder",
    ]
    cache = tmp_path / "cache"
    straight = run_train(
        *run, f"+callbacks.recorder.folder={tmp_path / 'straight'}", cache_dir=cache, run_dir=tmp_path / "a"
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tmp_path / "preempted.ckpt"
    first = run_train(
        *run,
        f"+callbacks.recorder.folder={tmp_path / 'first'}",
        "+callbacks.interrupt._target_=tests.observers.InterruptAtStep",
        "+callbacks.interrupt.step=8",
        f"+callbacks.interrupt.path={checkpoint}",
        cache_dir=cache,
        run_dir=tmp_path / "b",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(
        *run,
        f"+callbacks.recorder.folder={tmp_path / 'second'}",
        f"ckpt_path={checkpoint}",
        cache_dir=cache,
        run_dir=tmp_path / "b",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    for reference, head, tail in zip(
        _recorded(tmp_path / "straight"), _recorded(tmp_path / "first"), _recorded(tmp_path / "second")
    ):
        assert len(reference) == 18 and len(head) == 8 and len(tail) == 10  # 240 images / 2 ranks / 20 per batch
        assert head + tail == reference
    ranks = _recorded(tmp_path / "straight")
    assert not set(ranks[0][0][1]) & set(ranks[1][0][1])  # the ranks read different samples


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_shard_by_global_rank(tmp_path: Path, cache_dir: Path, small_demo_root: Path):
    """Two nodes of one CPU process each (trainer.num_nodes=2, NODE_RANK set per node, as a cluster launcher
    does), so local rank 0 twice and global ranks 0 and 1: the two shard the train and val sets between them."""
    recorded = tmp_path / "samples"
    run = [
        *SMALL_RUN,
        "data/loader=dali",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "+trainer.num_nodes=2",
        "trainer.max_epochs=1",
        "+trainer.num_sanity_val_steps=0",
        "+callbacks.recorder._target_=tests.observers.SampleRecorder",
        f"+callbacks.recorder.folder={recorded}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    nodes = [
        subprocess.Popen(
            [sys.executable, "train.py", *run, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=PROJECT_ROOT,
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    for suffix, images in (("", 240), ("-val", 60)):  # train: 6 full batches of 20 per rank, val: 30 per rank
        ranks = [json.loads((recorded / f"rank{rank}{suffix}.json").read_text()) for rank in (0, 1)]
        fingerprints = [{(label, x) for labels, sums in batches for label, x in zip(labels, sums)} for batches in ranks]
        assert len(fingerprints[0]) == len(fingerprints[1]) == images // 2 and not fingerprints[0] & fingerprints[1]
        labels = Counter(label for batches in ranks for labels, _ in batches for label in labels)
        assert labels == {label: images // 4 for label in range(4)}  # every image once: the ranks partition the set


def test_half_precision_output(small_demo_root: Path):
    split, spec = load_layout(small_demo_root).val, small_spec(32, 36)
    images, _ = next(iter(loader("dali", split, train=False, batch_size=8, spec=spec, output_dtype="float16")))
    reference, _ = next(iter(loader("dali", split, train=False, batch_size=8, spec=spec)))
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(images.float(), reference, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_val_metrics_over_two_ranks_equal_one_rank(tmp_path: Path, backend: str):
    """The same weights validated by 1 and by 2 ranks over 39 images: 20 and 19 per rank, nothing padded."""
    run = [
        *SMALL_RUN,
        f"data/loader={backend}",
        "data.root.num_classes=3",
        "data.root.val_per_class=13",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=0",
        "+trainer.num_sanity_val_steps=-1",  # only a full validation
        "+callbacks.record._target_=tests.observers.ValidationRecord",
    ]
    results = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        ddp = ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"]
        result = run_train(
            *run,
            *ddp,
            f"+callbacks.record.folder={folder}",
            cache_dir=tmp_path / "cache",
            run_dir=tmp_path / f"run{devices}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        results[devices] = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)]
    assert results[1][0]["images"] == 39 and sorted(r["images"] for r in results[2]) == [19, 20]
    one = results[1][0]
    for rank in results[2]:
        assert rank["metrics"] == pytest.approx(one["metrics"], abs=1e-6)
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("device", "precision", "dtype"),
    [("cpu", "bf16-mixed", "float32"), ("cuda", "bf16-mixed", "float16"), ("cuda", "32-true", "float32")],
)
def test_auto_output_dtype_is_half_for_gpu_decoding_in_16_bit_runs(device, precision, dtype):
    """float16 halves what a GPU pipeline writes; on the CPU the conversion costs more than the bytes it saves."""
    placement = Placement(torch.device(device, 0 if device == "cuda" else None), precision=precision)
    assert DaliLoaders().image_dtype(placement) == dtype


def test_gpu_decoding_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="data.loader.device='mixed' is not allowed: cpu or auto on this rank"):
        DaliLoaders("mixed").decoder(Placement())


def _gpu_request(local_rank: int, workers: int = 27, batch_size: int = 256) -> BatchRequest:
    """Rank ``local_rank`` of 8 on a node, placed on its GPU with ``workers`` DALI threads, in a bf16 run."""
    placement = Placement(torch.device("cuda", local_rank), workers=workers, precision="bf16-mixed")
    return BatchRequest(Split([], []), ImageSpec(), batch_size, Shard(local_rank, 8), placement)


def test_gpu_pipelines_of_eight_ranks_with_27_threads_fit_the_memory_budget():
    """nvJPEG preallocates per thread: with NVIDIA's example's paddings and as many val threads as train threads,
    54 threads took 10.6 GiB of each GPU and 14.1 GiB of pinned memory per rank (113 GiB per node). The budget's
    defaults are what the pipelines are built with."""
    loaders = DaliLoaders()
    for local_rank in range(8):
        request = _gpu_request(local_rank)
        arguments = {training: loaders.pipeline_arguments(request, training) for training in (True, False)}
        memory = {training: loaders.memory(request, training) for training in (True, False)}
        assert [arguments[t]["num_threads"] for t in (True, False)] == [27, 2]
        assert all(arguments[t]["decoder_memory"] == memory[t].decoder for t in (True, False))  # built as counted
        assert all(arguments[t]["device_id"] == local_rank for t in (True, False))
        assert sum(m.device for m in memory.values()) <= 1024 * 2**20
        assert sum(m.pinned for m in memory.values()) <= 2048 * 2**20
        decoder = memory[True].decoder
        assert decoder.device_padding >= 16 * 2**20 and decoder.host_padding >= 16 * 2**20
        assert (decoder.width_hint, decoder.height_hint) == (5980, 6430)


def test_a_budget_too_small_for_the_threads_names_the_key_and_what_fits():
    with pytest.raises(ConfigError, match=r"data.loader.gpu_memory_mib=256 .*>= \d+ MiB for 29 decoder threads"):
        DaliLoaders(gpu_memory_mib=256).memory(_gpu_request(0), training=True)


def test_the_pipeline_decodes_on_the_gpu_the_strategy_placed_the_rank_on():
    """trainer.devices=[2,3]: local rank 0 drives cuda:2, and its DALI pipeline must too (not local rank 0's index)."""
    request = _gpu_request(0)
    placement = Placement(torch.device("cuda", 2), workers=4, precision="bf16-mixed")
    arguments = DaliLoaders().pipeline_arguments(
        BatchRequest(request.split, request.spec, 256, Shard(0, 2), placement), True
    )
    assert arguments["device_id"] == 2 and arguments["decoder_device"] == "mixed"
