"""Checkpoints and plain torchvision weights, both ways; no load ever unpickles code (``weights_only=True``).

python -m models.export outputs/train/<run>/checkpoints/last.ckpt resnet18_demo.pth   # + resnet18_demo.pth.json
# then anywhere: torchvision.models.resnet18(num_classes=N).load_state_dict(torch.load("resnet18_demo.pth"))
python -m models.export outputs/train/<run>/checkpoints/last.ckpt resnet18_ema.pth --weights ema
python train.py model.net.weights=resnet18_demo.pth ...   # train or evaluate from torchvision-format weights

Which weights: the network as trained (``net.*`` in the checkpoint) by default, ``--weights raw``; with
``--weights ema``, the exponential moving average that a run with ``model.ema`` keeps (``ema_net.*``, the same keys),
BN buffers included, so it is a whole network; asking for it from a run without one is an error. The card beside
the weights says which (``"weights": "raw"`` or ``"ema"``).

Which loader: the card's architecture decides. With ``blurpool: null`` the file is torchvision's state_dict of
``torchvision.models.<arch>``. A BlurPool network (models/blurpool.py) is not torchvision's: the file holds its
state_dict all the same, with keys that torchvision's strict load refuses (``layer2.0.conv2.conv.weight``,
``...blur_filter``) rather than weights it would load with another meaning, and the card holds what rebuilds it:
``models.zoo.build_net(**card["architecture"], num_classes=len(card["classes"]), weights=file)``. The export says
which, on stdout and in the card (``"load"``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import torch

from models.card import ModelCard

PREFIXES = {"raw": "net.", "ema": "ema_net."}  # the LightningModule's attributes: the network, its moving average


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds objects that only full unpickling, which can run code, would rebuild."""


def load_weights_only(path: str | os.PathLike) -> dict:
    """``torch.load`` restricted to tensors and plain containers: a file that would run code is refused, unrun."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing {path}: it holds objects other than tensors and plain data, which loading could execute "
            f"({str(error).splitlines()[0]})"
        ) from None


def network_state_dict(checkpoint: dict, weights: str = "raw") -> dict[str, torch.Tensor]:
    """The network's own state_dict out of a Lightning checkpoint of models.classifier.ImageClassifier: the weights
    as trained (``raw``) or their moving average (``ema``)."""
    if weights not in PREFIXES:
        raise ValueError(f"weights={weights!r}: choose raw or ema")
    states = {
        which: {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        for which, prefix in PREFIXES.items()
    }
    if not states["raw"]:
        raise ValueError("the checkpoint has no 'net.*' weights: not a checkpoint of models.classifier.ImageClassifier")
    if weights == "ema" and not states["ema"]:
        raise ValueError(
            "the checkpoint has no 'ema_net.*' weights: its run kept no moving average of the weights (model.ema); "
            "export the raw weights (--weights raw) or train with model.ema"
        )
    if weights == "ema" and states["ema"].keys() != states["raw"].keys():
        raise ValueError("the checkpoint's 'ema_net.*' keys are not its 'net.*' keys: not an EMA of this network")
    return states[weights]


def how_to_load(card: ModelCard, file: Path) -> str:
    """The line that loads ``file``: torchvision's own model, or, for a BlurPool network, this project's builder."""
    arch, blurpool, classes = card.architecture["arch"], card.architecture.get("blurpool"), len(card.classes)
    if blurpool is None:
        return f"torchvision.models.{arch}(num_classes={classes}).load_state_dict(torch.load({str(file)!r}))"
    options = ", ".join(f"{key}={value!r}" for key, value in card.architecture.items())
    return (
        f"NOT loadable by torchvision.models.{arch}: the network has BlurPool (blurpool={blurpool!r}), which "
        f"torchvision's lacks; rebuild it with this project: "
        f"models.zoo.build_net({options}, num_classes={classes}, weights={str(file)!r})"
    )


def export(checkpoint_path: str | os.PathLike, out: str | os.PathLike, weights: str = "raw") -> Path:
    """Writes the checkpoint's network (``weights``: raw or ema) as a plain state_dict (atomically: a temporary
    file, then a rename), and its model card beside it as ``<out>.json`` (classes, image spec, architecture, which
    weights, how to load them)."""
    out = Path(out)
    checkpoint = load_weights_only(checkpoint_path)
    state, card = network_state_dict(checkpoint, weights), ModelCard.of_checkpoint(checkpoint, checkpoint_path)
    temporary = out.with_name(f".{out.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, out)
    card.write_beside(out, weights=weights, load=how_to_load(card, out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint of this project")
    parser.add_argument("out", type=Path, help="where the network's state_dict goes (.pth)")
    parser.add_argument(
        "--weights", choices=tuple(PREFIXES), default="raw", help="as trained (raw) or their moving average (ema)"
    )
    args = parser.parse_args()
    try:
        out = export(args.checkpoint, args.out, args.weights)
    except ValueError as error:  # a checkpoint without the weights asked for: the message is the whole story
        parser.error(str(error))
    card = out.with_name(out.name + ".json")
    print(f"wrote {out} ({args.weights} weights) and its card {card}\n{json.loads(card.read_text())['load']}")


if __name__ == "__main__":
    main()
