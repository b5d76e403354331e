"""The model card: what a checkpoint (key ``model_card``) and exported weights (``<file>.json`` beside them) say about
the model, so that evaluation and prediction need only the file and the images: the class index (output ``i`` is
the wnid ``classes[i]``), the image spec its images were made with, and the architecture with its options.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from data.spec import ImageSpec

log = logging.getLogger(__name__)

CARD = "model_card"
ARCHITECTURE_KEYS = ("arch", "zero_init_residual", "blurpool")  # models.zoo.build_net's arguments shaping the net


@dataclass(frozen=True)
class ModelCard:
    classes: tuple[str, ...]
    image_spec: ImageSpec = field(default_factory=ImageSpec)
    architecture: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "image_spec": self.image_spec.to_dict(),
            "architecture": dict(self.architecture),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        """A card written before BlurPool existed has no ``blurpool``: its network had none."""
        architecture = dict(values["architecture"])
        architecture.setdefault("blurpool", None)
        return cls(tuple(values["classes"]), ImageSpec.from_dict(values["image_spec"]), architecture)

    @classmethod
    def of_checkpoint(cls, checkpoint: dict, path: str | os.PathLike) -> ModelCard:
        if CARD not in checkpoint:
            raise ValueError(f"{path} holds no {CARD!r} (written by an older version of this project): re-save it")
        return cls.from_dict(checkpoint[CARD])

    def evaluated_classes(self, classes: Sequence[str], restrict: bool, where: str) -> tuple[str, ...]:
        """``classes`` (of a dataset, or a set) where the model can be evaluated on them: its own classes, or with
        ``restrict`` (``restrict_outputs`` of eval.py and predict.py) a subset of them; else an error naming the way."""
        classes = tuple(classes)
        if classes == self.classes:
            return classes
        unknown = [wnid for wnid in classes if wnid not in self.classes]
        if unknown:
            raise ValueError(
                f"{where} holds {len(unknown)} classes the model was not trained on ({', '.join(unknown[:5])}"
                f"{' ...' * (len(unknown) > 5)}): evaluate it on the classes of its model card (data.classes=null)"
            )
        if not restrict:
            raise ValueError(
                f"{where}: {len(classes)} of the model's {len(self.classes)} classes, which it was not trained to tell "
                "apart alone: restrict_outputs=true evaluates it on these, its outputs restricted to them"
            )
        log.info(
            "Outputs restricted to %d of the model's %d classes (restrict_outputs): %s",
            len(classes),
            len(self.classes),
            where,
        )
        return classes

    def write_beside(self, file: Path, **notes: str) -> Path:
        """``<file>.json``: the card of exported weights, with ``notes`` on them (models.export: which weights, and
        how to load them)."""
        path = file.with_name(file.name + ".json")
        path.write_text(json.dumps({**self.to_dict(), **notes}, indent=1))
        return path


def architecture_of(net: DictConfig) -> dict[str, Any]:
    """The card's architecture from the ``model.net`` config."""
    return {key: net[key] for key in ARCHITECTURE_KEYS if key in net}


def configured_by_card(cfg: DictConfig, card: ModelCard, typed: Iterable[str] | None = None) -> DictConfig:
    """``cfg`` with the architecture and the image spec of the card, as the model was trained, except for the keys
    typed on the command line (``typed``; default: this run's Hydra overrides), each logged where it differs."""
    if typed is None:
        typed = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # a copy, interpolations kept
    keys = {override.split("=", 1)[0].lstrip("+~") for override in typed}
    trained = {
        **{f"model.net.{key}": value for key, value in card.architecture.items()},
        **{f"data.spec.{key}": value for key, value in card.image_spec.to_dict().items()},
    }
    for key, value in trained.items():
        if key in keys or (key == "model.net.arch" and "model" in keys):
            given = OmegaConf.select(cfg, key)
            if given != value:
                log.warning("%s=%s as given, not %s as the model was trained", key, given, value)
            continue
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg
