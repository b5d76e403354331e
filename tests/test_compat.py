"""compat.py holds every private Lightning and Hydra API the project uses, checked against the versions it names."""

from __future__ import annotations

import re
from importlib import metadata

from compat import WRITTEN_FOR
from tests.conftest import PROJECT_ROOT

PRIVATE_USE = re.compile(
    r"from (pytorch_lightning|lightning_fabric|lightning|hydra)[\w.]* import .*\b_[A-Za-z]"  # private names
    r"|(pytorch_lightning|lightning_fabric|hydra)(\.\w+)*\._\w"  # private modules
    r"|\.(fit_loop|epoch_loop|_return_value|_update_metrics|_initialize_train_progress_bar_id|hpc_save_path)\b"
    r"|\blive\._lock\b"  # rich's
)


def test_installed_versions_are_those_compat_was_written_for():
    installed = {name: metadata.version(name) for name in WRITTEN_FOR}
    assert installed == WRITTEN_FOR, (
        f"compat.py was written for {WRITTEN_FOR} and this environment has {installed}: private APIs change without "
        "notice, so check each function of compat.py against the installed versions, then update WRITTEN_FOR"
    )


def test_no_private_library_api_outside_compat():
    sources = [p for p in PROJECT_ROOT.rglob("*.py") if not {".venv", "tests"} & set(p.relative_to(PROJECT_ROOT).parts)]
    uses = [
        f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}"
        for path in sources
        if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_USE.search(line)
    ]
    assert not uses, "private Lightning/Hydra APIs belong in compat.py:\n" + "\n".join(uses)
