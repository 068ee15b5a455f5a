"""Influence at scale: streaming train x test scores for the user's own model, data
and checkpoints, with per-layer contractions, a reusable low-rank inverse, resumable
on-disk results and torch.distributed sharding. Each module has one job:

- :mod:`.data`         training / test data from tensors, a Dataset (pairs, dicts, tuples), an
                       IterableDataset or a DataLoader
- :mod:`.task`         :class:`BatchTask`: batches that are not (input, target) pairs
- :mod:`.measurement`  what a score measures on a test point (loss, margin, your own)
- :mod:`.distributed`  :class:`DistributedGaussNewton`, rank helpers, sharding
- :mod:`.layer_scores` hooks that turn activations x output gradients into scores
- :mod:`.pipeline`     :class:`ScorePipeline` (one method per stage), :func:`compute_scores`,
                       :func:`load_scores`
- :mod:`.safetensors_io` the score matrix as safetensors
- :mod:`.loading`      the user's model and data file from the command line
- :mod:`.scores_job`   the ``pbrf-fast scores`` job: :class:`ScoresConfig` in, scores on disk
"""
from .data import DataSource, problem_from_data
from .distributed import DistributedGaussNewton
from .layer_scores import LayerScorer
from .measurement import MEASUREMENTS, margin
from .task import BatchTask, TaskModel
from .pipeline import ScoreArguments, ScorePipeline, ScoreResults, ScoreTask, compute_scores, load_scores

__all__ = ["BatchTask", "TaskModel", "problem_from_data", "DataSource", "DistributedGaussNewton", "LayerScorer", "MEASUREMENTS", "ScoreArguments",
           "ScorePipeline", "ScoreResults", "ScoreTask", "compute_scores", "load_scores",
           "margin"]
