"""Storage: atomic writes, checkpoints, run directories, loading."""
