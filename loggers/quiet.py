"""What the pinned libraries print at the start of a run that a user of this project cannot act on, kept out of its
log, so that its first lines are the project's own (each rank's banner, the dataset, the learning rate):

- Lightning's tips (``💡 Tip: ... try installing litlogger``): advertisements for its cloud services;
- Lightning's note that it skips its default model summary: the project configures its own
  (``callbacks.model_summary``);
- torch 2.14's FutureWarning that ``LeafSpec`` is deprecated, which Lightning 2.6.6 calls at every validation;
- Lightning's warning that the checkpoint folder "exists and is not empty": a run resumes there by design
  (``ckpt_path=auto``), and a fresh start moves an earlier run's checkpoints aside (runs/resume.py);
- Lightning's hint to start the script with ``srun``, on any machine where SLURM is installed: on SLURM the
  project's sbatch templates do (``trainer=slurm``, slurm/README.md), and elsewhere it is wrong.

Called once per process by the entry points, before the Trainer is built.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's rank_zero_info / rank_zero_warn log through these (the last one imported is used; both are set)
LIGHTNING_RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
LIGHTNING_NOTICES = ("💡 Tip:", "Trainer already configured with model summary callbacks")


class DropLightningNotices(logging.Filter):
    """Drops the log records that start with one of ``LIGHTNING_NOTICES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_NOTICES)


def quiet_libraries() -> None:
    """Installs the filters (warnings and Lightning's log records); calling it again changes nothing."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropLightningNotices) for existing in logger.filters):
            logger.addFilter(DropLightningNotices())
