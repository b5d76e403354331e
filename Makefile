# Set-up and entry points. Each target creates the project's virtual environment first when it is missing or
# older than the requirements.
PYTHON ?= python3.11
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: train history test test-fast bench report mutation

$(INSTALLED): requirements.txt requirements-test.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq -r requirements-test.txt
	$(VENV)/bin/pip install -qq --no-deps --no-build-isolation -e .
	touch $@

## The main job: ResNet-18 on the embedded demo dataset (generated on first use), on the CPU. ARGS=... adds overrides.
train: $(INSTALLED)
	$(VENV)/bin/python train.py experiment=demo $(ARGS)

## The history in miniature: AlexNet, VGG-11 (BN) and ResNet-18 trained on the demo data one after the other (a
## Hydra sweep, each with experiment_model/demo/<model>.yaml's settings), then report.py overlays their top-1/top-5
## accuracy and error per epoch and their images/s in HISTORY_DIR/report/*.png. MODELS=... other models; ARGS=...
## adds overrides to every job.
MODELS = alexnet,vgg11_bn,resnet18
HISTORY_DIR := outputs/train/history/$(shell date +%Y-%m-%d_%H-%M-%S)
history: $(INSTALLED)
	$(VENV)/bin/python train.py -m experiment=demo model=$(MODELS) hydra.sweep.dir=$(HISTORY_DIR) $(ARGS)
	$(VENV)/bin/python report.py $(HISTORY_DIR)

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
