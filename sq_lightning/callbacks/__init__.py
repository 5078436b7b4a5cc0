"""Lightning callbacks: thin glue that calls :mod:`sq_lightning.ops`."""

from sq_lightning.callbacks.cluster_refine import ClusterRefine
from sq_lightning.callbacks.soft_quant import SoftQuantCallback

__all__ = ["ClusterRefine", "SoftQuantCallback"]

try:  # method B lands in its own module
    from sq_lightning.callbacks.learned_codebook import LearnedCodebook  # noqa: F401

    __all__.append("LearnedCodebook")
except ImportError:  # pragma: no cover
    pass
