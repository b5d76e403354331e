"""Running on SLURM: the sbatch templates (``*.sbatch``) and the job as Lightning sees it (environment.py)."""
