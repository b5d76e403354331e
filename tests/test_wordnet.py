"""WordNet class subsets: the whole is-a graph (not the single kept paths), the ready lists, files, names, samples,
and errors that name data.classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data import make_class_table
from data.ilsvrc import is_a_paths, wordnet_names
from data.spec import ConfigError
from data.wordnet import DOG, READY_LISTS, ClassSelection, find_synsets, ilsvrc_classes_under, select_classes

from .conftest import SHARED_DATA

DOMESTIC_ANIMAL = "n01317541"
DINGO = "n02115641"


def test_dogs_through_the_graph():
    dogs = ilsvrc_classes_under(DOG)
    assert len(dogs) == 118 and dogs == tuple(sorted(dogs))
    assert select_classes("dogs") == ClassSelection(dogs, "dogs: 118 classes")
    assert select_classes(DOG).description == (
        "WordNet n02084071 (dog, domestic dog, Canis familiaris): 118 ILSVRC classes"
    )
    assert select_classes("Dog").wnids == dogs  # the name, case-insensitive, has one synset with classes under it


def test_domestic_animal_needs_every_parent():
    """A class with several parents reaches domestic animal only on paths the hierarchy table leaves out."""
    assert len(ilsvrc_classes_under(DOMESTIC_ANIMAL)) == 123
    assert not any(DOMESTIC_ANIMAL in path for path in is_a_paths().values())
    assert select_classes("domestic animal").wnids == ilsvrc_classes_under(DOMESTIC_ANIMAL)


def test_dingo_is_not_a_dog_but_is_in_imagewoof():
    assert DINGO not in ilsvrc_classes_under(DOG)
    assert DINGO in select_classes("imagewoof").wnids
    assert ilsvrc_classes_under(DINGO) == (DINGO,)  # a class is under itself


@pytest.mark.parametrize("name, count", [("imagenette", 10), ("imagewoof", 10), ("imagenet100", 100)])
def test_ready_lists_hold_ilsvrc_classes(name: str, count: int):
    chosen = select_classes(name)
    assert chosen == ClassSelection(tuple(sorted(chosen.wnids)), f"{name}: {count} classes")
    assert len(set(chosen.wnids)) == count and set(chosen.wnids) <= set(wordnet_names())
    assert name in READY_LISTS


def test_imagenette_is_fastais_list():
    names = wordnet_names()
    assert [names[w] for w in select_classes("imagenette").wnids] == [
        "tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
        "gas pump", "golf ball", "parachute",
    ]  # fmt: skip


def test_a_file_of_wnids(tmp_path: Path):
    path = tmp_path / "mine.txt"
    path.write_text("# my classes\n\nn02088364  # beagle\n  n01440764\n# the end\n")
    assert select_classes(str(path)) == ClassSelection(("n01440764", "n02088364"), f"{path}: 2 classes")


@pytest.mark.parametrize(
    "text, fault",
    [
        ("# nothing\n\n", " lists no class"),
        ("n01440764\nn02088364\nn01440764 # again\n", ":3 repeats n01440764 (line 1)"),
        ("n01440764 tench\n", ":1 holds 'n01440764 tench': one wnid a line"),
    ],
)
def test_a_bad_file_is_named(tmp_path: Path, text: str, fault: str):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match="data.classes") as error:
        select_classes(str(path))
    assert str(path) + fault in str(error.value)


def test_a_name_of_several_synsets_lists_them():
    assert find_synsets("cat") == ["n02121620", "n02127808"]
    with pytest.raises(ConfigError, match="data.classes") as error:
        select_classes("cat")
    message = str(error.value)
    assert "pass one's wnid" in message
    assert "n02121620 (cat, true cat): 7 ILSVRC classes" in message
    assert "n02127808 (big cat, cat): 6 ILSVRC classes" in message


def test_a_list_is_taken_as_given():
    given = OmegaConf.create({"classes": ["tulips", "roses", "n01440764"]}).classes
    assert select_classes(given) == ClassSelection(("n01440764", "roses", "tulips"), "3 classes listed in data.classes")
    with pytest.raises(ConfigError, match="repeated: roses"):
        select_classes(["roses", "tulips", "roses"])


def test_a_seeded_sample():
    first = select_classes("dogs", sample=10, seed=0)
    assert first == select_classes("dogs", sample=10, seed=0)
    assert first.wnids == tuple(sorted(first.wnids)) and set(first.wnids) <= set(ilsvrc_classes_under(DOG))
    assert first.description == "dogs: 118 classes, 10 of them drawn with seed 0"
    assert select_classes("dogs", sample=10, seed=1).wnids != first.wnids
    assert select_classes("imagenette", sample=10).wnids == select_classes("imagenette").wnids


@pytest.mark.parametrize(
    "selection, sample, key, fault",
    [
        ("no such thing", None, "data.classes", "no such list, file, wnid or WordNet name"),
        ("n99999999", None, "data.classes", "no ILSVRC-2012 class nor an ancestor"),
        ("n00002452", None, "data.classes", "no ILSVRC-2012 class nor an ancestor"),  # thing: WordNet, no class under
        ([], None, "data.classes", "non-empty list"),
        ([1, 2], None, "data.classes", "quoted strings"),
        (3, None, "data.classes", "a ready list"),
        ("imagenette", 0, "data.sample_classes", "1..10"),
        ("imagenette", 11, "data.sample_classes", "1..10"),
        ("imagenette", True, "data.sample_classes", "1..10"),
        (None, 5, "data.sample_classes", "set data.classes too"),
    ],
)
def test_bad_inputs_name_their_key(selection, sample, key: str, fault: str):
    with pytest.raises(ConfigError, match=key) as error:
        select_classes(selection, sample=sample)
    assert error.value.key == key and fault in str(error.value)


def test_none_is_every_class():
    assert select_classes(None) is None


@pytest.mark.skipif(
    not (SHARED_DATA / "wordnet").is_dir() or not (SHARED_DATA / "imagenet-samples").is_dir(),
    reason=f"the generator's sources ({SHARED_DATA}/wordnet and imagenet-samples) are absent",
)
def test_generated_tables_are_the_shipped_ones(tmp_path: Path):
    make_class_table.write_tables(SHARED_DATA, tmp_path)
    for table in (make_class_table.CLASS_TABLE, make_class_table.HIERARCHY_TABLE, make_class_table.WORDNET_TABLE):
        assert (tmp_path / table.name).read_bytes() == table.read_bytes(), table.name
