"""Evaluation sets beside ILSVRC-2012 val, read as a layout whose val split is the set (eval.py's ``test_sets``):

    <root>/0/ ... <root>/999/*.jpeg      ImageNet-V2 (Recht et al. 2019; matched-frequency, threshold-0.7 and
                                         top-images alike): folders named by ILSVRC-2012 class index
    <root>/<wnid>/*.jpg                  wnid folders: ImageNet-A and -R (200 classes), ImageNet-Sketch (1000)

The class index is the set's sorted wnids, as for every layout of the project; eval.py matches it to the model's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from data.ilsvrc import DatasetLayoutError, ILSVRCLayout, Split, scan_class_folders, subfolders, wordnet_names

WNID = re.compile(r"n\d{8}")


def load_eval_set(root: str | os.PathLike) -> ILSVRCLayout:
    """The set at ``root`` as a layout without train images; a folder that is neither a class index of 0..999 nor a
    wnid, or a mix of the two, is an error naming it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"evaluation set {root} does not exist or is not a directory (test_sets=[...])")
    folders = subfolders(root)
    if not folders:
        raise DatasetLayoutError(
            f"{root} has no class folders: expected ImageNet-V2's {root}/<0..999>/ or {root}/<wnid>/ (ImageNet-A, -R, "
            "-Sketch)"
        )
    ilsvrc = sorted(wordnet_names())  # the standard 0..999 index is the sorted wnids of the 1000 classes
    by_index = all(name.isdigit() for name in folders)
    for name in folders:
        if by_index and (name != str(int(name)) or int(name) >= len(ilsvrc)):
            raise DatasetLayoutError(f"{root / name}: an ImageNet-V2 folder is named by a class index 0..999")
        if not by_index and not WNID.fullmatch(name):
            raise DatasetLayoutError(
                f"{root / name}: expected class folders named all by ILSVRC class index (ImageNet-V2) or all by wnid "
                "(ImageNet-A, -R, -Sketch)"
            )
    wnid_of = {name: ilsvrc[int(name)] if by_index else name for name in folders}
    wnids = sorted(wnid_of.values())
    index = {folder: wnids.index(wnid) for folder, wnid in wnid_of.items()}
    images = scan_class_folders(root, index)
    if not len(images):
        raise DatasetLayoutError(f"{root} holds no images in its class folders")
    names = wordnet_names()
    return ILSVRCLayout(root, wnids, [names.get(w, w) for w in wnids], Split([], []), images)
