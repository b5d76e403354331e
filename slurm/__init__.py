"""Running on SLURM: the sbatch templates (``*.sbatch``), the job's cluster environment, and sweep summaries."""
