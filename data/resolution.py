"""Progressive resizing: the train crop's size per epoch (FFCV's ``get_resolution``, libffcv/ffcv-imagenet
train_imagenet.py), applied by every loader at epoch boundaries; validation keeps its own size (``data.spec``).

Low-resolution epochs cost about (r / 224)^2 of a full one; ending at the full size removes the train-test
resolution discrepancy (Touvron et al. 2019) before the last epochs. A size is a function of the epoch alone, so a
run resumed in mid-epoch trains the rest of that epoch at that epoch's size.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.spec import ConfigError


def _whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class ResolutionRamp:
    """``start_size`` up to epoch ``start_epoch``, ``end_size`` from epoch ``end_epoch`` on (epochs count from 0, as
    Lightning's and FFCV's do), and in between the linear interpolation rounded to the nearest multiple of
    ``multiple`` (halves to even, as FFCV's ``np.round``). ``end_size`` is ``data.spec.image_size``: the size
    the run ends at and its model card records."""

    start_size: int
    end_size: int
    start_epoch: int
    end_epoch: int
    multiple: int = 32

    def __post_init__(self) -> None:
        for key in ("start_size", "end_size", "multiple"):
            if not _whole(getattr(self, key), 1):
                raise ConfigError(f"data.resolution.{key}", getattr(self, key), "a whole number of pixels >= 1")
        if not _whole(self.start_epoch, 0):
            raise ConfigError("data.resolution.start_epoch", self.start_epoch, "an epoch >= 0 (epochs count from 0)")
        if not (_whole(self.end_epoch, 0) and self.end_epoch >= self.start_epoch):
            raise ConfigError(
                "data.resolution.end_epoch", self.end_epoch, f"an epoch >= start_epoch ({self.start_epoch})"
            )

    def size(self, epoch: int) -> int:
        """The train crop's side in ``epoch``."""
        if epoch <= self.start_epoch:
            return self.start_size
        if epoch >= self.end_epoch:
            return self.end_size
        progress = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return round((self.start_size + progress * (self.end_size - self.start_size)) / self.multiple) * self.multiple

    def sizes(self, epochs: int) -> list[int]:
        """The size of each of the first ``epochs`` epochs."""
        return [self.size(epoch) for epoch in range(epochs)]


@dataclass(frozen=True)
class FixedResolution:
    """Every epoch at ``data.spec.image_size`` (no progressive resizing)."""

    end_size: int

    def size(self, epoch: int) -> int:
        return self.end_size


TrainResolution = ResolutionRamp | FixedResolution
