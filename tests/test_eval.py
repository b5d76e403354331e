"""eval.py: the training's own val figures from its checkpoint, ten crops, 2 ranks = 1 rank, the error analysis, a
test-time resolution sweep, the EMA weights, ReaL top-1, test sets beside val, and class subsets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from callbacks.error_analysis import PREDICTIONS, analyse, format_report
from data.demo import demo_wnids, ensure_demo_dataset
from data.ilsvrc import load_layout, wordnet_names
from data.real_labels import val_image_id
from data.spec import ConfigError, ImageSpec
from eval import PLOT, SETS, TABLE, chosen_weights, named_test_sets
from tests.conftest import PROJECT_ROOT, SMALL_DEMO, SMALL_RUN, build_module, convert_to_shards, run_train
from tests.odd_images import write_odd_images


def run_eval(*overrides: str, cache_dir: Path, run_dir: Path, report: str = "report.json") -> dict:
    """``python eval.py OVERRIDES`` as a user runs it; its error analysis (``report``: where in ``run_dir``)."""
    command = [sys.executable, "eval.py", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / report).read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch demo run: its folder and the cache holding its dataset."""
    folder = tmp_path_factory.mktemp("eval")
    result = run_train(*SMALL_RUN, "trainer.max_epochs=2", cache_dir=folder / "cache", run_dir=folder / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", folder / "cache"


# The dataset of the small run, without its image settings: those come from the checkpoint's model card.
DATA_ONLY = [o for o in SMALL_RUN if not o.startswith("data.spec.")]


@pytest.fixture(scope="module")
def single(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The plain single-crop evaluation of the run's last checkpoint: its folder and its report."""
    run, cache = trained
    folder = tmp_path_factory.mktemp("single")
    return folder, run_eval(*DATA_ONLY, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", cache_dir=cache, run_dir=folder)


@pytest.mark.slow
def test_single_crop_reproduces_the_training_figures_and_ten_crops_report_their_own(trained, single, tmp_path: Path):
    """eval.py needs only the checkpoint and the data: the run trained at 32 px (the demo's default is 64), and the
    checkpoint says so."""
    run, cache = trained
    logged = json.loads((run / "metrics.json").read_text())
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    folder, single = single[0], single[1]["summary"]
    assert single["images"] == 60
    assert single["top1_accuracy"] == pytest.approx(logged["val/acc1"], abs=1e-3)
    assert single["top5_accuracy"] == pytest.approx(logged["val/acc5"], abs=1e-3)
    assert single["top1_error"] == pytest.approx(1 - single["top1_accuracy"])
    rows = (folder / PREDICTIONS).read_text().splitlines()[1:]
    assert len(rows) == 60 and [row.split("\t")[0] for row in rows] == sorted(row.split("\t")[0] for row in rows)
    right = sum(row.split("\t")[1] == row.split("\t")[2].split()[0] for row in rows)  # label = top-1 wnid
    assert right / 60 == pytest.approx(single["top1_accuracy"])
    ten = run_eval(*DATA_ONLY, ckpt, "data.val_crops=10", cache_dir=cache, run_dir=tmp_path / "ten")
    assert ten["summary"]["images"] == 60
    assert ten["summary"]["top1_accuracy"] == pytest.approx(_ten_crop_top1(run, cache), abs=1e-6)
    assert "top-1" in (tmp_path / "ten" / "report.txt").read_text()


@pytest.mark.slow
def test_an_image_setting_that_differs_from_training_is_logged(trained, tmp_path: Path):
    run, cache = trained
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    run_eval(*DATA_ONLY, ckpt, "data.spec.val_resize_size=40", cache_dir=cache, run_dir=tmp_path / "eval")
    log = (tmp_path / "eval" / "eval.log").read_text()
    assert "data.spec.val_resize_size=40 as given, not 36 as the model was trained" in log
    assert "data.spec.image_size" not in log  # what the user did not override is the checkpoint's, silently


@pytest.mark.slow
def test_predict_gives_eval_s_top5_for_every_odd_image(trained, tmp_path: Path):
    """Odd but valid files (EXIF orientations, 16-bit, palette and RGBA PNGs, CMYK, a trailer, 1x1, 10x3000) as a
    val split: predict.py and eval.py, each given only the checkpoint, agree on every image's top-5."""
    run, cache = trained
    root = tmp_path / "odd"
    (root / "train").parent.mkdir()
    (root / "train").symlink_to(ensure_demo_dataset(cache, **SMALL_DEMO) / "train")
    files = write_odd_images(root / "val")
    wnids = sorted(p.name for p in (root / "train").iterdir())
    rows = [f"{path.stem},{wnids[i % len(wnids)]} 0 0 1 1" for i, path in enumerate(files.values())]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    data = [f"data.root={root}", "data.index=full", "data.num_workers=0", "data.batch_size=4"]
    run_eval(ckpt, *data, cache_dir=cache, run_dir=tmp_path / "eval")
    evaluated = _predictions(tmp_path / "eval")
    command = [sys.executable, "predict.py", ckpt, f"inputs=[{root / 'val'}]", *data, f"paths.cache_dir={cache}"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={tmp_path / 'predict'}"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and f"{len(files)} image(s) classified, 0 skipped" in output, output[-3000:]
    predicted = {}
    for line in result.stdout.splitlines():
        if not line.startswith(str(root)):
            continue
        path, top = line.split(": ", 1)
        predicted[path] = [(entry.split()[1], float(entry.split()[0])) for entry in top.split(" | ")]
    assert evaluated.keys() == {str(path) for path in files.values()}
    _assert_same_top5(evaluated, predicted, abs=1e-3)  # predict.py prints 3 decimals


def _predictions(folder: Path) -> dict[str, list[tuple[str, float]]]:
    """eval.py's predictions.tsv: path -> top-5 (wnid, probability)."""
    rows = [row.split("\t") for row in (folder / PREDICTIONS).read_text().splitlines()[1:]]
    return {path: [(entry.split()[0], float(entry.split()[1])) for entry in top] for path, _, *top in rows}


def _assert_same_top5(a: dict, b: dict, abs: float) -> None:
    assert a.keys() == b.keys()
    for path, top in a.items():
        assert [c for c, _ in top] == [c for c, _ in b[path]], path
        assert [p for _, p in top] == pytest.approx([p for _, p in b[path]], abs=abs), path


def _ten_crop_top1(run: Path, cache: Path) -> float:
    """Ten-crop top-1 of the run's last checkpoint computed here with torchvision alone (Krizhevsky et al.: the
    corners, the centre and their mirrors, mean probability), as the reference for eval.py's."""
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net = torchvision.models.resnet18(num_classes=4)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    net.eval()
    val = load_layout(ensure_demo_dataset(cache, **SMALL_DEMO)).val
    crops = v2.Compose([v2.Resize(36, antialias=True), v2.TenCrop(32)])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (ImageSpec().mean, ImageSpec().std))
    correct = 0
    with torch.no_grad():
        for path, label in zip(val.paths, val.labels):
            image = decode_image(path, mode=ImageReadMode.RGB)
            batch = (torch.stack(crops(image)).float() - mean) / std
            correct += int(net(batch).softmax(-1).mean(0).argmax()) == label
    return correct / len(val)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [["data.val_crops=10"], ["data/loader=dali"]], ids=["ten-crop", "dali"])
def test_two_ranks_give_the_figures_of_one(trained, tmp_path: Path, protocol: list[str]):
    run, cache = trained
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    one = run_eval(*SMALL_RUN, ckpt, *protocol, cache_dir=cache, run_dir=tmp_path / "one")
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *protocol]
    two = run_eval(*SMALL_RUN, ckpt, *ddp, cache_dir=cache, run_dir=tmp_path / "two")
    assert one["summary"]["images"] == two["summary"]["images"] == 60  # each image once
    assert one["summary"] == pytest.approx(two["summary"])
    assert one["per_class"] == two["per_class"] and one["confused_pairs"] == two["confused_pairs"]
    _assert_same_top5(_predictions(tmp_path / "one"), _predictions(tmp_path / "two"), abs=1e-5)  # every image's


def _by_sample(predictions: dict) -> dict:
    """Predictions keyed by the sample's name alone (a file's stem, a shard key's last part)."""
    return {path.rsplit(":", 1)[-1].rsplit("/", 1)[-1].rsplit(".", 1)[0]: top for path, top in predictions.items()}


@pytest.mark.slow
def test_a_checkpoint_scores_the_same_on_val_read_from_shards_as_from_folders(trained, tmp_path: Path):
    """Single crop through both loaders and ten crops (torchvision): the same figures and every image's top-5."""
    run, cache = trained
    shards = convert_to_shards(ensure_demo_dataset(cache, **SMALL_DEMO), tmp_path / "shards", "--shard-samples", "25")
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    for protocol in (["data/loader=torchvision"], ["data/loader=dali"], ["data.val_crops=10"]):
        name = protocol[0].rsplit("=", 1)[-1]
        folders = run_eval(*DATA_ONLY, ckpt, *protocol, cache_dir=cache, run_dir=tmp_path / f"folders-{name}")
        sharded = run_eval(
            *DATA_ONLY, ckpt, f"data.root={shards}", *protocol, cache_dir=cache, run_dir=tmp_path / f"shards-{name}"
        )
        assert sharded["summary"]["images"] == folders["summary"]["images"] == 60
        assert sharded["summary"] == pytest.approx(folders["summary"], abs=1e-6), protocol
        on_folders, on_shards = (_predictions(tmp_path / f"{kind}-{name}") for kind in ("folders", "shards"))
        _assert_same_top5(_by_sample(on_folders), _by_sample(on_shards), abs=1e-5)


def _sweep_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / TABLE, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_a_resolution_sweep_reports_each_size_and_the_card_s_as_the_single_evaluation(trained, single, tmp_path):
    """One command, three val crops; crop_ratio null keeps the card's 32 of 36 (24 of 27, 40 of 45). At 32 px every
    figure and every image's top-5 are the plain evaluation's; each size has its error analysis in <size>px/."""
    run, cache = trained
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    sweep = tmp_path / "sweep"
    at_32 = run_eval(
        *DATA_ONLY, ckpt, "resolutions=[24,32,40]", cache_dir=cache, run_dir=sweep, report="32px/report.json"
    )
    rows = _sweep_rows(sweep)
    sizes = [(row["val_image_size"], row["val_resize_size"], row["input"]) for row in rows]
    assert sizes == [("24", "27", "24x24"), ("32", "36", "32x32"), ("40", "45", "40x40")]  # what reached the model
    folder, report = single
    assert at_32 == report and (sweep / "32px" / PREDICTIONS).read_bytes() == (folder / PREDICTIONS).read_bytes()
    assert float(rows[1]["top1"]) == pytest.approx(report["summary"]["top1_accuracy"], abs=1e-7)  # float32 of 12/60
    for row in rows:
        analysed = json.loads((sweep / f"{row['val_image_size']}px" / "report.json").read_text())["summary"]
        assert float(row["top1"]) == pytest.approx(analysed["top1_accuracy"], abs=1e-7)
    assert len({row["loss"] for row in rows}) == 3  # three different inputs
    assert (sweep / PLOT).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and (sweep / PLOT).stat().st_size > 1000
    assert "| 40 | 45 | 40x40 |" in (sweep / "eval.log").read_text()  # the table in the log


@pytest.mark.slow
def test_a_resolution_sweep_reaches_the_dali_loader(trained, tmp_path: Path):
    run, cache = trained
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    sweep = tmp_path / "sweep"
    options = ["data/loader=dali", "resolutions=[24,40]", "crop_ratio=0.75"]
    run_eval(*DATA_ONLY, ckpt, *options, cache_dir=cache, run_dir=sweep, report="40px/report.json")
    rows = _sweep_rows(sweep)
    assert [(row["val_image_size"], row["val_resize_size"], row["input"]) for row in rows] == [
        ("24", "32", "24x24"),
        ("40", "53", "40x40"),
    ]


def _with_ema(run: Path, out: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """The run's last checkpoint with ``ema_net.*`` beside ``net.*``: ``change(network key, its tensor)``."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    state |= {f"ema_net.{key[4:]}": change(key[4:], value.clone()) for key, value in state.items()}
    torch.save(checkpoint, out)
    return out


def _constant_class_zero(key: str, value: torch.Tensor) -> torch.Tensor:
    """A perturbed copy: the classifier's weights zeroed and its bias one-hot, so every image is class 0."""
    if key == "fc.weight":
        return torch.zeros_like(value)
    return torch.eye(len(value))[0] if key == "fc.bias" else value


@pytest.mark.slow
def test_weights_ema_needs_a_run_with_ema_and_raw_ignores_it(trained, make_cfg, tmp_path: Path):
    """The module (without EMA) loads a checkpoint with ``ema_net.*`` strictly, raw or ema; ema needs them."""
    run, _ = trained
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    with pytest.raises(ValueError, match=r"no 'ema_net\.\*' weights: its run kept no moving average .*\(model\.ema\)"):
        chosen_weights(checkpoint["state_dict"], "ema", "last.ckpt")
    partial = {**checkpoint["state_dict"], "ema_net.fc.bias": checkpoint["state_dict"]["net.fc.bias"]}
    with pytest.raises(ValueError, match="not an EMA of this network"):
        chosen_weights(partial, "ema", "partial.ckpt")
    with_ema = torch.load(_with_ema(run, tmp_path / "ema.ckpt", lambda _, value: value + 1), weights_only=True)
    module = build_module(make_cfg().model, checkpoint["model_card"]["classes"])
    for weights, offset in (("raw", 0), ("ema", 1)):
        module.load_state_dict(chosen_weights(with_ema["state_dict"], weights, "ema.ckpt"))  # strict
        assert torch.equal(module.net.fc.bias, checkpoint["state_dict"]["net.fc.bias"] + offset), weights


@pytest.mark.slow
def test_weights_ema_evaluates_the_moving_average(trained, single, tmp_path: Path):
    """ema_net = net: the plain evaluation's figures; ema_net a perturbed copy (every image class 0): its own."""
    run, cache = trained
    report = single[1]
    copied = _with_ema(run, tmp_path / "copy.ckpt", lambda _, value: value)
    same = run_eval(*DATA_ONLY, f"ckpt={copied}", "weights=ema", cache_dir=cache, run_dir=tmp_path / "copy")
    assert same == report
    perturbed = _with_ema(run, tmp_path / "perturbed.ckpt", _constant_class_zero)
    other = run_eval(*DATA_ONLY, f"ckpt={perturbed}", "weights=ema", cache_dir=cache, run_dir=tmp_path / "perturbed")
    assert other["summary"]["top1_accuracy"] == 15 / 60 != report["summary"]["top1_accuracy"]  # 15 images a class


def test_error_analysis_figures():
    names = wordnet_names()
    wnids = ["n02085620", "n02085782", "n02701002"]  # Chihuahua, Japanese spaniel, ambulance
    labels = torch.tensor([0, 0, 1, 2])
    top5 = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0], [2, 0, 1]])  # right, near miss, far miss, right
    report = analyse(top5, labels, wnids, [names[w] for w in wnids], confusions=5)
    summary = report["summary"]
    assert summary["top1_accuracy"] == 0.5 and summary["top5_accuracy"] == 1.0 and summary["top1_error"] == 0.5
    near, far = 1, 12  # Chihuahua -> Japanese spaniel: siblings; Japanese spaniel -> ambulance: only "whole" shared
    assert summary["mistake_severity"] == pytest.approx((near + far) / 2)
    assert summary["hierarchical_distance_at_1"] == pytest.approx((near + far) / 4)
    assert [c["wnid"] for c in report["per_class"]] == ["n02085782", "n02085620", "n02701002"]  # worst first
    assert report["confused_pairs"][0]["count"] == 1
    assert "mistake severity 6.50" in format_report(report)


DEMO = demo_wnids(SMALL_DEMO["num_classes"])


def _val_truth(cache: Path) -> dict[str, str]:
    """The small demo's val paths and their wnids."""
    val = load_layout(ensure_demo_dataset(cache, **SMALL_DEMO)).val
    return {path: DEMO[label] for path, label in zip(val.paths, val.labels)}


def _restricted_top1(predictions: dict[str, list[tuple[str, float]]], classes: list[str], cache: Path) -> float:
    """Top-1 over the images of ``classes`` with the model's outputs restricted to them, from a 4-class model's
    predictions.tsv (it holds all 4 probabilities): the restricted softmax ranks the classes as the full one does."""
    truth = _val_truth(cache)
    mine = {path: top for path, top in predictions.items() if truth[path] in classes}
    right = [max((p, wnid) for wnid, p in top if wnid in classes)[1] == truth[path] for path, top in mine.items()]
    return sum(right) / len(right)


@pytest.mark.slow
def test_real_top1_counts_each_image_once_over_two_ranks(trained, single, tmp_path: Path):
    """A ReaL file for the demo's 60 val ids made from the plain evaluation's predictions, so that the answer is known
    by hand: id % 4 == 0 no valid label (left out), 1 its top-1, 2 another class, 3 both: 15 of each kind, 30 of the
    45 counted right. The demo's own val files are named by val id too, but its labels are not ReaL's: auto skips."""
    run, cache = trained
    folder = single[0]
    assert not (folder / "real.json").exists()
    assert "ReaL top-1: not measured: the val labels of" in (folder / "eval.log").read_text()
    ilsvrc = sorted(wordnet_names())
    top1 = {val_image_id(path): top[0][0] for path, top in _predictions(folder).items()}
    assert sorted(top1) == list(range(1, 61))
    labels = [[] for _ in range(60)]
    for image, wnid in top1.items():
        mine, other = ilsvrc.index(wnid), ilsvrc.index(next(w for w in DEMO if w != wnid))
        labels[image - 1] = [[], [mine], [other], [other, mine]][image % 4]
    real = tmp_path / "real.json"
    real.write_text(json.dumps(labels))
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"real_labels={real}"]
    run_eval(*DATA_ONLY, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", *ddp, cache_dir=cache, run_dir=tmp_path / "two")
    result = json.loads((tmp_path / "two" / "real.json").read_text())
    assert (result["counted"], result["left_out"], result["top1"]) == (45, 15, 30 / 45)
    with open(tmp_path / "two" / SETS, newline="") as file:
        assert float(next(csv.DictReader(file))["real_top1"]) == pytest.approx(30 / 45)


@pytest.mark.slow
def test_test_sets_beside_val_report_their_figures_and_their_gaps(trained, tmp_path: Path):
    """Through the DALI loader: an ImageNet-V2 tree (folders by class index) of the val images scores as val, a gap of
    0; an ImageNet-A-like wnid tree of 2 of the 4 classes scores the model's outputs restricted to them (computed
    from val's predictions); each set has its error analysis."""
    run, cache = trained
    ilsvrc = sorted(wordnet_names())
    v2, a = tmp_path / "imagenetv2-matched-frequency-format-val", tmp_path / "imagenet-a"
    for path, wnid in _val_truth(cache).items():
        for folder in [v2 / str(ilsvrc.index(wnid))] + [a / wnid] * (wnid in DEMO[::2]):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(path).name).symlink_to(path)
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    sets = [f"test_sets=[{v2},{a}]", "restrict_outputs=true", "data/loader=dali"]
    report = run_eval(
        *DATA_ONLY, ckpt, *sets, cache_dir=cache, run_dir=tmp_path / "sets", report="imagenet-a/report.json"
    )
    assert report["summary"]["images"] == 30
    with open(tmp_path / "sets" / SETS, newline="") as file:
        rows = {row["set"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["val", v2.name, "imagenet-a"]
    val, on_v2, on_a = rows.values()
    assert (val["images"], on_v2["images"], on_a["images"], on_a["classes"]) == ("60", "60", "30", "2")
    assert float(on_v2["top1"]) == pytest.approx(float(val["top1"]), abs=1e-6) and float(on_v2["top1_gap"]) == 0
    on_val = _predictions(tmp_path / "sets")
    assert float(on_a["top1"]) == pytest.approx(_restricted_top1(on_val, DEMO[::2], cache), abs=1e-6)
    assert float(on_a["top1_gap"]) == pytest.approx(float(on_a["top1"]) - float(val["top1"]))
    record = (tmp_path / "sets" / "record.md").read_text()
    assert "| this run |" in record and "He, Zhang, Ren & Sun 2016" in record and "ILSVRC-2012 val" in record


@pytest.mark.slow
def test_a_class_subset_is_trained_recorded_and_honoured_by_eval_and_predict(trained, single, tmp_path: Path):
    """A model of 2 of the demo's classes evaluates on those of the 4-class root by its card; the 4-class model on 2
    of its classes is refused unless its outputs are restricted, then scores as computed by hand, and predict.py
    ranks only those two, with their renormalised probabilities."""
    run, cache = trained
    two = DEMO[::2]
    subset = tmp_path / "subset"
    result = run_train(
        *SMALL_RUN, "trainer.max_epochs=1", f"data.classes=[{two[1]},{two[0]}]", cache_dir=cache, run_dir=subset
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = torch.load(subset / "checkpoints" / "last.ckpt", weights_only=True)["model_card"]
    assert card["classes"] == two
    report = run_eval(
        *DATA_ONLY, f"ckpt={subset / 'checkpoints' / 'last.ckpt'}", cache_dir=cache, run_dir=subset / "ev"
    )
    assert report["summary"]["images"] == 30 and {c["wnid"] for c in report["per_class"]} == set(two)
    ckpt, chosen = f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data.classes=[{two[0]},{two[1]}]"
    command = [sys.executable, "eval.py", ckpt, chosen, *DATA_ONLY, f"paths.cache_dir={cache}"]
    refused = subprocess.run(
        [*command, f"hydra.run.dir={tmp_path / 'refused'}"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "2 of the model's 4 classes" in refused.stderr, refused.stderr[-3000:]
    assert "restrict_outputs=true" in refused.stderr
    restricted = run_eval(*DATA_ONLY, ckpt, chosen, "restrict_outputs=true", cache_dir=cache, run_dir=tmp_path / "r")
    full = _predictions(single[0])
    assert restricted["summary"]["top1_accuracy"] == pytest.approx(_restricted_top1(full, two, cache), abs=1e-6)
    val = Path(next(iter(_val_truth(cache)))).parent
    predict = [sys.executable, "predict.py", ckpt, chosen, "restrict_outputs=true", f"inputs=[{val}]", *DATA_ONLY]
    printed = subprocess.run(
        [*predict, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'predict'}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    lines = [line.split(": ", 1) for line in printed.stdout.splitlines() if line.startswith(str(val))]
    assert len(lines) == 60
    for path, top in lines:
        ranked = [(entry.split()[1], float(entry.split()[0])) for entry in top.split(" | ")]
        probabilities = dict(full[path])
        total = sum(probabilities[wnid] for wnid in two)
        expected = sorted(((wnid, probabilities[wnid] / total) for wnid in two), key=lambda item: -item[1])
        assert [w for w, _ in ranked] == [w for w, _ in expected], path
        assert [p for _, p in ranked] == pytest.approx([p for _, p in expected], abs=2e-3), path


def test_test_sets_are_a_list_of_folders_of_distinct_names():
    assert named_test_sets(["/d/imagenet-a", "/e/imagenet-r/"]) == [
        ("/d/imagenet-a", "imagenet-a"),
        ("/e/imagenet-r/", "imagenet-r"),
    ]
    for roots, fault in (
        ("/d/imagenet-a", "a list of folders"),
        (["/d/imagenet-r", "/e/imagenet-r"], "distinct names.*imagenet-r"),
        (["/d/val"], "none named val"),
        ([3], "a list of folders"),
    ):
        with pytest.raises(ConfigError, match=fault):
            named_test_sets(roots)
