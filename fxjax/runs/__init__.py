"""One run: the experiment, its run directory, checkpoints, report and export."""
