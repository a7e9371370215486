"""raygen: train, tune, audit and serve generative models on Ray."""

__version__ = "0.1.0"
