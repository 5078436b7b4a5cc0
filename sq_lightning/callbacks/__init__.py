"""Lightning callbacks: thin glue that calls :mod:`sq_lightning.ops`."""

from sq_lightning.callbacks.cluster_refine import ClusterRefine
from sq_lightning.callbacks.learned_codebook import LearnedCodebook
from sq_lightning.callbacks.soft_quant import SoftQuantCallback

__all__ = ["ClusterRefine", "LearnedCodebook", "SoftQuantCallback"]
