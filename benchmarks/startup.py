"""Start-up to the first training step on a tree of many files, with several CPU ranks, a cold and a warm index
cache: seconds, and each rank's ``os.stat`` and ``os.scandir`` calls on the dataset.

    python -m benchmarks.startup FOLDER [--files 200000] [--ranks 8] [--launcher lightning torchrun]
        [--project CHECKOUT] [--json F]

FOLDER gets a tree in the ILSVRC layout, built once: ``--files`` hard links of the 1000 ILSVRC samples in ../shared
(19 train to 1 val, over their 1000 classes). Each run is CHECKOUT's train.py (default: this one; another is a
``git worktree add`` of an earlier commit) with ``trainer=ddp trainer.accelerator=cpu trainer.devices=RANKS``,
ResNet-18 at 32 px, one step of batch 2 and no validation: first with a fresh cache folder (cold), then again with
it (warm). ``lightning``: Lightning starts the other ranks after its own start-up; ``torchrun``: every rank starts
at once, as srun starts them.

Counting: a ``sitecustomize`` on PYTHONPATH (``DatasetCallCounter``) wraps os.stat, os.lstat, os.scandir and
os.listdir in every Python process of the run (os.path and pathlib call them; an audit hook would not see
os.stat), and each process writes its calls on paths in the tree when it ends, under its rank (a rank's forked
workers inherit its rank). What C code does itself (a decoder opening a file, ``DirEntry.is_file``) is not counted.
This module is imported by that sitecustomize in every process, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT_ROOT.parent / "shared" / "data" / "imagenet-samples"
COUNT_ROOT_ENV = "STARTUP_COUNT_ROOT"  # the tree whose paths are counted
COUNT_DIR_ENV = "STARTUP_COUNT_DIR"  # where each process writes <pid>.json
COUNTED_CALLS = ("stat", "lstat", "scandir", "listdir")
SITECUSTOMIZE = "from benchmarks.startup import DatasetCallCounter\n\nDatasetCallCounter.from_environment()\n"
COMPLETE = ".complete"
# the datamodule's "Dataset ..." line: a rank has its indexed layout (Hydra's log format: local time, milliseconds)
DATASET_LINE = re.compile(r"^\[([\d-]+ [\d:]+,\d{3})\]\[data\.datamodule\]\[INFO\] - Dataset ", re.MULTILINE)


class DatasetCallCounter:
    """This process's ``COUNTED_CALLS`` on ``root`` or a path below it, written to ``folder/<pid>.json`` with its
    rank when the process ends."""

    def __init__(self, root: str, folder: str) -> None:
        self.root, self.folder = os.path.normpath(root), folder
        self.counts: Counter[str] = Counter()
        self._exit = os._exit

    @classmethod
    def from_environment(cls) -> None:
        """Counts in this process when the environment names a tree (``counting_environment``)."""
        if COUNT_ROOT_ENV in os.environ:
            cls(os.environ[COUNT_ROOT_ENV], os.environ[COUNT_DIR_ENV]).install()

    def install(self) -> None:
        for name in COUNTED_CALLS:
            setattr(os, name, self._counting(name, getattr(os, name)))
        atexit.register(self.write)
        os.register_at_fork(after_in_child=self._forked)

    def _counting(self, name: str, call: Callable) -> Callable:
        below = os.path.join(self.root, "")

        @functools.wraps(call)
        def counted(*args, **kwargs):
            path = args[0] if args else kwargs.get("path")
            if isinstance(path, str | bytes | os.PathLike):
                text = os.fsdecode(path)
                if text == self.root or text.startswith(below):
                    self.counts[name] += 1
            return call(*args, **kwargs)

        return counted

    def _forked(self) -> None:
        """A forked child counts its own calls, and writes them when it ends with os._exit too (multiprocessing's
        workers do, without atexit)."""
        self.counts = Counter()

        def exit_writing(code: int) -> None:
            self.write()
            self._exit(code)

        os._exit = exit_writing

    def write(self) -> None:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        record = {"rank": rank, "pid": os.getpid(), "argv": sys.argv, "calls": self.counts}
        Path(self.folder, f"{os.getpid()}.json").write_text(json.dumps(record))


def counting_environment(root: Path, folder: Path) -> dict[str, str]:
    """Environment variables under which every Python process started counts its calls on ``root`` into
    ``folder`` (read them back with ``calls_per_rank``)."""
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, COUNT_ROOT_ENV: str(root), COUNT_DIR_ENV: str(folder)}


def calls_per_rank(folder: Path) -> dict[int, Counter[str]]:
    """rank -> its processes' calls (the rank's own and its workers'), from the files ``DatasetCallCounter`` wrote."""
    ranks: dict[int, Counter[str]] = {}
    for path in folder.glob("*.json"):
        record = json.loads(path.read_text())
        ranks.setdefault(record["rank"], Counter()).update(record["calls"])
    return dict(sorted(ranks.items()))


def first_step_clock(folder: str):
    """A callback that writes the time of this rank's first training step to ``folder/rank<N>.json``. Its class is
    made here: the sitecustomize imports this module in processes that never load Lightning."""
    import pytorch_lightning as pl

    class FirstStepClock(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
            path = Path(folder, f"rank{trainer.global_rank}.json")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"time": time.time()}))

    return FirstStepClock()


def build_tree(folder: Path, files: int, samples: Path = SAMPLES) -> Path:
    """The ILSVRC layout in ``folder/tree`` with ``files`` images, hard links of the samples (copied once into
    ``folder``: a link cannot cross file systems), 19 train to 1 val in each sample's class. Built once."""
    tree = folder / "tree"
    if (tree / COMPLETE).is_file():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    originals = folder / "originals"
    shutil.copytree(samples, originals, dirs_exist_ok=True)
    jpegs = sorted(originals.glob("n*_*.JPEG"))
    per_class = max(1, files // len(jpegs))
    val = max(1, per_class // 20)
    for jpeg in jpegs:
        wnid = jpeg.name.split("_")[0]
        for split, count in (("train", per_class - val), ("val", val)):
            (tree / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                os.link(jpeg, tree / split / wnid / f"{wnid}_{split}_{i}.JPEG")
    (tree / COMPLETE).touch()
    return tree


def run_to_first_step(project: Path, tree: Path, cache: Path, work: Path, ranks: int, launcher: str) -> dict:
    """One start of ``project``'s train.py up to its first step: seconds until the last rank has the dataset's
    layout, until its first step and to the end, and every rank's counted calls."""
    clock, counts = work / "clock", work / "counts"
    shutil.rmtree(work, ignore_errors=True)
    overrides = [
        "data=imagenet",
        f"data.root={tree}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={work / 'run'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={ranks}",
        "model=resnet18",
        "data.spec.image_size=32",
        "data.spec.val_resize_size=36",
        "data.batch_size=2",
        "data.num_workers=0",
        "+trainer.max_steps=1",
        "+trainer.limit_val_batches=0",
        "+trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint=null",
        "+callbacks.first_step._target_=benchmarks.startup.first_step_clock",
        f"+callbacks.first_step.folder={clock}",
    ]
    starter = [sys.executable]
    if launcher == "torchrun":
        starter += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    environment = {**os.environ, **counting_environment(tree, counts)}
    start = time.time()
    result = subprocess.run(
        [*starter, str(project / "train.py"), *overrides], cwd=project, env=environment, capture_output=True, text=True
    )
    end = time.time()
    (work / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed (log in {work / 'log.txt'}):\n{result.stderr[-3000:]}")
    first_steps = [json.loads(path.read_text())["time"] for path in clock.glob("rank*.json")]
    datasets = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t in DATASET_LINE.findall(result.stdout)]
    if len(first_steps) != ranks or len(datasets) != ranks:
        raise SystemExit(f"not every rank logged its dataset and reached a step (log in {work / 'log.txt'})")
    return {
        "seconds_to_dataset": max(datasets) - start,
        "seconds_to_first_step": max(first_steps) - start,
        "seconds_total": end - start,
        "calls": {rank: dict(calls) for rank, calls in calls_per_rank(counts).items()},
    }


def _per_rank(calls: dict[int, dict[str, int]], names: tuple[str, ...]) -> str:
    return " / ".join(str(sum(calls[rank].get(name, 0) for name in names)) for rank in sorted(calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the tree, the cache and the runs go (not in the project)")
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--launcher", nargs="+", choices=("lightning", "torchrun"), default=["lightning", "torchrun"])
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT, help="the checkout whose train.py runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tree = build_tree(args.folder, args.files)
    project = args.project.resolve()
    results = []
    print(f"{project} on {tree} ({args.files:,} files), {args.ranks} CPU ranks")
    print(
        f"{'launcher':<10}{'cache':<6}{'s to data':>10}{'s to step 1':>12}{'s total':>9}"
        "  stat+lstat per rank / scandir+listdir"
    )
    for launcher in args.launcher:
        cache = args.folder / "runs" / launcher / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
            work = args.folder / "runs" / launcher / state
            result = run_to_first_step(project, tree, cache, work, args.ranks, launcher)
            results.append({"launcher": launcher, "cache": state, **result})
            stats, scans = (
                _per_rank(result["calls"], ("stat", "lstat")),
                _per_rank(result["calls"], ("scandir", "listdir")),
            )
            print(
                f"{launcher:<10}{state:<6}{result['seconds_to_dataset']:10.1f}{result['seconds_to_first_step']:12.1f}"
                f"{result['seconds_total']:9.1f}"
                f"  {stats}  /  {scans}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"project": str(project), "files": args.files, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
