"""Sampling: the noise schedule, DDIM, the FIFO queue and the noise that enters its tail."""
