"""The code stays clean: ruff's checks (pyflakes, pycodestyle, bugbear, import order) as configured in pyproject."""

from __future__ import annotations

import subprocess
import sys

from .conftest import PROJECT_ROOT


def test_ruff_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(PROJECT_ROOT)], capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
