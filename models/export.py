"""Checkpoints and plain torchvision weights, both ways; no load ever unpickles code (``weights_only=True``).

python -m models.export outputs/train/<run>/checkpoints/last.ckpt resnet18_demo.pth   # + resnet18_demo.pth.json
# then anywhere: torchvision.models.resnet18(num_classes=N).load_state_dict(torch.load("resnet18_demo.pth"))
python train.py model.net.weights=resnet18_demo.pth ...   # train or evaluate from torchvision-format weights
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch

from models.card import ModelCard

NET_PREFIX = "net."  # the LightningModule's attribute holding the torchvision model


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


def torchvision_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The torchvision model's own state_dict out of a Lightning checkpoint of models.classifier.ImageClassifier."""
    state = {k.removeprefix(NET_PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(NET_PREFIX)}
    if not state:
        raise ValueError("the checkpoint has no 'net.*' weights: not a checkpoint of models.classifier.ImageClassifier")
    return state


def export(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the checkpoint's network as a plain state_dict (atomically: a temporary file, then a rename), and its
    model card beside it as ``<out>.json`` (classes, image spec, architecture)."""
    out = Path(out)
    checkpoint = load_weights_only(checkpoint_path)
    state, card = torchvision_state_dict(checkpoint), ModelCard.of_checkpoint(checkpoint, checkpoint_path)
    temporary = out.with_name(f".{out.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, out)
    card.write_beside(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint of this project")
    parser.add_argument("out", type=Path, help="where the torchvision state_dict goes (.pth)")
    args = parser.parse_args()
    print(f"wrote {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    main()
