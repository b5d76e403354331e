"""The model summary at the start of a run: Lightning's rich table, without a FLOPs column and total when nothing
counted them. Lightning counts FLOPs only by running a module's ``example_input_array``; without one it prints a
column of zeros and ``Total FLOPs: 0``, which reads as a measurement."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import RichModelSummary
from pytorch_lightning.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from rich import get_console
from rich.table import Table

TEXT_COLUMNS = (" ", "Name", "Type", "Mode")  # left-aligned; the counts and sizes are right-aligned


class ModelSummaryWithoutUncountedFlops(RichModelSummary):
    """Lightning's ``RichModelSummary`` where FLOPs were counted; the same table and totals less FLOPs elsewhere."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            justify = "left" if name in TEXT_COLUMNS else "right"
            table.add_column(name, style="dim" if name == " " else None, justify=justify)
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        totals = Table.grid()
        for label, value in (
            ("Trainable params", get_human_readable_count(trainable_parameters)),
            ("Non-trainable params", get_human_readable_count(total_parameters - trainable_parameters)),
            ("Total params", get_human_readable_count(total_parameters)),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            totals.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(totals)
