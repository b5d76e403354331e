"""ILSVRC error analysis of a validation pass: per-class accuracy, confused pairs, and how bad the mistakes are."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from data.ilsvrc import mistake_severity

log = logging.getLogger(__name__)
PREDICTIONS = "predictions.tsv"


class ErrorAnalysis(pl.Callback):
    """Collects every image's top-5 from ``validation_step``'s scores on each rank, gathers them on rank zero and
    writes ``report.json`` and ``report.txt`` to ``folder``: top-1/top-5 accuracy and error, per-class top-1 with
    names, the most confused pairs, and the severity of mistakes in WordNet (Bertinetto et al. 2020: the height of
    the lowest common ancestor of the true and the predicted class, averaged over top-1 mistakes, and over the
    top-k predictions of every image as the hierarchical distance@k); and ``predictions.tsv``, every image's
    top-5 classes with their probabilities, in the split's order. The figures also go to the loggers."""

    def __init__(self, folder: str, top_confusions: int = 20) -> None:
        self.folder, self.top_confusions = Path(folder), top_confusions

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.top5, self.labels = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.top5.append(outputs.softmax(-1).topk(min(5, outputs.shape[1]), dim=1))  # log-probabilities too
        self.labels.append(batch[1])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        order = torch.as_tensor(datamodule.val_order())  # which image of the split each of this rank's rows is
        top5 = torch.cat([t.indices for t in self.top5]).cpu()
        probabilities = torch.cat([t.values for t in self.top5]).float().cpu()
        labels = torch.cat(self.labels).cpu()
        rows = (order, top5, probabilities, labels)
        if trainer.world_size > 1:  # ranks hold different counts: gather as objects
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = tuple(torch.cat(parts) for parts in zip(*gathered))
        if not trainer.is_global_zero:
            return
        order, top5, probabilities, labels = (part[rows[0].argsort()] for part in rows)
        layout = datamodule.layout
        report = analyse(top5, labels, layout.wnids, layout.names, self.top_confusions)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "report.json").write_text(json.dumps(report, indent=1))
        (self.folder / "report.txt").write_text(format_report(report))
        lines = [
            "\t".join(
                [layout.val.paths[i], layout.wnids[label], *(f"{layout.wnids[c]} {p:.6f}" for c, p in zip(cs, ps))]
            )
            for i, label, cs, ps in zip(order.tolist(), labels.tolist(), top5.tolist(), probabilities.tolist())
        ]
        (self.folder / PREDICTIONS).write_text("path\tlabel\ttop-5 (wnid probability)\n" + "\n".join(lines) + "\n")
        log.info("Evaluation report: %s\n%s", self.folder / "report.txt", format_report(report, classes=10))
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in report["summary"].items()}, step=trainer.global_step)


def analyse(top5: torch.Tensor, labels: torch.Tensor, wnids: list[str], names: list[str], confusions: int) -> dict:
    """The report's figures from every image's top-5 class indices and its label."""
    top1 = top5[:, 0]
    correct1 = top1 == labels
    correct5 = (top5 == labels[:, None]).any(1)
    severity = torch.tensor(
        [[mistake_severity(wnids[t], wnids[p]) for p in row] for t, row in zip(labels.tolist(), top5.tolist())],
        dtype=torch.float64,
    )
    mistakes = ~correct1
    summary = {
        "images": len(labels),
        "top1_accuracy": correct1.double().mean().item(),
        "top5_accuracy": correct5.double().mean().item(),
        "top1_error": 1 - correct1.double().mean().item(),
        "top5_error": 1 - correct5.double().mean().item(),
        "mistake_severity": severity[mistakes, 0].mean().item() if mistakes.any() else 0.0,
        "hierarchical_distance_at_1": severity[:, 0].mean().item(),
        "hierarchical_distance_at_5": severity.mean().item(),
    }
    per_class = []
    for index, (wnid, name) in enumerate(zip(wnids, names)):
        mask = labels == index
        if mask.any():
            per_class.append(
                {
                    "index": index,
                    "wnid": wnid,
                    "name": name,
                    "images": int(mask.sum()),
                    "top1": correct1[mask].double().mean().item(),
                }
            )
    counts = Counter(zip(labels[mistakes].tolist(), top1[mistakes].tolist()))
    pairs = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:confusions]  # ties: by class index
    confused = [
        {"true": names[t], "predicted": names[p], "count": n, "severity": mistake_severity(wnids[t], wnids[p])}
        for (t, p), n in pairs
    ]
    return {
        "summary": summary,
        "per_class": sorted(per_class, key=lambda c: (c["top1"], c["index"])),
        "confused_pairs": confused,
    }


def format_report(report: dict, classes: int | None = None) -> str:
    """A readable table: the summary, the worst classes (``classes`` of them, or all) and the confused pairs."""
    s = report["summary"]
    lines = [
        f"{s['images']} images: top-1 {s['top1_accuracy']:.4f} (error {s['top1_error']:.4f}), "
        f"top-5 {s['top5_accuracy']:.4f} (error {s['top5_error']:.4f})",
        f"mistake severity {s['mistake_severity']:.2f} (WordNet levels up to the common ancestor); "
        f"hierarchical distance@1 {s['hierarchical_distance_at_1']:.2f}, @5 {s['hierarchical_distance_at_5']:.2f}",
        "",
        "worst classes (top-1):",
        *(
            f"  {c['top1']:.3f}  {c['wnid']}  {c['name']}  ({c['images']} images)"
            for c in report["per_class"][:classes]
        ),
        "",
        "most confused (true -> predicted):",
        *(
            f"  {p['count']:4d}  {p['true']} -> {p['predicted']}  (severity {p['severity']})"
            for p in report["confused_pairs"]
        ),
    ]
    return "\n".join(lines) + "\n"
