"""The conda environment and the pip requirements pin the same packages, and those are what is installed."""

from __future__ import annotations

from importlib.metadata import version

import yaml

from .conftest import PROJECT_ROOT


def _pip_pins() -> list[str]:
    lines = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == [*_pip_pins(), "-e ."]  # the pins, then the project itself


def test_the_project_is_installed_as_a_package(tmp_path):
    """Its modules import by name from any folder, as the benchmarks and scripts rely on."""
    import subprocess
    import sys

    probe = "import assemble, compat, data.spec, sweeps.summary, loggers.wandb_logger; print(data.spec.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == str(PROJECT_ROOT / "data" / "spec.py"), result.stderr


def test_installed_versions_are_the_pinned_ones():
    for pin in _pip_pins():
        name, pinned = pin.split("==")
        assert version(name) == pinned, name
