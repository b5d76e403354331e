"""Class subsets (data.classes) through the layout, the index, the datamodule, the shard converter and the model's
outputs; evaluation sets in ImageNet-V2's and the wnid-folder layouts (data/eval_sets.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from data.datamodule import ImageNetDataModule
from data.demo import demo_wnids
from data.eval_sets import load_eval_set
from data.ilsvrc import DatasetLayoutError, load_layout, wordnet_names
from data.index import IndexBoard, IndexRole
from data.shard_set import ShardSet, ShardSetError
from data.spec import ConfigError
from data.wordnet import ilsvrc_classes_under
from models.card import ModelCard
from tests.conftest import SMALL_DEMO, build_module, convert_to_shards

ILSVRC = sorted(wordnet_names())
DEMO = demo_wnids(SMALL_DEMO["num_classes"])  # the small demo's 4 classes: every 250th ILSVRC class


def test_a_subset_layout_indexes_its_classes_in_sorted_order_and_keeps_the_image_order(small_demo_root: Path):
    full = load_layout(small_demo_root)
    assert full.wnids == DEMO
    subset = full.subset([DEMO[3], DEMO[1]])
    assert subset.wnids == [DEMO[1], DEMO[3]] and subset.names == [full.names[1], full.names[3]]
    for split, whole in ((subset.train, full.train), (subset.val, full.val)):
        kept = [(p, label) for p, label in zip(whole.paths, whole.labels) if label in (1, 3)]
        assert split.paths == [p for p, _ in kept]  # the order they had
        assert split.labels == [{1: 0, 3: 1}[label] for _, label in kept]
    assert (len(subset.train), len(subset.val)) == (120, 30)
    with pytest.raises(DatasetLayoutError, match=r"not 1 of the 2 selected: n09999999"):
        full.subset([DEMO[0], "n09999999"])


def _datamodule(root: Path, cache: Path, **options) -> ImageNetDataModule:
    from data.spec import ImageSpec
    from data.torchvision_backend import TorchvisionLoaders

    return ImageNetDataModule(root, ImageSpec(), TorchvisionLoaders(), batch_size=4, cache_dir=cache, **options)


def test_the_datamodule_takes_a_list_a_file_a_wordnet_node_and_a_seeded_draw(
    small_demo_root: Path, tmp_path: Path, caplog
):
    listed = _datamodule(small_demo_root, tmp_path, classes=[DEMO[2], DEMO[0]])
    assert listed.classes == [DEMO[0], DEMO[2]] and len(listed.layout.train) == 120
    wnid_file = tmp_path / "classes.txt"
    wnid_file.write_text(f"# two of the demo's\n{DEMO[1]}\n\n{DEMO[3]}  \n")
    assert _datamodule(small_demo_root, tmp_path, classes=str(wnid_file)).classes == [DEMO[1], DEMO[3]]
    # every ILSVRC class under "dog" (n02084071): the demo holds one of the 118, its Siberian husky (n02110185)
    with caplog.at_level("INFO"):
        dogs = _datamodule(small_demo_root, tmp_path, classes="n02084071")
        with pytest.raises(DatasetLayoutError, match=r"not 117 of the 118 selected"):
            dogs.layout.summary()
    assert "Classes (data.classes): WordNet n02084071" in caplog.text
    drawn = [
        _datamodule(small_demo_root, tmp_path, classes=DEMO, sample_classes=2, classes_seed=seed).classes
        for seed in (0, 0, 1, 2, 3)
    ]
    assert drawn[0] == drawn[1] and len(set(map(tuple, drawn))) > 1 and all(len(d) == 2 for d in drawn)
    assert all(set(d) <= set(DEMO) and d == sorted(d) for d in drawn)
    with pytest.raises(ConfigError, match="data.sample_classes=2 is not allowed: null without data.classes"):
        _datamodule(small_demo_root, tmp_path, sample_classes=2)


def test_jobs_on_other_subsets_of_one_root_publish_their_layouts_apart(tmp_path: Path):
    role = IndexRole(0, 0, 2, "node", "run")
    paths = {
        str(classes): IndexBoard(tmp_path, "/datasets/ILSVRC2012", "fast", role, classes).layout_path
        for classes in (None, ["n01440764", "n01443537"], ["n01443537", "n01440764"], ["n01440764"])
    }
    assert len(set(paths.values())) == 3  # the same subset in any order is one layout
    assert paths[str(["n01440764", "n01443537"])] == paths[str(["n01443537", "n01440764"])]


def test_a_converted_subset_is_a_shard_set_of_those_classes_that_only_the_same_selection_reads(
    small_demo_root: Path, tmp_path: Path
):
    shards = convert_to_shards(small_demo_root, tmp_path / "subset", "--classes", f"{DEMO[3]},{DEMO[1]}")
    shard_set = ShardSet.open(shards)
    assert shard_set.wnids == [DEMO[1], DEMO[3]] and (len(shard_set.train), len(shard_set.val)) == (120, 30)
    assert json.loads((shards / "plan.json").read_text())["source"]["classes"] == [DEMO[1], DEMO[3]]
    for classes in (None, [DEMO[1], DEMO[3]]):
        assert _datamodule(shards, tmp_path, classes=classes).classes == [DEMO[1], DEMO[3]]
    with pytest.raises(ShardSetError, match=r"holds 2 classes, not the 1 of data.classes .*--classes"):
        _datamodule(shards, tmp_path, classes=[DEMO[1]]).layout.summary()


def _tree(root: Path, folders: dict[str, int]) -> Path:
    """Class folders of tiny JPEGs: folder name -> image count."""
    for name, count in folders.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((8, 8, 3), 40 * i % 255, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.jpeg")
    return root


def test_imagenet_v2_folders_are_class_indices_and_wnid_folders_are_wnids(tmp_path: Path):
    v2 = load_eval_set(_tree(tmp_path / "v2", {"0": 2, "100": 1, "999": 3}))
    assert v2.wnids == [ILSVRC[0], ILSVRC[100], ILSVRC[999]] and not len(v2.train)
    assert sorted(v2.val.labels) == [0, 0, 1, 2, 2, 2]
    assert all(
        Path(p).parent.name == {0: "0", 1: "100", 2: "999"}[label] for p, label in zip(v2.val.paths, v2.val.labels)
    )
    r = load_eval_set(_tree(tmp_path / "r", {ILSVRC[5]: 1, ILSVRC[2]: 2}))
    assert r.wnids == [ILSVRC[2], ILSVRC[5]] and sorted(r.val.labels) == [0, 0, 1]
    assert r.names[0] == wordnet_names()[ILSVRC[2]]
    for folders, fault in (
        ({"0": 1, ILSVRC[1]: 1}, "all by ILSVRC class index"),
        ({"1000": 1}, "1000: an ImageNet-V2 folder is named by a class index 0..999"),
        ({"007": 1}, "007: an ImageNet-V2 folder"),
        ({"cats": 1}, "cats: expected class folders"),
        ({"0": 0}, "holds no images"),
    ):
        with pytest.raises(DatasetLayoutError, match=fault):
            load_eval_set(_tree(tmp_path / f"bad-{len(list(tmp_path.iterdir()))}", folders))
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_eval_set(tmp_path / "missing")


def test_a_model_evaluated_on_a_subset_of_its_classes_scores_those_outputs(make_cfg):
    cfg = make_cfg("model.test_time_flip=true")
    module = build_module(cfg.model, DEMO).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = module.class_scores(module.net, images)
        module.evaluate_on([DEMO[2], DEMO[0]])
        subset = module.class_scores(module.net, images)
        assert torch.equal(subset, whole[:, [2, 0]])
        assert module.val_metrics["acc1"].num_classes == 2
        module.evaluate_on(DEMO)
        assert torch.equal(module.class_scores(module.net, images), whole)
    with pytest.raises(ValueError, match="not trained on 1 of these classes"):
        module.evaluate_on(["n09999999"])
    state = module.state_dict()
    assert "output_index" not in state  # nothing of an evaluation reaches a checkpoint


def test_the_card_says_which_classes_a_model_can_be_evaluated_on():
    card = ModelCard(tuple(DEMO))
    assert card.evaluated_classes(DEMO, restrict=False, where="root") == tuple(DEMO)
    assert card.evaluated_classes(DEMO[:2], restrict=True, where="root") == tuple(DEMO[:2])
    with pytest.raises(ValueError, match="root: 2 of the model's 4 classes.*restrict_outputs=true"):
        card.evaluated_classes(DEMO[:2], restrict=False, where="root")
    with pytest.raises(ValueError, match="1 classes the model was not trained on \\(n09999999\\)"):
        card.evaluated_classes([DEMO[0], "n09999999"], restrict=True, where="root")


@pytest.mark.parametrize("selection", ["imagenette", "imagewoof", "dogs", "n02084071", "[n01440764,n01443537]"])
def test_every_form_of_data_classes_composes(make_cfg, selection: str):
    cfg = make_cfg(f"data.classes={selection}", "data.sample_classes=2", "data.classes_seed=3")
    datamodule = instantiate(cfg.data)
    assert len(datamodule.class_selection.wnids) == 2
    with pytest.raises(DatasetLayoutError, match="selected"):  # the demo holds at most one of each selection
        datamodule.layout.summary()


def test_the_small_demo_holds_the_classes_these_tests_name(small_demo_root: Path):
    assert sorted(p.name for p in (small_demo_root / "train").iterdir()) == DEMO
    assert DEMO[1] == "n02110185" and DEMO[1] in ilsvrc_classes_under("n02084071")  # the husky is a dog
