"""Influence at scale: streaming train x test scores with per-layer contractions,
a reusable low-rank inverse, resumable on-disk results and torch.distributed
sharding. Each module has one job:

- :mod:`.lowrank`      Lanczos eigenpairs and :class:`LowRankInverse`
- :mod:`.distributed`  :class:`DistributedGaussNewton`, rank helpers, sharding
- :mod:`.layer_scores` hooks that turn activations x output gradients into scores
- :mod:`.pipeline`     :func:`compute_scores`, the staged, resumable driver
"""
from .distributed import DistributedGaussNewton
from .layer_scores import LayerScorer
from .lowrank import LowRankInverse, lanczos_eigenpairs
from .pipeline import compute_scores

__all__ = ["DistributedGaussNewton", "LayerScorer", "LowRankInverse", "compute_scores", "lanczos_eigenpairs"]
