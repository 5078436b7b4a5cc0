"""sq_lightning: training-time weight clustering (soft quantization) for PyTorch Lightning.

Methods:

* soft quantization by weight coupling, Bernstein, Di Carlo, Schwab, arXiv:2601.21219
  (:class:`SoftQuantCallback`, then :class:`ClusterRefine`);
* quantization-aware regularization with learned representatives, Malchiodi, Frasca,
  Ferraretto, arXiv:2602.03614 (:class:`LearnedCodebook`).
"""

__version__ = "0.1.0"

from sq_lightning.callbacks import ClusterRefine, LearnedCodebook, SoftQuantCallback
from sq_lightning.config import ExportConfig, RefineConfig, SnapConfig
from sq_lightning.coupler import WeightCoupler
from sq_lightning.deploy import export_coreml, export_onnx, verify_coreml, verify_onnx
from sq_lightning.export import export_checkpoint, load_compressed, save_compressed
from sq_lightning.handoff import ClusterSource, SnapHint
from sq_lightning.layers import LayerSelector
from sq_lightning.snapper import ClusterSnapper, UnclusteredLayerError

__all__ = [
    "ClusterRefine",
    "ClusterSnapper",
    "ClusterSource",
    "ExportConfig",
    "LayerSelector",
    "LearnedCodebook",
    "RefineConfig",
    "SnapConfig",
    "SnapHint",
    "SoftQuantCallback",
    "UnclusteredLayerError",
    "WeightCoupler",
    "__version__",
    "export_checkpoint",
    "export_coreml",
    "export_onnx",
    "load_compressed",
    "save_compressed",
    "verify_coreml",
    "verify_onnx",
]
