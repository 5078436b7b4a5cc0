"""Pure-torch math of the package. Nothing here imports Lightning."""

from sq_lightning.ops.baselines import Quantization, heq_quantize, kmeans_quantize, quantize, uniform_quantize
from sq_lightning.ops.clustering import Clusters, assign_to_centroids, bits_summary, entropy_bits, find_clusters
from sq_lightning.ops.codebook import CodebookResult, codebook_regularizer, init_centroids, nearest_centroid
from sq_lightning.ops.coupling import (
    CouplingResult,
    coupling,
    coupling_exact,
    coupling_grad_batched,
    coupling_histogram,
    coupling_pairwise,
    triangular_well,
)

__all__ = [
    "Clusters",
    "CodebookResult",
    "CouplingResult",
    "Quantization",
    "assign_to_centroids",
    "bits_summary",
    "entropy_bits",
    "codebook_regularizer",
    "coupling",
    "coupling_exact",
    "coupling_grad_batched",
    "coupling_histogram",
    "coupling_pairwise",
    "find_clusters",
    "heq_quantize",
    "init_centroids",
    "kmeans_quantize",
    "nearest_centroid",
    "quantize",
    "triangular_well",
    "uniform_quantize",
]
