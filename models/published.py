"""The record beside the result: the published top-1/top-5 errors of each architecture, with the split and the
protocol each was measured under, so that a run's errors are read against the papers and torchvision's weights rather
than against a remembered number.

The papers' figures are typed in below from their tables (each checked against the table's text, see
``PAPER_FIGURES``); torchvision's are read from the installed package's weights, so they follow its version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torchvision
from torchvision.models import get_model_weights

ILSVRC_2012_VAL = "ILSVRC-2012 val"


@dataclass(frozen=True)
class PublishedFigure:
    """Errors in percent; ``None`` where the source gives none (e.g. top-1 on the test server)."""

    arch: str
    top1_error: float | None
    top5_error: float | None
    source: str
    split: str
    protocol: str
    note: str | None = None


_ALEXNET = "Krizhevsky, Sutskever & Hinton 2012, ImageNet Classification with Deep CNNs, NeurIPS"
_VGG = "Simonyan & Zisserman 2015, Very Deep Convolutional Networks, ICLR"
_RESNET = "He, Zhang, Ren & Sun 2016, Deep Residual Learning, CVPR"
_VAL, _TEST_2010, _TEST_2012 = ILSVRC_2012_VAL, "ILSVRC-2010 test", "ILSVRC-2012 test"

_TEN_PATCHES = "single CNN, 10 patches"
_FIVE_CNNS = "ensemble of 5 CNNs"
_SEVEN_CNNS = "ensemble of 7 CNNs, 2 pre-trained on ImageNet Fall 2011"
_TWO_GPU = (
    "the 2012 paper's net is split over two GPUs; torchvision's alexnet is the one-tower variant of Krizhevsky 2014, "
    "'One weird trick' (arXiv:1404.5997)"
)
_FALL_2011 = "an extra sixth conv layer, pre-trained on all of ImageNet Fall 2011 (15M images, 22K classes)"

_VGG_FIXED = "single model, dense, train scale S=256, test scale Q=256"
_VGG_JITTERED = "single model, dense, train scale S in [256;512], test scale Q=384"
_VGG_BEST = "single model, multi-crop & dense, train scale S in [256;512], test scales Q in {256,384,512}"

_TEN_CROPS = "single model, 10 crops"
_MULTI_SCALE = "single model, fully-convolutional, scores averaged over shorter sides 224-640"
_OPTION_A = "option A shortcuts (zero-padding); torchvision's ResNets project (option B)"

# Each figure checked against the table's text (rows and caption) in public transcriptions of the paper:
# - Krizhevsky 2012, Table 1 (and its footnote: averaged over 10 patches; 39.0 / 18.3 without) and Table 2: English
#   full-text transcriptions of the paper (one with a Chinese translation) quoting both tables with their captions;
#   Table 1 also in the abstract, https://papers.nips.cc/paper/2012/hash/c399862d3b9d6b76c8436e924a68c45b-Abstract.html
# - Simonyan 2015, Tables 3 and 5 with their captions: English full-text transcriptions and a PDF parse of the paper;
#   that Table 3 is dense evaluation (D: 8.1, E: 8.0 top-5): the authors' model pages,
#   https://gist.github.com/ksimonyan/211839e770f7b538e2d8 and https://gist.github.com/ksimonyan/3785162f95cd2d5fee77
# - He 2016, Tables 2-5: github.com/pranav-85/agentic_rag, src/parse/output_tables/sample_page1.md to sample_page4.md
#   (the tables parsed from the paper's PDF), and full-text transcriptions with the captions, Section 3.4 (10-crop
#   testing for comparisons, multi-scale fully-convolutional for the best results) and Section 4.1 (the ensemble).
PAPER_FIGURES: tuple[PublishedFigure, ...] = (
    PublishedFigure("alexnet", 37.5, 17.0, f"{_ALEXNET}, Table 1", _TEST_2010, _TEN_PATCHES, _TWO_GPU),
    PublishedFigure("alexnet", 40.7, 18.2, f"{_ALEXNET}, Table 2", _VAL, _TEN_PATCHES, _TWO_GPU),
    PublishedFigure("alexnet", 38.1, 16.4, f"{_ALEXNET}, Table 2", _VAL, _FIVE_CNNS, _TWO_GPU),
    PublishedFigure("alexnet", None, 16.4, f"{_ALEXNET}, Table 2", _TEST_2012, _FIVE_CNNS, _TWO_GPU),
    PublishedFigure("alexnet", 39.0, 16.6, f"{_ALEXNET}, Table 2", _VAL, "single CNN*", _FALL_2011),
    PublishedFigure("alexnet", 36.7, 15.4, f"{_ALEXNET}, Table 2", _VAL, _SEVEN_CNNS, _TWO_GPU),
    PublishedFigure("alexnet", None, 15.3, f"{_ALEXNET}, Table 2", _TEST_2012, _SEVEN_CNNS, _TWO_GPU),
    PublishedFigure("vgg11", 29.6, 10.4, f"{_VGG}, Table 3 (config A)", _VAL, _VGG_FIXED),
    PublishedFigure("vgg13", 28.7, 9.9, f"{_VGG}, Table 3 (config B)", _VAL, _VGG_FIXED),
    PublishedFigure("vgg16", 27.0, 8.8, f"{_VGG}, Table 3 (config D)", _VAL, _VGG_FIXED),
    PublishedFigure("vgg16", 25.6, 8.1, f"{_VGG}, Table 3 (config D)", _VAL, _VGG_JITTERED),
    PublishedFigure("vgg16", 24.4, 7.2, f"{_VGG}, Table 5 (config D)", _VAL, _VGG_BEST),
    PublishedFigure("vgg19", 27.3, 9.0, f"{_VGG}, Table 3 (config E)", _VAL, _VGG_FIXED),
    PublishedFigure("vgg19", 25.5, 8.0, f"{_VGG}, Table 3 (config E)", _VAL, _VGG_JITTERED),
    PublishedFigure("vgg19", 24.4, 7.1, f"{_VGG}, Table 5 (config E)", _VAL, _VGG_BEST),
    PublishedFigure("resnet18", 27.88, None, f"{_RESNET}, Table 2", _VAL, _TEN_CROPS, _OPTION_A),
    PublishedFigure("resnet34", 25.03, 7.76, f"{_RESNET}, Table 3 (ResNet-34 A)", _VAL, _TEN_CROPS, _OPTION_A),
    PublishedFigure("resnet34", 24.52, 7.46, f"{_RESNET}, Table 3 (ResNet-34 B)", _VAL, _TEN_CROPS),
    PublishedFigure("resnet34", 21.84, 5.71, f"{_RESNET}, Table 4 (ResNet-34 B)", _VAL, _MULTI_SCALE),
    PublishedFigure("resnet50", 22.85, 6.71, f"{_RESNET}, Table 3", _VAL, _TEN_CROPS),
    PublishedFigure("resnet50", 20.74, 5.25, f"{_RESNET}, Table 4", _VAL, _MULTI_SCALE),
    PublishedFigure("resnet101", 21.75, 6.05, f"{_RESNET}, Table 3", _VAL, _TEN_CROPS),
    PublishedFigure("resnet101", 19.87, 4.60, f"{_RESNET}, Table 4", _VAL, _MULTI_SCALE),
    PublishedFigure("resnet152", 21.43, 5.71, f"{_RESNET}, Table 3", _VAL, _TEN_CROPS),
    PublishedFigure("resnet152", 19.38, 4.49, f"{_RESNET}, Table 4", _VAL, _MULTI_SCALE),
    PublishedFigure(
        "resnet152",
        None,
        3.57,
        f"{_RESNET}, Table 5",
        "ImageNet test (ILSVRC-2015 server)",
        "ensemble of 6 ResNets of different depth",
        "the winning ILSVRC-2015 entry: six depths, two of them 152-layer",
    ),
)

# Notes on torchvision's rows where its network is not the paper's.
TORCHVISION_NOTES = {
    "alexnet": _TWO_GPU,
    **{
        f"vgg{depth}_bn": "VGG with batch normalisation: not in Simonyan & Zisserman 2015, which has no figure for it"
        for depth in (11, 13, 16, 19)
    },
}


def published_figures(arch: str) -> list[PublishedFigure]:
    """The papers' rows for ``arch``, then torchvision's for each of its ImageNet weights; none for an architecture
    that neither knows (a custom model has no record)."""
    return [figure for figure in PAPER_FIGURES if figure.arch == arch] + torchvision_figures(arch)


def torchvision_figures(arch: str) -> list[PublishedFigure]:
    """The accuracies the installed torchvision publishes with its weights of ``arch`` (``meta["_metrics"]``), as
    errors, measured as its weights' transforms say: one centre crop of the resized image. Weights it gives no
    accuracy for (NaN: VGG16's feature-extraction weights) have no row."""
    try:
        weights_enum = get_model_weights(arch)
    except ValueError:  # not a torchvision model
        return []
    version = torchvision.__version__.split("+")[0]
    figures = []
    for weights in weights_enum:
        metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K")
        if metrics is None or math.isnan(metrics["acc@1"]):
            continue
        transforms = weights.transforms()
        crop = f"single {transforms.crop_size[0]} crop"
        if getattr(transforms, "resize_size", None):
            crop += f" of {transforms.resize_size[0]}"
        figures.append(
            PublishedFigure(
                arch,
                _error(metrics["acc@1"]),
                _error(metrics["acc@5"]),
                f"torchvision {version}, {type(weights).__name__}.{weights.name}, recipe {weights.meta['recipe']}",
                ILSVRC_2012_VAL,
                f"single model, {crop}",
                TORCHVISION_NOTES.get(arch),
            )
        )
    return figures


def _error(accuracy: float) -> float:
    """Rounded to torchvision's three decimals, so that 100 - 76.13 reads 23.87."""
    return round(100.0 - accuracy, 3)


COMPARABILITY_WARNING = (
    "Not directly comparable: a figure measured on another split, another number of classes (a 10-class demo is not "
    "ILSVRC's 1000) or under another protocol (10 crops, multiple scales, ensembles lower the error below a single "
    "centre crop's) says what the architecture can do, not what this run should have reached."
)


def format_record(arch: str, top1_error: float, top5_error: float, split: str) -> str:
    """A markdown table: this run's errors on ``split``, then the published figures for ``arch`` with their split,
    protocol and source (notes as footnotes), and the warning that they were measured differently."""
    figures = published_figures(arch)
    header = "| | top-1 error % | top-5 error % | split | protocol | source |"
    measured = f"| this run | {_percent(top1_error)} | {_percent(top5_error)} | {split} | | |"
    lines = [header, "|---|---|---|---|---|---|", measured]
    notes: list[str] = []
    for figure in figures:
        source = figure.source
        if figure.note:
            if figure.note not in notes:
                notes.append(figure.note)
            source += f" [{notes.index(figure.note) + 1}]"
        lines.append(
            f"| published | {_percent(figure.top1_error)} | {_percent(figure.top5_error)} | {figure.split} | "
            f"{figure.protocol} | {source} |"
        )
    lines.append("")
    if not figures:
        lines.append(f"No published figures for {arch!r}: a custom architecture has no record.")
        return "\n".join(lines)
    lines += [f"[{number}] {note}" for number, note in enumerate(notes, 1)]
    lines.append(COMPARABILITY_WARNING)
    return "\n".join(lines)


def _percent(error: float | None) -> str:
    """As published, up to three decimals, at least one: 17.0, 27.88, 43.478; a dash where there is none."""
    if error is None:
        return "–"
    text = f"{error:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
