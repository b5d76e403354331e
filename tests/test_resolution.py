"""Progressive resizing (data/resolution.py): FFCV's sizes per epoch, applied by every loader at epoch boundaries
without changing the order of the samples, and exact when a run resumes in mid-ramp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from data.ilsvrc import load_layout
from data.placement import BatchRequest, Placement, Shard
from data.resolution import ResolutionRamp
from data.spec import ConfigError
from tests.conftest import SMALL_RUN
from tests.loaders import NODES, small_spec
from train import train


def ffcv_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """libffcv/ffcv-imagenet train_imagenet.py, ImageNetTrainer.get_resolution, verbatim but for the names."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize(("epochs", "start", "end"), [(16, 11, 13), (24, 17, 20), (40, 29, 34), (88, 65, 76)])
def test_the_ramp_gives_ffcvs_size_in_every_epoch_of_its_configs(epochs: int, start: int, end: int):
    ramp = ResolutionRamp(start_size=160, end_size=192, start_epoch=start, end_epoch=end)
    assert ramp.sizes(epochs) == [ffcv_resolution(e, 160, 192, end, start) for e in range(epochs)]
    assert set(ramp.sizes(epochs)) <= {160, 192}  # 176, between them, rounds to one of the two


def test_the_ramp_rounds_to_its_multiple_and_a_bad_one_is_named(make_cfg):
    assert ResolutionRamp(128, 224, 0, 6).sizes(7) == [128, 128, 160, 192, 192, 192, 224]  # halves to even
    with pytest.raises(ConfigError, match="data.resolution.end_epoch"):
        ResolutionRamp(160, 192, 5, 4)
    cfg = make_cfg(*SMALL_RUN, "+data.resolution._target_=data.resolution.ResolutionRamp",
                   "+data.resolution.start_size=16", "+data.resolution.end_size=48",
                   "+data.resolution.start_epoch=0", "+data.resolution.end_epoch=2")  # fmt: skip
    with pytest.raises(InstantiationException, match=r"data.resolution.end_size=48 .* data.spec.image_size \(32\)"):
        instantiate(cfg.data)


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_every_loader_changes_size_at_epoch_boundaries_and_keeps_the_sample_order(small_demo_root: Path, kind: str):
    split = load_layout(small_demo_root).train
    ramp = ResolutionRamp(start_size=16, end_size=48, start_epoch=0, end_epoch=2, multiple=16)
    request = BatchRequest(split, small_spec(48, 54), 40, Shard(), Placement(workers=1))
    options = dict(pin_memory=False) if kind == "torchvision" else dict(device="cpu")
    epoch = [0]
    ramped = NODES[kind](**options).train(request, seed=3, resolution=ramp, current_epoch=lambda: epoch[0])
    fixed = NODES[kind](**options).train(request, seed=3, current_epoch=lambda: epoch[0])
    for epoch[0] in range(4):
        batches = {}
        for name, loader in (("ramped", ramped), ("fixed", fixed)):
            if kind == "torchvision":
                loader.sampler.set_epoch(epoch[0])  # as Lightning's fit loop does
            batches[name] = list(loader)
        size = ramp.size(epoch[0])
        assert {tuple(images.shape) for images, _ in batches["ramped"]} == {(40, 3, size, size)}
        assert len(batches["ramped"]) == len(batches["fixed"]) == 240 // 40
        for (_, ramped_labels), (_, fixed_labels) in zip(batches["ramped"], batches["fixed"]):
            assert ramped_labels.tolist() == fixed_labels.tolist()


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_a_run_resumed_in_mid_ramp_trains_that_epoch_at_its_own_size_on_the_same_samples(
    make_cfg, tmp_path: Path, kind: str
):
    """Sizes 16, 32, 48 in epochs 0, 1, 2 (6 batches each); interrupted after step 9, in epoch 1, and resumed: the
    resumed part trains the rest of epoch 1 at 32 px and epoch 2 at 48, on the uninterrupted run's samples."""
    ramp = ["_target_=data.resolution.ResolutionRamp", "start_size=16", "end_size=48", "start_epoch=0",
            "end_epoch=2", "multiple=16"]  # fmt: skip
    run = [
        *SMALL_RUN,
        f"data/loader={kind}",
        "data.spec.image_size=48",
        "data.spec.val_resize_size=54",
        "data.root.train_per_class=30",
        "trainer.max_epochs=3",
        *(f"+data.resolution.{entry}" for entry in ramp),
        "+callbacks.recorder._target_=tests.observers.SampleRecorder",
        "+callbacks.shapes._target_=tests.observers.BatchShapes",
    ]

    def record(name: str, *overrides: str) -> tuple[list, list]:
        folder = tmp_path / name
        train(make_cfg(*run, f"+callbacks.recorder.folder={folder}", f"+callbacks.shapes.folder={folder}", *overrides))
        return [json.loads((folder / f"rank0{suffix}.json").read_text()) for suffix in ("", "-shapes")]

    straight, straight_shapes = record("straight")
    sizes = (16, 32, 48)
    assert straight_shapes == [[epoch, [20, 3, size, size]] for epoch, size in enumerate(sizes) for _ in range(6)]
    (tmp_path / "run").rename(tmp_path / "straight-run")
    checkpoint = tmp_path / "preempted.ckpt"
    interrupt = ["+callbacks.interrupt._target_=tests.observers.InterruptAtStep", "+callbacks.interrupt.step=9",
                 f"+callbacks.interrupt.path={checkpoint}"]  # fmt: skip
    head, head_shapes = record("head", *interrupt)
    tail, tail_shapes = record("tail", f"ckpt_path={checkpoint}")
    assert head + tail == straight
    assert head_shapes + tail_shapes == straight_shapes
    assert tail_shapes[0] == [1, [20, 3, 32, 32]]
