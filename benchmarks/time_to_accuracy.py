"""The speed side of time to accuracy (issue 18): the trainer's images/s at each size of a progressive-resizing ramp,
the per-step cost of a moving average of the weights and of MixUp/CutMix, and how often ``model.compile`` compiles
the network through a ramp.

    python -m benchmarks.time_to_accuracy [--out DIR] [--sizes 160,192,224] [--repeats 4] [--warmup 2] [--windows 4]
                                          [--window-steps 3] [--only sizes,costs,compiles] [--compile-batches 2]
                                          [hydra overrides ...]

Each run is benchmarks/suite.py's ``trainer`` measurement (this project's Lightning trainer end to end from the JPEG
files, the configured callbacks and loggers; images/s of timed windows after a warmup) of the configuration the
overrides make; without an ``experiment=`` override: ``experiment=demo data.batch_size=8``, ResNet-18 on the demo's
JPEGs: about 0.6 s a step at 224 px on the 2-core development VM, so that a round of the five runs takes about a
minute (ResNet-50 has 2.3x its FLOPs, the demo's batch of 50 6x its images).

- ``sizes``: images/s at each of ``--sizes`` against what the pixel count promises, images/s(r) / (images/s(L) x
  (L / r)^2) with L the largest size, taken within a round: 1 where a step's whole cost grows with the pixels.
- ``costs``: at the largest size, a run with ``model.ema`` (decay 0.9999 after every step: the worst case) and one
  with ``model.mixing`` (MixUp 0.2, CutMix 1.0, one of the two per batch), each switched off in every other pair of
  timed windows (off, on, on, off, ...): the step-time cost, the on windows' step time over the off windows' - 1,
  within one process, loader and moment: separate runs of one configuration differed by 5-10% on the 2 shared
  cores of the development VM, more than the 3% to be told apart.
  Each is also timed alone on the trained module (one EMA update, one mixing of the run's last batch).
- ``compiles``: ``model.compile=true`` through a ``data.resolution`` ramp over ``--sizes`` (one epoch per size,
  ``--compile-batches`` train batches and one val batch each): TorchDynamo's compilations of the network
  (``compat.dynamo_compilations``) against the distinct inputs it was given (train or eval, batch shape), with the
  guard that made each compile again. Inductor's cache is a new folder (TORCHINDUCTOR_CACHE_DIR is set to it), so
  the seconds are those of a first run.

Every run once per round, every other round in reverse order, so that a drift in the machine's speed falls on both
sides of the size ratios; ratios and costs are reported as the median, min and max over the rounds. Writes
``DIR/time_to_accuracy.json`` and a table (``DIR/time_to_accuracy.md``, also printed) after each round and section,
so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from benchmarks.suite import Setup, compose_config, machine, measure_trainer, summarise
from compat import dynamo_compilations
from data.resolution import ResolutionRamp

SECTIONS = ("sizes", "costs", "compiles")
DEMO = ["experiment=demo", "data.batch_size=8"]
FEATURES = {  # the module's attribute: (the overrides that set it, what the table calls it)
    "ema": (["model.ema.decay=0.9999", "model.ema.every_n_steps=1"], "EMA (decay 0.9999, every step)"),
    "mixing": (["model.mixing.mixup_alpha=0.2", "model.mixing.cutmix_alpha=1.0"], "MixUp 0.2 / CutMix 1.0"),
}


def size_overrides(size: int) -> list[str]:
    """The train crop at ``size``, the val resize at size / 0.875 (224: 256), which the spec wants >= the crop."""
    return [f"data.spec.image_size={size}", f"data.spec.val_resize_size={round(size / 0.875)}"]


def ramp_of(sizes: list[int]) -> ResolutionRamp:
    """The ramp that trains epoch i at ``sizes[i]``; a ValueError where no linear ramp does."""
    ramp = ResolutionRamp(sizes[0], sizes[-1], 0, len(sizes) - 1, math.gcd(*sizes))
    if ramp.sizes(len(sizes)) != sizes:
        raise ValueError(f"--sizes {sizes}: not the sizes of a linear ramp (one would give {ramp.sizes(len(sizes))})")
    return ramp


def switched_on(window: int) -> bool:
    """Whether a feature is on in timed window ``window`` (from 0) of a cost run: off, on, on, off, off, on, ..."""
    return window % 4 in (1, 2)


class Switch(pl.Callback):
    """Sets the module's ``feature`` (``ema`` or ``mixing``) to None in the timed windows ``switched_on`` leaves off
    (on through the warmup), and back at the end; records which steps had it (``on``) and keeps the last train batch,
    for timing the mixing alone."""

    def __init__(self, feature: str, warmup: int, window_steps: int) -> None:
        self.feature, self.warmup, self.window_steps = feature, warmup, window_steps
        self.kept, self.batch, self.on = None, None, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.kept = getattr(pl_module, self.feature)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = len(self.on)
        on = step < self.warmup or switched_on((step - self.warmup) // self.window_steps)
        setattr(pl_module, self.feature, self.kept if on else None)
        self.batch = batch
        self.on.append(getattr(pl_module, self.feature) is not None)

    def on_train_end(self, trainer, pl_module) -> None:
        setattr(pl_module, self.feature, self.kept)


def time_alone(setup: Setup, work: Callable[[int], object], calls: int = 10) -> float:
    """Milliseconds per call of ``work(i)`` after one untimed call, the device synchronised around the timing."""
    sync = torch.cuda.synchronize if setup.device.type == "cuda" else lambda: None
    work(-1)
    sync()
    start = time.perf_counter()
    for i in range(calls):
        work(i)
    sync()
    return 1000 * (time.perf_counter() - start) / calls


def alone_ms(setup: Setup, switch: Switch) -> float:
    """One EMA update, or one mixing of the run's last batch, on the module the run trained."""
    module, kept = setup.module, switch.kept
    if switch.feature == "ema":
        return time_alone(setup, lambda i: kept.update(module.ema_net, module.net))
    images, labels = switch.batch
    return time_alone(setup, lambda i: kept(images, labels, key=(0, i, 0)))


def measure_round(
    overrides: list[str], run_dir: str, runs: dict[str, list[str]], reverse: bool, timing: dict[str, int], results: dict
) -> str:
    """Each run of ``runs`` once, in reverse order if asked, its summary (benchmarks.suite.summarise; a cost run's
    with ``alone_ms``) appended to ``results[name]``; the device they ran on."""
    steps = timing["warmup"] + timing["windows"] * timing["window_steps"]
    for name in list(runs)[::-1] if reverse else list(runs):
        cfg = compose_config([*overrides, *runs[name]], run_dir)
        if name in FEATURES:  # a Switch of this module (``__main__`` when run with -m), as Hydra instantiates it
            switch = {"_target_": f"{Switch.__module__}.Switch", "feature": name, "warmup": timing["warmup"]}
            with open_dict(cfg):
                cfg.callbacks = OmegaConf.merge(
                    cfg.callbacks or {}, {"switch": {**switch, "window_steps": timing["window_steps"]}}
                )
        setup, clock = measure_trainer(cfg, steps)
        result = summarise([clock], setup.batch, **timing)
        if name in FEATURES:
            switch = next(c for c in setup.trainer.callbacks if isinstance(c, Switch))
            result |= {"on_in_timed_steps": switch.on[timing["warmup"] :], "alone_ms": alone_ms(setup, switch)}
        results.setdefault(name, []).append(result)
        device = str(setup.device)
        del setup
        gc.collect()  # the run's loader workers or pipeline, and its device memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return device


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def on_and_off(run: dict) -> tuple[float, float]:
    """A cost run's seconds per image in its on windows and in its off windows (each the mean over its windows)."""
    windows = run["images_per_s_windows"]
    on = statistics.mean(1 / rate for i, rate in enumerate(windows) if switched_on(i))
    return on, statistics.mean(1 / rate for i, rate in enumerate(windows) if not switched_on(i))


def throughput_sections(results: dict[str, list[dict]], sizes: list[int], only: tuple[str, ...], batch: int) -> dict:
    """The ``sizes`` and ``costs`` sections from the runs' summaries."""
    report = {}
    if "sizes" in only:
        largest = [run["images_per_s"] for run in results[str(sizes[-1])]]
        report["sizes"] = {
            str(size): {
                "images_per_s": spread([run["images_per_s"] for run in results[str(size)]]),
                "step_p50_ms": statistics.median(run["step_time_ms"]["p50"] for run in results[str(size)]),
                "of_pixel_scaling": spread(
                    [
                        run["images_per_s"] / (big * (sizes[-1] / size) ** 2)
                        for run, big in zip(results[str(size)], largest)
                    ]
                ),
            }
            for size in sizes
        }
    if "costs" in only:
        report["costs"] = {"size": sizes[-1]}
        for name in FEATURES:
            seconds = [on_and_off(run) for run in results[name]]
            report["costs"][name] = {
                "overrides": FEATURES[name][0],
                "images_per_s_on": spread([1 / on for on, _ in seconds]),
                "images_per_s_off": spread([1 / off for _, off in seconds]),
                "cost": spread([on / off - 1 for on, off in seconds]),
                "alone_ms": spread([run["alone_ms"] for run in results[name]]),
                "alone_of_step": spread(
                    [run["alone_ms"] / (1000 * batch * off) for run, (_, off) in zip(results[name], seconds)]
                ),
            }
    return report


class InputShapes(pl.Callback):
    """The distinct inputs the network is given, in order: (train or eval, batch shape)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def _add(self, mode: str, batch) -> None:
        if (mode, tuple(batch[0].shape)) not in self.seen:
            self.seen.append((mode, tuple(batch[0].shape)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._add("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._add("eval", batch)


def count_compilations(overrides: list[str], run_dir: str, sizes: list[int], batches: int) -> dict:
    """A compiled run through the ramp over ``sizes``: the compilations against the distinct inputs."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(run_dir) / "inductor")  # read at each compile
    cfg = compose_config([*overrides, *size_overrides(sizes[-1]), "model.compile=true"], run_dir)
    ramp = ramp_of(sizes)
    with open_dict(cfg):
        cfg.data.resolution = {"_target_": "data.resolution.ResolutionRamp", **asdict(ramp)}
    shapes = InputShapes()
    setup = Setup(
        cfg,
        max_epochs=len(sizes),
        limit_train_batches=batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[shapes],
        logger=False,
    )
    before = {record["id"] for record in dynamo_compilations()}
    start = time.perf_counter()
    setup.trainer.fit(setup.module, datamodule=setup.datamodule)
    seconds = time.perf_counter() - start
    compiled = [record for record in dynamo_compilations() if record["id"] not in before]
    return {
        "sizes": sizes,
        "train_batches_per_epoch": batches,
        "val_batches_per_epoch": 1,
        "inputs": [{"mode": mode, "shape": list(shape)} for mode, shape in shapes.seen],
        "distinct_inputs": len(shapes.seen),
        "compilations": len(compiled),
        "at_most_one_per_input": len(compiled) <= len(shapes.seen),
        "records": compiled,
        "fit_seconds": seconds,
        "device": str(setup.device),
    }


def _cell(spread_: dict, fmt: str) -> str:
    return f"{spread_['median']:{fmt}} ({spread_['min']:{fmt}} / {spread_['max']:{fmt}})"


def table(report: dict) -> str:
    """The sections measured so far as Markdown, with the configuration and the machine above them."""
    c, m = report["config"], report["machine"]
    lines = [
        f"{c['model']}, batch {c['batch']}, {c['precision']}, channels_last {c['channels_last']}, data "
        f"{c['data_loader']}, on {c['device']} ({m['gpu'] or m['cpu']}; {m['cpu_cores']} CPU cores); torch "
        f"{m['torch']}, Lightning {m['pytorch_lightning']}",
    ]
    if c["rounds"]:
        lines[0] += (
            f"; {c['rounds']} of {c['repeats']} rounds, each run {c['windows']} windows of {c['window_steps']} steps "
            f"after {c['warmup']}; median (min / max) over the rounds"
        )
    if "sizes" in report:
        lines += [
            "",
            "| train size | img/s | step p50 (ms) | img/s / (the largest size's img/s x (L/r)^2) |",
            "|---|---|---|---|",
        ]
        for size, row in report["sizes"].items():
            lines.append(
                f"| {size} px | {_cell(row['images_per_s'], '.2f')} | {row['step_p50_ms']:.0f} | "
                f"{_cell(row['of_pixel_scaling'], '.3f')} |"
            )
    if "costs" in report:
        lines += [
            "",
            f"| at {report['costs']['size']} px, switched off and on by window in one run | img/s off | img/s on | "
            "step-time cost | alone: ms per step (of an off step) |",
            "|---|---|---|---|---|",
        ]
        for name, (_, label) in FEATURES.items():
            row = report["costs"][name]
            cost = row["cost"]
            lines.append(
                f"| {label} | {_cell(row['images_per_s_off'], '.2f')} | {_cell(row['images_per_s_on'], '.2f')} | "
                f"{cost['median']:+.1%} ({cost['min']:+.1%} / {cost['max']:+.1%}) | "
                f"{row['alone_ms']['median']:.2f} ({row['alone_of_step']['median']:.2%}) |"
            )
    compiles = report.get("compiles")
    if compiles:
        inputs = ", ".join(f"{i['mode']} {'x'.join(map(str, i['shape']))}" for i in compiles["inputs"])
        lines += [
            "",
            f"model.compile=true through a ramp of {' -> '.join(map(str, compiles['sizes']))} px (an epoch each: "
            f"{compiles['train_batches_per_epoch']} train batches, {compiles['val_batches_per_epoch']} val batch) on "
            f"{compiles['device']}: **{compiles['compilations']} compilations for {compiles['distinct_inputs']} "
            f"distinct inputs** ({inputs}); the fit took {compiles['fit_seconds']:.0f} s (inductor's "
            "cache a new folder: a first run's compilations).",
            "",
            "| compilation | function | seconds | why it compiled again (the first failed guard dynamo names) |",
            "|---|---|---|---|",
        ]
        for record in compiles["records"]:
            reason = (record["recompile_reason"] or "first call").replace("|", "\\|").replace("\n", "; ")
            seconds = "" if record["seconds"] is None else f"{record['seconds']:.1f}"
            failure = f" (failed: {record['failure']})" if record["failure"] else ""
            lines.append(f"| {record['id']} | {record['function']}{failure} | {seconds} | {reason} |")
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    (out / "time_to_accuracy.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "time_to_accuracy.md").write_text(table(report) + "\n")


def describe(cfg: DictConfig) -> dict:
    return {
        "model": cfg.model.net.arch,
        "batch": cfg.data.batch_size,
        "precision": str(cfg.trainer.precision),
        "channels_last": cfg.model.channels_last,
        "optimizer_fused": cfg.optimizer.get("fused"),
        "data_loader": cfg.data.loader._target_.rsplit(".", 1)[-1],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/time_to_accuracy") / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    parser.add_argument("--sizes", default="160,192,224", help="train crop sizes, ascending: a ramp's epochs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--windows", type=int, default=4, help="timed windows per run (a cost run: >= 2)")
    parser.add_argument("--window-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4, help="rounds: each configuration once per round")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--compile-batches", type=int, default=2, help="train batches per epoch of the compiled run")
    args, overrides = parser.parse_known_args(argv)
    only = tuple(args.only.split(","))
    sizes = [int(size) for size in args.sizes.split(",")]
    counts = (args.warmup, args.windows, args.window_steps, args.repeats, args.compile_batches)
    if any(name not in SECTIONS for name in only) or min(counts) < 1 or ("costs" in only and args.windows < 2):
        parser.error(
            f"--only takes {', '.join(SECTIONS)} (got {args.only}); the counts must be >= 1, --windows >= 2 for the "
            "costs (an off and an on window)"
        )
    try:
        ramp_of(sizes)
    except ValueError as error:
        parser.error(str(error))
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = [*DEMO, *overrides]
    timing = {"warmup": args.warmup, "windows": args.windows, "window_steps": args.window_steps}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(overrides, run_dir)
        report = {
            "config": {**describe(cfg), "sizes": sizes, "repeats": args.repeats, "rounds": 0, **timing, "device": None},
            "machine": machine(),
            "overrides": overrides,
        }
        if {"sizes", "costs"} & set(only):
            runs = {str(size): size_overrides(size) for size in sizes} if "sizes" in only else {}
            if "costs" in only:
                runs |= {name: [*size_overrides(sizes[-1]), *FEATURES[name][0]] for name in FEATURES}
            report["runs"] = {}
            for round_ in range(args.repeats):
                device = measure_round(overrides, run_dir, runs, round_ % 2 == 1, timing, report["runs"])
                report["config"] |= {"device": device, "rounds": round_ + 1}
                report |= throughput_sections(report["runs"], sizes, only, cfg.data.batch_size)
                write(report, args.out)
        if "compiles" in only:
            report["compiles"] = count_compilations(overrides, run_dir, sizes, args.compile_batches)
            report["config"]["device"] = report["config"]["device"] or report["compiles"]["device"]
            write(report, args.out)
    print(table(report))
    print(f"\nwritten: {args.out / 'time_to_accuracy.json'}, {args.out / 'time_to_accuracy.md'}")
    return report


if __name__ == "__main__":
    main()
