"""How far the GPU pipeline's val resize (DALI ``fn.resize``, whose kernels are the same on the CPU and the GPU) is
from the torchvision resize that evaluation and the CPU pipelines use, measured on the CPU.

    python -m benchmarks.resize_parity [FOLDER] [--resize 256] [--checkpoint CKPT] [--json F]

For each candidate setting of ``fn.resize``: over the JPEGs of FOLDER (default: the 1000 ILSVRC samples in
../shared), how often the resized size equals torchvision's, and where it does, the pixel error of the resized
image against torchvision's (mean and max absolute difference in grey levels, PSNR). With ``--checkpoint``, the
top-1 agreement of that model's predictions on FOLDER's images made each way (resize, then the centre crop, as its
model card's spec says), a secondary figure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from torchvision.transforms.v2.functional import center_crop, resize

from data.dali import dali_resize, torchvision_sized
from data.spec import ImageSpec
from data.torchvision_backend import decode
from models.card import ModelCard
from models.export import load_weights_only
from models.zoo import build_net

PROJECT_ROOT = Path(__file__).resolve().parents[1]

GPU_PIPELINE = "torchvision's size, linear (the GPU pipeline's)"
# name -> the resized image, given the decoded image, the target shorter side and the sample's encoded bytes
CANDIDATES: dict[str, Callable] = {
    "resize_shorter (DALI's default rounding), linear": lambda image, s, jpeg: fn.resize(
        image, antialias=True, resize_shorter=s
    ),
    "resize_shorter, linear, subpixel_scale=False": lambda image, s, jpeg: fn.resize(
        image, antialias=True, resize_shorter=s, subpixel_scale=False
    ),
    GPU_PIPELINE: lambda image, s, jpeg: dali_resize(image, jpeg, [s], "stored"),
    "torchvision's size, triangular": lambda image, s, jpeg: fn.resize(
        image, antialias=True, size=torchvision_sized(jpeg, s, "stored"), interp_type=types.INTERP_TRIANGULAR
    ),
    "torchvision's size, cubic": lambda image, s, jpeg: fn.resize(
        image, antialias=True, size=torchvision_sized(jpeg, s, "stored"), interp_type=types.INTERP_CUBIC
    ),
}


def dali_resized(paths: list[str], shorter: int, candidate: Callable) -> list[np.ndarray]:
    """The JPEGs decoded by DALI's CPU decoder (the same pixels as torchvision's) and resized by a candidate's
    fn.resize, as HWC uint8."""

    @pipeline_def(batch_size=1, num_threads=2, device_id=None)
    def one_at_a_time():
        jpeg, _ = fn.readers.file(files=paths, labels=list(range(len(paths))))
        image = fn.decoders.image(jpeg, device="cpu", output_type=types.RGB, adjust_orientation=False)
        return candidate(image, shorter, jpeg)

    pipe = one_at_a_time()
    pipe.build()
    return [np.asarray(pipe.run()[0].as_tensor())[0] for _ in paths]


def pixel_error(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict[str, float]:
    same = [(a, b) for a, b in zip(ours, theirs) if a.shape == b.shape]
    diffs = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in same])
    mse = float(np.mean(diffs.astype(np.float64) ** 2))
    return {
        "same_size": len(same) / len(ours),
        "mean_abs": float(diffs.mean()),
        "max_abs": int(diffs.max()),
        "psnr_db": 10 * math.log10(255**2 / mse) if mse else math.inf,
    }


def top1_agreement(checkpoint: Path, images: list[torch.Tensor], variants: dict[str, list[np.ndarray]]) -> dict:
    """Share of images whose top-1 class is the same when the resize is DALI's (each candidate) as when it is
    torchvision's; the centre crop and normalisation as the checkpoint's card says."""
    state = load_weights_only(checkpoint)
    card = ModelCard.of_checkpoint(state, checkpoint)
    net = build_net(num_classes=len(card.classes), **card.architecture)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")})
    net.eval()
    spec = card.image_spec
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))

    def top1(resized: list[torch.Tensor]) -> torch.Tensor:
        crops = torch.stack([center_crop(image, [spec.image_size] * 2) for image in resized]).float()
        with torch.no_grad():
            return torch.cat([net((batch - mean) / std).argmax(-1) for batch in crops.split(64)])

    reference = top1([resize(image, [spec.val_resize_size], antialias=True) for image in images])
    return {
        name: float((top1([torch.from_numpy(r).permute(2, 0, 1) for r in resized]) == reference).float().mean())
        for name, resized in variants.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=PROJECT_ROOT.parent / "shared/data/imagenet-samples")
    parser.add_argument("--resize", type=int, default=256, help="the val resize (shorter side)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint of this project, for the top-1 agreement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = sorted(str(p) for p in args.folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if not paths:
        raise SystemExit(f"no JPEG files in {args.folder}")
    images = [decode(path, ImageSpec()) for path in paths]
    theirs = [resize(image, [args.resize], antialias=True).permute(1, 2, 0).numpy() for image in images]
    report: dict = {"images": len(paths), "folder": str(args.folder), "resize": args.resize, "pixel_error": {}}
    for name, candidate in CANDIDATES.items():
        report["pixel_error"][name] = pixel_error(dali_resized(paths, args.resize, candidate), theirs)
    print(f"{len(paths)} JPEGs from {args.folder}, shorter side to {args.resize}; DALI fn.resize against torchvision")
    print(f"{'fn.resize setting':<64}{'same size':>10}{'mean |d|':>10}{'max |d|':>9}{'PSNR dB':>9}")
    for name, e in report["pixel_error"].items():
        print(f"{name:<64}{e['same_size']:10.3f}{e['mean_abs']:10.3f}{e['max_abs']:9d}{e['psnr_db']:9.1f}")
    if args.checkpoint:
        spec = ModelCard.of_checkpoint(load_weights_only(args.checkpoint), args.checkpoint).image_spec
        small = {name: dali_resized(paths, spec.val_resize_size, candidate) for name, candidate in CANDIDATES.items()}
        report["top1_agreement"] = top1_agreement(args.checkpoint, images, small)
        print(f"\ntop-1 agreement with torchvision's resize, {args.checkpoint} (its spec: {spec.val_resize_size} px):")
        for name, share in report["top1_agreement"].items():
            print(f"{name:<64}{share:10.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
