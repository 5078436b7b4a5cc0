"""sq_lightning: training-time weight clustering (soft quantization) for PyTorch Lightning."""

__version__ = "0.1.0"
