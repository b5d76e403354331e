"""Class subsets of ILSVRC-2012 by WordNet: a ready list, a file of wnids, a WordNet node (all the classes under it
through any is-a path) or a list of names, optionally a seeded sample of them (``data.classes``,
``data.sample_classes``).

The graph is the shipped ``data/ilsvrc2012_wordnet.tsv`` (the 1000 classes and every ancestor, all their parents),
not the single paths of ``ilsvrc2012_hierarchy.tsv``: WordNet lets a synset have several parents, and a node such as
``domestic animal`` reaches its classes only through the paths that table leaves out.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data.ilsvrc import wordnet_names
from data.spec import ConfigError

WORDNET_TABLE = Path(__file__).with_name("ilsvrc2012_wordnet.tsv")
CLASS_LISTS = Path(__file__).with_name("class_lists")
DOG = "n02084071"  # dog, domestic dog, Canis familiaris
READY_LISTS = {
    "imagenette": "fastai's Imagenette: 10 easily classified classes",
    "imagewoof": "fastai's Imagewoof: 10 dog breeds, hard to tell apart",
    "imagenet100": "ImageNet-100 of Contrastive Multiview Coding (Tian et al. 2019): 100 classes",
    "dogs": f"every class under WordNet's dog ({DOG}): 118 classes (dingo, a wild dog, is not one)",
}
WNID = re.compile(r"n\d{8}")
ALLOWED = (
    f"null (every class), a ready list ({', '.join(READY_LISTS)}), a file of wnids (one a line), a WordNet wnid "
    "such as n02084071 or a WordNet name such as dog (the classes under it), or a list of class folder names"
)


@dataclass(frozen=True)
class ClassSelection:
    """The selected classes, sorted (the subset's class index), and a line saying where they came from."""

    wnids: tuple[str, ...]
    description: str


@functools.cache
def _graph() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(wnid -> its children, wnid -> its WordNet synonyms) of the shipped graph."""
    children: dict[str, list[str]] = {}
    synonyms = {}
    with open(WORDNET_TABLE, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                wnid, parents, words = line.rstrip("\n").split("\t")
                synonyms[wnid] = words
                for parent in parents.split():
                    children.setdefault(parent, []).append(wnid)
    return {wnid: tuple(kids) for wnid, kids in children.items()}, synonyms


@functools.cache
def _ilsvrc_classes() -> frozenset[str]:
    return frozenset(wordnet_names())


@functools.cache
def ilsvrc_classes_under(node: str) -> tuple[str, ...]:
    """The ILSVRC-2012 classes that are ``node`` or reach it through any is-a path, sorted; none for a wnid outside
    the graph (it holds every ancestor of every class)."""
    children, _ = _graph()
    seen, todo = {node}, [node]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return tuple(sorted(seen & _ilsvrc_classes()))


def find_synsets(name: str) -> list[str]:
    """The wnids of the graph whose WordNet synonyms include ``name`` exactly (ignoring case), sorted."""
    wanted = name.strip().lower()
    _, synonyms = _graph()
    return sorted(wnid for wnid, words in synonyms.items() if wanted in words.lower().split(", "))


def _describe(wnid: str) -> str:
    return f"WordNet {wnid} ({_graph()[1][wnid]})"


def _classes(count: int, kind: str = "") -> str:
    return f"{count} {kind}class{'es' * (count != 1)}"


def _read_list(path: Path) -> list[str]:
    """The wnids of a class list file: one a line, ``#`` starts a comment, blank lines ignored."""
    wnids: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry in wnids:
            raise ConfigError("data.classes", str(path), f"{path}:{number} repeats {entry} (line {wnids[entry]})")
        if len(entry.split()) > 1:
            raise ConfigError("data.classes", str(path), f"{path}:{number} holds {entry!r}: one wnid a line")
        wnids[entry] = number
    if not wnids:
        raise ConfigError("data.classes", str(path), f"{path} lists no class: one wnid a line (# starts a comment)")
    return list(wnids)


def _node(selection: str, wnid: str) -> tuple[str, ...]:
    classes = ilsvrc_classes_under(wnid)
    if not classes:
        raise ConfigError(
            "data.classes", selection, f"{wnid} is no ILSVRC-2012 class nor an ancestor of one ({WORDNET_TABLE.name})"
        )
    return classes


def _resolve(selection: str) -> ClassSelection:
    """A string: a ready list, a file, a wnid, then a WordNet name, in that order."""
    if selection in READY_LISTS:
        path = CLASS_LISTS / f"{selection}.txt"
        wnids = ilsvrc_classes_under(DOG) if selection == "dogs" else _read_list(path)
        return ClassSelection(tuple(sorted(wnids)), f"{selection}: {_classes(len(wnids))}")
    path = Path(selection).expanduser()
    if path.is_file():
        wnids = _read_list(path)
        return ClassSelection(tuple(sorted(wnids)), f"{path}: {_classes(len(wnids))}")
    if WNID.fullmatch(selection):
        wnids = _node(selection, selection)
        return ClassSelection(wnids, f"{_describe(selection)}: {_classes(len(wnids), 'ILSVRC ')}")
    found = [wnid for wnid in find_synsets(selection) if ilsvrc_classes_under(wnid)]
    if len(found) > 1:
        candidates = "; ".join(f"{_describe(w)}: {_classes(len(ilsvrc_classes_under(w)), 'ILSVRC ')}" for w in found)
        raise ConfigError(
            "data.classes", selection, f"the name fits {len(found)} synsets, pass one's wnid: {candidates}"
        )
    if not found:
        raise ConfigError("data.classes", selection, f"no such list, file, wnid or WordNet name; {ALLOWED}")
    wnids = ilsvrc_classes_under(found[0])
    return ClassSelection(wnids, f"{_describe(found[0])}: {_classes(len(wnids), 'ILSVRC ')}")


def select_classes(
    selection: str | Sequence[str] | None, sample: int | None = None, seed: int = 0
) -> ClassSelection | None:
    """The classes ``data.classes`` names (None: every class of the dataset), or ``sample`` of them drawn with
    ``seed``. A list is taken as given, unchecked against WordNet (a custom dataset's folders may have other names):
    the caller checks the classes against the dataset."""
    if selection is None:
        if sample is not None:
            raise ConfigError("data.sample_classes", sample, "set data.classes too, e.g. n00001740 (entity: all 1000)")
        return None
    if isinstance(selection, str):
        chosen = _resolve(selection.strip())
    elif not isinstance(selection, Sequence):
        raise ConfigError("data.classes", selection, ALLOWED)
    else:
        names = list(selection)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise ConfigError("data.classes", names, "a non-empty list of class folder names (quoted strings)")
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        if repeated:
            raise ConfigError("data.classes", names, f"each class once; repeated: {', '.join(repeated)}")
        chosen = ClassSelection(tuple(sorted(names)), f"{_classes(len(names))} listed in data.classes")
    if sample is None:
        return chosen
    count = len(chosen.wnids)
    if not (isinstance(sample, int) and not isinstance(sample, bool) and 1 <= sample <= count):
        raise ConfigError("data.sample_classes", sample, f"null or a whole number 1..{count} ({chosen.description})")
    drawn = random.Random(seed).sample(chosen.wnids, sample)
    return ClassSelection(tuple(sorted(drawn)), f"{chosen.description}, {sample} of them drawn with seed {seed}")
