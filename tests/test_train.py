"""Real training on the demo dataset: it learns, it resumes exactly, and it runs as 2-process DDP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from models.card import CARD
from train import train

from .conftest import LEARN, SMALL_RUN, build_module, run_train


def _epoch_rows(run_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss_epoch")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_short_training_learns(make_cfg, tmp_path: Path, backend: str):
    """Learning is the outcome that shows images, labels and augmentation line up, through either loader."""
    metrics = train(make_cfg(*LEARN, f"data/loader={backend}"))
    epochs = _epoch_rows(tmp_path / "run")
    assert len(epochs) == 8
    assert float(epochs[-1]["train/loss_epoch"]) < 0.8 * float(epochs[0]["train/loss_epoch"])
    assert metrics["val/acc1"] >= 0.45, f"chance is 0.25 on 4 classes; got {metrics}"
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 4  # top-3 by val top-1, plus last


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)])
def test_resume_equals_uninterrupted(make_cfg, tmp_path: Path, precision: str):
    """2 epochs straight == interrupted after 1, then resumed: same step, epoch, weights, optimizer, schedule."""
    base = [*SMALL_RUN, f"trainer.precision={precision}", "data.root.train_per_class=10", "trainer.max_epochs=2"]
    straight = train(make_cfg(*base))
    reference = _final_state(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "straight")

    interrupt = ["+callbacks.interrupt._target_=tests.observers.StopAfterEpochs", "+callbacks.interrupt.epochs=1"]
    train(make_cfg(*base, *interrupt))
    assert _final_state(tmp_path / "run")["epoch"] == 0
    resumed = train(make_cfg(*base, "ckpt_path=last"))
    state = _final_state(tmp_path / "run")
    assert len(_epoch_rows(tmp_path / "run", version=0)) == 1  # the first part's log is kept beside the new one
    assert len(_epoch_rows(tmp_path / "run", version=1)) == 1

    assert (state["epoch"], state["global_step"]) == (reference["epoch"], reference["global_step"]) == (1, 4)
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(state["state_dict"][name], tensor), name
    assert state["optimizer_states"][0]["state"].keys() == reference["optimizer_states"][0]["state"].keys()
    for key, value in reference["optimizer_states"][0]["state"].items():
        assert torch.equal(state["optimizer_states"][0]["state"][key]["momentum_buffer"], value["momentum_buffer"])
    assert state["lr_schedulers"] == reference["lr_schedulers"]
    assert resumed == straight


def test_resuming_on_a_dataset_of_other_classes_is_refused(make_cfg):
    """The checkpoint's class index (wnid per output) must be the data's: another would relabel every class."""
    cfg = make_cfg(*SMALL_RUN)
    module = build_module(cfg.model, instantiate(cfg.data).classes)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # its own classes
    own = checkpoint[CARD]["classes"]
    with pytest.raises(ValueError, match="trained on other classes than the data holds"):
        module.on_load_checkpoint({CARD: {"classes": own[1:] + own[:1]}})  # the same classes in another order


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path: Path):
    run_dir, observer = tmp_path / "run", tmp_path / "ranks"
    result = run_train(
        *SMALL_RUN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "data.root.val_per_class=13",  # 52 val images: 26 per rank, 2 batches of 20 and 6
        "+callbacks.rank_metrics._target_=tests.observers.RankMetrics",
        f"+callbacks.rank_metrics.folder={observer}",
        "+callbacks.broadcasts._target_=tests.observers.BroadcastCounter",
        f"+callbacks.broadcasts.folder={observer}",
        cache_dir=tmp_path / "cache",
        run_dir=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((observer / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in (0, 1):  # Lightning's SIGTERM flag, broadcast and read back before every step, is skipped
        assert json.loads((observer / f"rank{rank}-broadcasts.json").read_text()) == {"calls": 0, "steps": 12}
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 240 train images / 2 ranks / batch 20 = 6 steps per epoch on each rank
    assert [r["global_step"] for r in ranks] == [12, 12]
    # per rank, not synced: the last step's loss and the progress bar's img/s (each rank's own clock)
    synced = [name for name in ranks[0]["metrics"] if name not in ("train/loss", "img/s")]
    assert {name: ranks[0]["metrics"][name] for name in synced} == {name: ranks[1]["metrics"][name] for name in synced}
    assert {"val/acc1", "val/acc5", "val/loss", "train/acc1"} <= ranks[0]["metrics"].keys()
    assert "Learning rate 0.015625 = 0.1 x global batch 40 / 256 (20 per device x 2 devices" in result.stderr
    assert len(_epoch_rows(run_dir)) == 2  # rank zero alone writes the log


@pytest.mark.gpu
def test_fp16_mixed_resumes_its_loss_scaler(make_cfg, tmp_path: Path):
    """The GradScaler's scale travels in the checkpoint and is restored: a resumed run starts with the saved scale
    (set to 2^10 in the file, unlike a fresh scaler's 2^16). Unverified until a GPU is lent: it skips on CPUs."""
    from tests.observers import LossScaleAtStart

    run = [*SMALL_RUN, "trainer=gpu", "trainer.precision=16-mixed", "trainer.max_epochs=1"]
    train(make_cfg(*run))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = _final_state(tmp_path / "run")
    assert state["MixedPrecision"]["scale"] > 0
    state["MixedPrecision"]["scale"] = 2.0**10
    torch.save(state, last)
    observe = ["+callbacks.scale._target_=tests.observers.LossScaleAtStart"]
    train(make_cfg(*run, *observe, "trainer.max_epochs=2", "ckpt_path=last"))
    assert LossScaleAtStart.last == 2.0**10
    assert _final_state(tmp_path / "run")["global_step"] == 2 * state["global_step"]


def test_missing_data_root_is_named_from_the_command_line(tmp_path: Path):
    result = run_train("data=imagenet", "data.root=/no/such/ILSVRC2012", cache_dir=tmp_path, run_dir=tmp_path / "run")
    assert result.returncode != 0
    assert "data root /no/such/ILSVRC2012 does not exist or is not a directory" in result.stderr


@pytest.mark.slow
def test_the_fast_recipe_switches_still_learn(make_cfg, tmp_path: Path):
    """experiment=demo_fast, shrunk: progressive resizing, BlurPool, label smoothing, the linear ramp, no decay on
    batch norm, test-time flip, EMA, MixUp/CutMix and TrivialAugment in DALI, all at once, still learn 4 classes
    (chance: 0.25), and the EMA is validated beside the raw weights."""
    small = [override.replace("experiment=demo", "experiment=demo_fast") for override in LEARN]
    metrics = train(
        make_cfg(
            *small,
            "data/loader=dali",
            "data.spec.val_image_size=56",
            "data.spec.val_resize_size=64",
            "data.resolution.start_size=32",
            "data.resolution.start_epoch=2",
            "data.resolution.end_epoch=5",
            "model.ema.decay=0.9",
            "scheduler.peak_epoch=1",
            "trainer.max_epochs=12",
        )
    )
    assert metrics["val/acc1"] >= 0.45, f"chance is 0.25 on 4 classes; got {metrics}"
    assert metrics["val_ema/acc1"] > 0.3 and "val_ema/loss" in metrics
    assert len(_epoch_rows(tmp_path / "run")) == 12
