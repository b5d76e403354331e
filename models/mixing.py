"""MixUp and CutMix of a training batch on the device, with torchvision's batch transforms (``transforms.v2``).

No host-device sync (read in torchvision 0.29's ``transforms/v2/_augment.py``): ``MixUp`` and ``CutMix`` draw their
Beta weight from a distribution made of CPU tensors and read it with ``float()`` on the host; CutMix draws the box's
centre with ``torch.randint`` on the CPU and cuts with Python ints; ``RandomChoice`` picks with ``torch.multinomial``
on a CPU tensor; the labels become one-hot with ``one_hot(labels, num_classes)``, which on CUDA leaves the range
check to the scatter's device asserts (ATen's ``one_hot`` reads ``max()`` on the host only without ``num_classes``
or off CUDA). The images and labels are only rolled, scaled, added and sliced.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class BatchMixing:
    """Each batch mixed with the next one in it (its roll by one), by MixUp or CutMix: one of the two at random per
    batch where both are on (torchvision's reference recipe). Returns the images and soft labels, rows of two classes'
    shares summing to 1 (CutMix: the pasted box's share is its area fraction).

    The draws are a function of ``seed`` and the ``key`` of the batch (rank, optimizer step, batch index), not of the
    global random state: a resumed run mixes its batches as the uninterrupted run did, and ranks mix differently.
    """

    def __init__(self, transform: v2.Transform, seed: int) -> None:
        self.transform, self.seed = transform, seed

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, key: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # the CPU generator's state is restored after the draws
            torch.default_generator.manual_seed(hash((self.seed, *key)) & 0x7FFF_FFFF)
            return self.transform(images, labels)


def batch_mixing(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, seed: int = 0
) -> BatchMixing | None:
    """``model.mixing``'s target: MixUp where ``mixup_alpha`` > 0, CutMix where ``cutmix_alpha`` > 0 (each image's
    own share a Beta(alpha, alpha) draw), one of the two per batch where both are; None where neither is."""
    transforms = [
        transform(alpha=alpha, num_classes=num_classes)
        for transform, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    if not transforms:
        return None
    return BatchMixing(transforms[0] if len(transforms) == 1 else v2.RandomChoice(transforms), seed)
