"""fifo-stream: arbitrarily long text-to-video streaming with FIFO diagonal denoising."""

__version__ = "0.1.0"
