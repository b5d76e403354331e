"""The benchmark suite: how fast a configured run trains, and what bounds it.

    python -m benchmarks.suite [--out DIR] [--windows 5] [--window-steps 20] [--warmup 10] [--repeats 1]
                               [--only data,synthetic,trainer,loop] [hydra overrides ...]

For the model, batch, precision and data backend the overrides configure (default: experiment=demo), on one
device: (a) ``data``, the train data pipeline alone, batches delivered on the device and normalised; (b)
``synthetic``, training on random tensors already on the device, shaped like the pipeline's batches: the compute
ceiling; (c) ``trainer``, this project's Lightning trainer end to end from the JPEG files, with the configured
callbacks and loggers; (d) ``loop``, a plain PyTorch loop over the same loader, model, optimizer and schedule.
Each reports images/s (median of ``--windows`` timed windows after ``--warmup`` steps, over ``--repeats`` runs
taken in turn), step-time percentiles, the fraction of time spent waiting for data, peak memory and the model
FLOPs utilisation; the machine and the versions go with them into ``DIR/bench.json`` and a table
(``DIR/bench.md``, also printed).

Step times come from CUDA events on a GPU (no synchronisation inside a window) and the host clock on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.flop_counter import FlopCounterMode

from assemble import (
    instantiate_all,
    training_module,
)
from data.placement import half_dtype

PROJECT_ROOT = Path(__file__).resolve().parents[1]

MEASUREMENTS = ("data", "synthetic", "trainer", "loop")
# Dense bf16/fp16 tensor-core peaks from the vendor's data sheets (FLOP/s), by a part of the device name.
GPU_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


class StepClock:
    """End-of-step marks and data waits; durations read only when a measurement ends (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.waits: list[float] = []
        self.start = self.first_step_end = 0.0

    def started(self) -> None:
        self.start = time.perf_counter()

    def mark(self) -> None:
        if not self.marks:
            self.first_step_end = time.perf_counter()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds_between_marks(self) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]


def summarise(clocks: list[StepClock], batch: int, warmup: int, windows: int, window_steps: int) -> dict:
    """Images/s per window over all repeats (median reported), step-time percentiles and the data-wait fraction
    of the timed steps."""
    steps, waits, rates = [], [], []
    for clock in clocks:
        timed = clock.seconds_between_marks()[warmup - 1 :][: windows * window_steps]  # mark k ends step k
        if len(timed) < windows * window_steps:
            raise RuntimeError(f"only {len(timed)} timed steps were recorded, {windows * window_steps} were asked for")
        rates += [window_steps * batch / sum(timed[i : i + window_steps]) for i in range(0, len(timed), window_steps)]
        steps += timed
        waits += clock.waits[warmup : warmup + len(timed)]
    quantiles = statistics.quantiles(steps, n=100, method="inclusive")
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_windows": rates,
        "step_time_ms": {"p50": 1000 * quantiles[49], "p90": 1000 * quantiles[89], "p99": 1000 * quantiles[98]},
        "data_wait_fraction": min(1.0, sum(waits) / sum(steps)) if waits else None,
        "timed_steps": len(steps),
        "first_step_s": clocks[0].first_step_end - clocks[0].start,  # with torch.compile's compilation, if on
    }


def compose_config(overrides: list[str], output_dir: str) -> DictConfig:
    """conf/train.yaml as train.py composes it, on one device, run folder under ``output_dir``."""
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        default = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=demo"]
        cfg = compose("train", overrides=[*default, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = output_dir
        cfg.trainer.devices = 1  # one device: a multi-process launch would re-run this script per rank
        cfg.trainer.enable_progress_bar = False  # (the progress callback follows it)
        cfg.trainer.pop("strategy", None)
        cfg.trainer.pop("num_nodes", None)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


class Setup:
    """The configured datamodule, module and a trainer (the fitted one for ``trainer``, an idle one otherwise,
    which tells the datamodule its device and precision)."""

    def __init__(self, cfg: DictConfig, **trainer_options) -> None:
        pl.seed_everything(cfg.seed)
        self.cfg = cfg
        self.datamodule = instantiate(cfg.data)
        self.trainer: pl.Trainer = instantiate(cfg.trainer, **trainer_options)
        self.module = training_module(cfg, self.datamodule, self.trainer)
        self.device = self.trainer.strategy.root_device
        self.batch = self.datamodule.batch_size

    def attach(self) -> None:
        """Device, precision and rank for the datamodule, without fitting."""
        self.datamodule.trainer = self.trainer
        self.module.to(self.device)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Train batches on the device, normalised, epoch after epoch, as the trainer gets them."""
        loader = self.datamodule.train_dataloader()
        while True:
            for images, labels in loader:
                batch = (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                yield self.datamodule.on_after_batch_transfer(batch, 0)

    def step_function(self) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """What a hand-written loop does per batch: autocast forward, loss, backward, optimizer and schedule (the
        module's own, sized by the same plan as the trainer's)."""
        module, dtype = self.module, half_dtype(self.cfg.trainer.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        optimizer = module.optimizer_factory(module.parameter_groups())
        scheduler = module.scheduler_factory(optimizer)
        module.train()

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            with autocast:
                loss = module.criterion(module(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

        return step


def measure_data(setup: Setup, steps: int) -> StepClock:
    setup.attach()
    clock = StepClock(setup.device)
    batches = setup.batches()
    clock.started()
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        clock.waits.append(time.perf_counter() - start)
        clock.mark()
    return clock


def measure_synthetic(setup: Setup, steps: int) -> StepClock:
    setup.attach()
    images, labels = next(setup.batches())
    images, labels = torch.randn_like(images), torch.randint_like(labels, len(setup.datamodule.classes))
    step, clock = setup.step_function(), StepClock(setup.device)
    clock.started()
    for _ in range(steps):
        step(images, labels)
        clock.mark()
    return clock


def measure_loop(setup: Setup, steps: int) -> StepClock:
    setup.attach()
    step, clock, batches = setup.step_function(), StepClock(setup.device), setup.batches()
    clock.started()
    for _ in range(steps):
        start = time.perf_counter()
        images, labels = next(batches)
        clock.waits.append(time.perf_counter() - start)
        step(images, labels)
        clock.mark()
    return clock


class TrainerClock(pl.Callback):
    """The StepClock inside a Lightning fit: a mark per step end, the wait from one step's end to the next start."""

    def __init__(self, clock: StepClock) -> None:
        self.clock, self.last_end = clock, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.last_end is not None:
            self.clock.waits.append(time.perf_counter() - self.last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.mark()
        self.last_end = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.started()
        self.last_end = time.perf_counter()


def measure_trainer(cfg: DictConfig, steps: int) -> tuple[Setup, StepClock]:
    clock = StepClock(torch.device("cuda" if _uses_cuda(cfg) else "cpu"))
    callbacks = [
        c
        for c in instantiate_all(cfg.callbacks)
        if not isinstance(c, (pl.callbacks.ModelCheckpoint, pl.callbacks.ModelSummary))
    ]
    setup = Setup(
        cfg,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[*callbacks, TrainerClock(clock)],
        logger=instantiate_all(cfg.logger),
    )
    setup.trainer.fit(setup.module, datamodule=setup.datamodule)
    return setup, clock


def _uses_cuda(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto")


def training_flops_per_image(setup: Setup) -> float:
    """3x the forward FLOPs (forward + backward) of one image at the configured size, counted by torch."""
    net = setup.module.net
    size = setup.datamodule.spec.image_size
    counter = FlopCounterMode(display=False)
    was_training = net.training
    net.eval()
    with torch.no_grad(), counter:  # forward(), not the compiled call a model.compile=true net would make
        net.forward(torch.zeros(1, 3, size, size, device=next(net.parameters()).device))
    net.train(was_training)
    return 3.0 * counter.get_total_flops()


def _matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        repeats += 10
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> dict:
    """The vendor's dense peak for known GPUs, and a measured one everywhere: the faster of a large matmul in
    fp32 and in the run's dtype (CPUs without bf16 units emulate it, slower than fp32)."""
    measured = max(_matmul_flops(device, torch.float32), _matmul_flops(device, dtype))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    spec = next((flops for part, flops in GPU_PEAK_FLOPS.items() if part in name), None)
    return {"measured_matmul": measured, "datasheet": spec, "dtype": str(dtype).removeprefix("torch.")}


def machine() -> dict:
    """The GPU, the CPU cores and the versions the figures were measured with."""
    import nvidia.dali
    import torchvision

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "cpu": cpu_model,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "dali": nvidia.dali.__version__,
    }


def peak_memory_gb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"device_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # the process so far


def run_suite(
    cfg: DictConfig, only: tuple[str, ...], warmup: int, windows: int, window_steps: int, repeats: int = 1
) -> dict:
    """Each measurement ``repeats`` times, in turn (a drift in the machine's speed then hits all of them alike)."""
    steps = warmup + windows * window_steps
    clocks: dict[str, list[StepClock]] = {name: [] for name in only}
    memory: dict[str, dict] = {}
    flops_per_image = None
    for _ in range(repeats):
        for name in only:
            if _uses_cuda(cfg):
                torch.cuda.reset_peak_memory_stats()
            if name == "trainer":
                setup, clock = measure_trainer(cfg, steps)
            else:
                setup = Setup(cfg, logger=False, enable_checkpointing=False)
                measure = {"data": measure_data, "synthetic": measure_synthetic, "loop": measure_loop}[name]
                clock = measure(setup, steps)
            clocks[name].append(clock)
            previous = memory.get(name, {})
            memory[name] = {key: max(gb, previous.get(key, 0.0)) for key, gb in peak_memory_gb(setup.device).items()}
            if flops_per_image is None:
                flops_per_image, device, batch = training_flops_per_image(setup), setup.device, setup.batch
            del setup
            gc.collect()  # the previous measurement's pipeline threads and device memory
            if _uses_cuda(cfg):
                torch.cuda.empty_cache()
    results = {name: {**summarise(clocks[name], batch, warmup, windows, window_steps), **memory[name]} for name in only}
    precision = str(cfg.trainer.precision)
    peak = peak_flops(device, half_dtype(precision) or torch.float32)
    reference = peak["datasheet"] or peak["measured_matmul"]
    for name, result in results.items():
        if name != "data":
            result["mfu"] = result["images_per_s"] * flops_per_image / reference
    ratio = None
    if "trainer" in results and "loop" in results:
        ratio = results["trainer"]["images_per_s"] / results["loop"]["images_per_s"]
    return {
        "config": {
            "model": cfg.model.net.arch,
            "batch": cfg.data.batch_size,
            "image_size": cfg.data.spec.image_size,
            "precision": precision,
            "channels_last": cfg.model.channels_last,
            "compile": cfg.model.get("compile", False),
            "optimizer_fused": cfg.optimizer.get("fused"),
            "data_loader": cfg.data.loader._target_.rsplit(".", 1)[-1],
            "device": str(device),
            "warmup_steps": warmup,
            "windows": windows,
            "window_steps": window_steps,
            "repeats": repeats,
        },
        "training_flops_per_image": flops_per_image,
        "peak_flops": peak,
        "mfu_against": "datasheet" if peak["datasheet"] else "measured_matmul",
        "machine": machine(),
        "results": results,
        "trainer_vs_loop": ratio,
    }


def table(report: dict) -> str:
    """The results as a Markdown table, with the configuration and the machine above it."""
    c, m = report["config"], report["machine"]
    lines = [
        f"{c['model']}, batch {c['batch']}, {c['image_size']} px, {c['precision']}, channels_last "
        f"{c['channels_last']}, compile {c['compile']}, fused SGD {c['optimizer_fused']}, data {c['data_loader']}, "
        f"on {c['device']} ({m['gpu'] or m['cpu']}; {m['cpu_cores']} CPU cores); torch {m['torch']}, "
        f"Lightning {m['pytorch_lightning']}, DALI {m['dali']}; median of {c['repeats']} x {c['windows']} windows "
        f"of {c['window_steps']} steps after {c['warmup_steps']}; MFU against the {report['mfu_against']} peak "
        f"({report['peak_flops']['datasheet'] or report['peak_flops']['measured_matmul']:.3g} FLOP/s "
        f"{report['peak_flops']['dtype']}), {report['training_flops_per_image']:.3g} FLOP per trained image",
        "",
        "| measurement | img/s | step p50 / p90 / p99 (ms) | data wait | peak memory (GB) | MFU | first step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        wait = "" if r["data_wait_fraction"] is None else f"{r['data_wait_fraction']:.0%}"
        memory = r.get("device_peak_gb", r.get("host_peak_rss_gb"))
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        steps = r["step_time_ms"]
        lines.append(
            f"| {name} | {r['images_per_s']:.1f} | {steps['p50']:.1f} / {steps['p90']:.1f} / {steps['p99']:.1f} "
            f"| {wait} | {memory:.2f} | {mfu} | {r['first_step_s']:.1f} |"
        )
    if report["trainer_vs_loop"] is not None:
        lines += ["", f"trainer / plain loop: {report['trainer_vs_loop']:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement, taken in turn")
    parser.add_argument(
        "--only", default=",".join(MEASUREMENTS), help="comma-separated subset of " + ", ".join(MEASUREMENTS)
    )
    args, overrides = parser.parse_known_args(argv)
    only = tuple(args.only.split(","))
    unknown = [name for name in only if name not in MEASUREMENTS]
    if unknown or min(args.warmup, args.windows, args.window_steps, args.repeats) < 1:
        parser.error(f"--only takes {', '.join(MEASUREMENTS)} (got {unknown}); the counts must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(overrides, run_dir)
        report = run_suite(cfg, only, args.warmup, args.windows, args.window_steps, args.repeats)
    report["overrides"] = overrides
    report["resolved_config"] = OmegaConf.to_container(cfg, resolve=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "bench.md").write_text(table(report) + "\n")
    print(table(report))
    print(f"\nwritten: {args.out / 'bench.json'}, {args.out / 'bench.md'}")
    return report


if __name__ == "__main__":
    main()
