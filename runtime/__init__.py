"""What a run needs around training: run directories, checkpoints, signals, launchers, callbacks."""
