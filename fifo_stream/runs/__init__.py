"""Runs: the run directory and its lock, the frame loop with checkpoints and resume, torchrun."""
