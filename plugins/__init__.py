"""Lightning plugins of the Trainer (conf/trainer)."""
