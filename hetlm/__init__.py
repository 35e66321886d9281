"""hetlm: train, evaluate and deploy a small language model on the hardware you have."""

__version__ = "0.1.0"
