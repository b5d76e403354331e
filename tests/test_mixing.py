"""MixUp and CutMix of the device batch (models/mixing.py): soft labels of two classes' shares that match the mixed
pixels, draws that depend on the batch's key only, and no host-device sync in a training step that mixes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from models.card import ModelCard
from models.classifier import ImageClassifier
from models.mixing import batch_mixing
from tests.host_sync import HostSyncProbe

CLASSES, BATCH, SIZE = 10, 6, 16


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is uniformly i (so every pixel says which image it came from), labelled i."""
    images = torch.arange(BATCH, dtype=torch.float32).view(BATCH, 1, 1, 1).expand(BATCH, 3, SIZE, SIZE).clone()
    return images, torch.arange(BATCH)


def _check_two_shares(labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row sums to 1 and holds its image's class and its predecessor's (the batch rolled by one); returns the
    image's own share per row."""
    assert targets.shape == (BATCH, CLASSES)
    torch.testing.assert_close(targets.sum(-1), torch.ones(BATCH))
    own, other = targets[torch.arange(BATCH), labels], targets[torch.arange(BATCH), labels.roll(1)]
    torch.testing.assert_close(own + other, torch.ones(BATCH))
    assert ((targets > 0).sum(-1) <= 2).all()
    return own


def test_mixup_labels_hold_the_two_images_shares_of_the_pixels():
    mix = batch_mixing(CLASSES, mixup_alpha=0.4)
    images, labels = _batch()
    mixed, targets = mix(images, labels, key=(0, 0, 0))
    own = _check_two_shares(labels, targets)
    assert ((own > 0) & (own < 1)).all()
    expected = own.view(BATCH, 1, 1, 1) * images + (1 - own.view(BATCH, 1, 1, 1)) * images.roll(1, 0)
    torch.testing.assert_close(mixed, expected)


@pytest.mark.parametrize("step", range(4))
def test_cutmix_pastes_a_box_whose_area_fraction_is_the_pasted_images_share(step: int):
    mix = batch_mixing(CLASSES, cutmix_alpha=1.0)
    images, labels = _batch()
    mixed, targets = mix(images, labels, key=(0, step, 0))
    own = _check_two_shares(labels, targets)
    pasted = (mixed == images.roll(1, 0)).all(1).flatten(1).float().mean(-1)  # the predecessor's pixels
    torch.testing.assert_close(pasted, 1 - own)
    assert ((mixed == images) | (mixed == images.roll(1, 0))).all()  # a box cut and pasted, nothing blended


def test_both_on_picks_one_per_batch_and_the_draws_depend_on_the_key_alone():
    mix = batch_mixing(CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, seed=7)
    images, labels = _batch()
    kinds = set()
    for step in range(12):
        state = torch.get_rng_state()
        mixed, targets = mix(images, labels, key=(0, step, 0))
        assert torch.equal(torch.get_rng_state(), state)  # the process's random stream is left as it was
        again, _ = mix(images, labels, key=(0, step, 0))
        assert torch.equal(again, mixed)
        kinds.add("cutmix" if ((mixed == images) | (mixed == images.roll(1, 0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}
    first, _ = mix(images, labels, key=(0, 0, 0))
    assert not torch.equal(first, mix(images, labels, key=(1, 0, 0))[0])  # another rank, another draw


def test_no_alpha_means_no_mixing():
    assert batch_mixing(CLASSES) is None


def _small_net(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 4 * 4, num_classes))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a training step called outside a Trainer
def test_a_mixing_training_step_reads_no_device_value():
    """The step under the project's probe: parameters, buffers and the batch are device values; MixUp's and
    CutMix's draws are host values, and so is the choice between them."""
    mixing = partial(batch_mixing, mixup_alpha=0.2, cutmix_alpha=1.0)
    card = ModelCard(tuple(f"c{i}" for i in range(CLASSES)))
    module = ImageClassifier(_small_net, card, partial(torch.optim.SGD, lr=0.1), mixing=mixing)
    images, labels = _batch()
    with HostSyncProbe() as probe:
        probe.device_values([*module.parameters(), *module.buffers(), images, labels])
        probe.label = "step"
        for batch_idx in range(4):
            module.training_step((images, labels), batch_idx).backward()
    assert probe.syncs == []
