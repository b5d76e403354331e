# Set-up and entry points. Each target creates the project's virtual environment first when it is missing or
# older than the requirements.
PYTHON ?= python3.11
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: train test test-fast bench report mutation

$(INSTALLED): requirements.txt requirements-test.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq -r requirements-test.txt
	$(VENV)/bin/pip install -qq --no-deps --no-build-isolation -e .
	touch $@

## The main job: ResNet-18 on the embedded demo dataset (generated on first use), on the CPU. ARGS=... adds overrides.
train: $(INSTALLED)
	$(VENV)/bin/python train.py experiment=demo $(ARGS)

## Every test, as CI runs them (slow, slurm and gpu markers included; gpu ones skip without a GPU).
test: $(INSTALLED)
	$(VENV)/bin/python -m pytest $(ARGS)

## The fast tests only.
test-fast: $(INSTALLED)
	$(VENV)/bin/python -m pytest -m "not slow and not slurm" $(ARGS)

## The benchmark suite (benchmarks/suite.py): data alone, synthetic compute ceiling, trainer, plain loop; JSON + table.
bench: $(INSTALLED)
	$(VENV)/bin/python -m benchmarks.suite $(ARGS)

## PNG plots of a run or sweep folder: make report ARGS=outputs/train/<run id>
report: $(INSTALLED)
	$(VENV)/bin/python report.py $(ARGS)

## The mutation check (not in CI): plant each bug of tests/mutants.toml in a copy of the tree, run its tests, score.
mutation: $(INSTALLED)
	$(VENV)/bin/python scripts/mutation_check.py $(ARGS)
