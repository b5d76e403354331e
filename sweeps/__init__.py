"""Hydra multiruns: the sweep summary (a Hydra callback) and the check that a multirun can start its jobs."""
