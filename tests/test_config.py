"""Every experiment and model composes and instantiates; overrides reach the objects; typos fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from hydra.utils import instantiate

from assemble import TrainingPlan, instantiate_all, training_module
from models.classifier import ImageClassifier
from models.zoo import ARCHITECTURES, build_net

from .conftest import PROJECT_ROOT, SMALL_RUN, build_module, run_train

EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("[!_]*.yaml"))  # _*: their parts
MODELS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "model").glob("[!_]*.yaml"))
CLASSES = [f"n{i:08d}" for i in range(1000)]  # a class index of 1000 wnids
ON_THIS_MACHINE = [] if torch.cuda.is_available() else ["trainer.accelerator=cpu"]


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_architecture_has_a_model_config():
    assert sorted(ARCHITECTURES) == MODELS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", "data.root=/datasets/ILSVRC2012", *ON_THIS_MACHINE)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg.model, CLASSES)
    trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.callbacks), logger=instantiate_all(cfg.logger))
    assert isinstance(module, ImageClassifier) and isinstance(trainer, pl.Trainer)
    assert datamodule.batch_size == cfg.data.batch_size
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_resnet50_recipe(make_cfg):
    cfg = make_cfg("experiment=resnet50", "data.root=x")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 80] and cfg.trainer.max_epochs == 90
    assert cfg.lr_reference_batch == 256


def test_resnet50_fast_recipe(make_cfg):
    cfg = make_cfg("experiment=resnet50_fast", "data.root=x")
    assert cfg.scheduler._target_ == "models.schedules.cosine" and cfg.scheduler.warmup_epochs > 0
    assert cfg.model.label_smoothing == 0.1 and cfg.model.no_weight_decay == "norm_and_bias"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.channels_last


# libffcv/ffcv-imagenet rn50_configs/ and rn18_configs/: epochs -> (start_ramp, end_ramp)
FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
# arch -> (lr, batch per GPU, GPUs, weight decay) of its configs
FFCV_OPTIMISATION = {"rn50": ("resnet50", 1.7, 512, 8, 1e-4), "rn18": ("resnet18", 0.5, 1024, 1, 5e-5)}


@pytest.mark.parametrize("net", sorted(FFCV_OPTIMISATION))
@pytest.mark.parametrize("epochs", sorted(FFCV_RAMPS))
def test_ffcv_configs_follow_theirs(make_cfg, net: str, epochs: int):
    """Every key of FFCV's config file, in this project's terms; its lr for its global batch is the per-256 rate
    scaled back to that batch."""
    cfg = make_cfg(f"experiment=ffcv_{net}_{epochs}", "data.root=x")
    arch, lr, batch, gpus, weight_decay = FFCV_OPTIMISATION[net]
    plan = TrainingPlan(cfg.optimizer.lr, cfg.lr_reference_batch, cfg.data.batch_size, gpus, 1, steps_per_epoch=1)
    assert (cfg.model.net.arch, plan.lr, cfg.data.batch_size) == (arch, pytest.approx(lr), batch)
    assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay, cfg.trainer.max_epochs) == (0.9, weight_decay, epochs)
    ramp = instantiate(cfg.data.resolution)
    assert (ramp.start_size, ramp.end_size, ramp.multiple) == (160, 192, 32)
    assert (ramp.start_epoch, ramp.end_epoch) == FFCV_RAMPS[epochs]
    spec = instantiate(cfg.data.spec)
    assert (spec.image_size, spec.val_image_size, spec.val_resize_size) == (192, 256, 292)
    assert cfg.scheduler._target_ == "models.schedules.linear_ramp" and cfg.scheduler.peak_epoch == 2
    assert (cfg.scheduler.initial_fraction, cfg.scheduler.final_fraction) == (1e-4, 0.0)
    assert cfg.model.label_smoothing == 0.1 and cfg.model.net.blurpool == "ffcv"
    assert cfg.model.no_weight_decay == "ffcv_bn_names" and cfg.model.test_time_flip


def test_torchvision_v2_recipe(make_cfg):
    cfg = make_cfg("experiment=tv_resnet50_v2", "data.root=x")
    plan = TrainingPlan(cfg.optimizer.lr, cfg.lr_reference_batch, cfg.data.batch_size, 8, 1, steps_per_epoch=1)
    assert (plan.lr, cfg.optimizer.weight_decay, cfg.trainer.max_epochs) == (0.5, 2e-5, 600)
    spec = instantiate(cfg.data.spec)
    assert (spec.image_size, spec.val_image_size, spec.val_resize_size) == (176, 224, 232)
    assert (spec.auto_augment, spec.random_erasing) == ("trivial_augment_wide", 0.1)
    assert (cfg.model.mixing.mixup_alpha, cfg.model.mixing.cutmix_alpha, cfg.model.label_smoothing) == (0.2, 1.0, 0.1)
    assert cfg.model.no_weight_decay == "norm" and cfg.model.ema.every_n_steps == 32
    assert cfg.model.ema.decay == pytest.approx(1 - (1 - 0.99998) * 8 * 128 * 32 / 600, abs=1e-6)
    assert cfg.data.loader.repeated_augmentations == 4 and cfg.scheduler.warmup_epochs == 5


GPU_TRAINERS = ("gpu", "ddp", "slurm")


def fast_path(cfg) -> str:
    """A README cell: what a composed config runs with on a GPU."""
    precision, benchmark = cfg.trainer.precision, "on" if cfg.trainer.benchmark else "off"
    layout = "channels_last" if cfg.model.channels_last else "NCHW"
    return f"{cfg.trainer.accelerator}, {precision}, cudnn benchmark {benchmark}, {layout}, fused {cfg.optimizer.fused}"


@pytest.mark.parametrize("experiment", [name for name in EXPERIMENTS if not name.startswith("demo")])
def test_gpu_experiments_keep_the_fast_path_with_every_trainer(make_cfg, experiment):
    """The experiment owns the fast path: trainer=ddp or trainer=slurm no longer drops it to fp32 without a word;
    README's table shows what each combination composes to."""
    cells = [fast_path(make_cfg(f"experiment={experiment}", f"trainer={name}", "data.root=x")) for name in GPU_TRAINERS]
    assert cells == ["gpu, bf16-mixed, cudnn benchmark on, channels_last, fused True"] * len(GPU_TRAINERS)
    assert f"| `{experiment}` | {' | '.join(cells)} |" in (PROJECT_ROOT / "README.md").read_text()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_matches_torchvision(make_cfg, arch):
    cfg = make_cfg(f"model={arch}")
    module = build_module(cfg.model, CLASSES)
    reference = torchvision.models.get_model(arch, num_classes=1000)
    assert type(module.net) is type(reference)
    assert n_parameters(module.net) == n_parameters(reference)


@pytest.mark.parametrize("arch, expected", [("alexnet", 61_100_840), ("vgg16", 138_357_544), ("resnet50", 25_557_032)])
def test_published_parameter_counts(arch, expected):
    assert n_parameters(build_net(arch, num_classes=1000)) == expected


def test_classes_come_from_the_data(make_cfg, small_demo_root):
    cfg = make_cfg("model=resnet18", f"data.root={small_demo_root}")
    datamodule = instantiate(cfg.data)
    module = training_module(cfg, datamodule, instantiate(cfg.trainer))
    assert module.net.fc.out_features == 4 and list(module.card.classes) == sorted(
        p.name for p in (small_demo_root / "train").iterdir()
    )
    assert module.card.image_spec == datamodule.spec and module.card.image_spec.image_size == 64  # the demo's
    assert module.card.architecture == {"arch": "resnet18", "zero_init_residual": False, "blurpool": None}


def test_zero_init_residual_and_channels_last(make_cfg):
    cfg = make_cfg("model=resnet50", "model.net.zero_init_residual=true", "model.channels_last=true")
    module = build_module(cfg.model, CLASSES[:10])
    assert all(torch.all(block.bn3.weight == 0) for block in module.net.modules() if hasattr(block, "bn3"))
    assert module.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="ResNets only"):
        build_net("vgg16", 10, zero_init_residual=True)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown model architecture 'resnet51'"):
        build_net("resnet51", 10)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=resnet51", "Could not find 'model/resnet51'"),
        ("trainer.max_epoch=3", "Key 'max_epoch' is not in struct"),
        ("optimizer.learning_rate=0.1", "Key 'learning_rate' is not in struct"),
        ("experiment=resnet5O", "Could not find 'experiment/resnet5O'"),
    ],
)
def test_bad_override_fails_before_training(tmp_path: Path, override, message):
    result = run_train(override, cache_dir=tmp_path / "cache", run_dir=tmp_path / "run", timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "cache").exists(), "nothing may run before the config is valid"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0 is not allowed: a whole number of images per device, >= 1"),
        ("data.batch_size=-4", "data.batch_size=-4 is not allowed"),
        ("data.batch_size=5000", "data.batch_size=5000 is not allowed: at most 240: each of the 1 rank(s) gets 240"),
        ("data.spec.train_crop_scale=[0.9,0.1]", "data.spec.train_crop_scale=[0.9, 0.1] is not allowed: [low, high]"),
        ("data.spec.val_resize_size=16", "data.spec.val_resize_size=16 is not allowed: a whole number >= data.spec"),
        ("data.spec.orientation=upright", "data.spec.orientation='upright' is not allowed: stored or exif"),
        ("data.val_crops=5", "data.val_crops=5 is not allowed: 1 or 10"),
        (
            "data.backend=dali",
            "data.backend='dali' is not allowed: null (removed): choose the loader with data/loader=dali",
        ),
        ("data.loader.device=gpu", None),  # the torchvision loader has no such key: Hydra names it
    ],
)
def test_bad_data_value_stops_before_training_naming_key_value_and_what_is_allowed(
    tmp_path: Path, cache_dir: Path, override: str, message: str | None
):
    """Values a new user tries: each stops the run before a step is trained, with the key, the value and what is
    allowed (a batch larger than a rank's share of the train set included: it would leave every epoch empty)."""
    result = run_train(*SMALL_RUN, override, cache_dir=cache_dir, run_dir=tmp_path / "run", timeout=300)
    assert result.returncode != 0
    assert (message or "Key 'device' is not in struct") in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
