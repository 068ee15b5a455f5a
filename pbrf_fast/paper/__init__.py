"""The paper harness: everything that reproduces Bae et al. (2022) on top of the
library. It imports :mod:`pbrf_fast`; the library never imports it.

- :mod:`.config`        typed settings the command line parses into
- :mod:`.jobs`          build an experiment; decompose / correlate / train
- :mod:`.recipes`       one table of every setting's model, data subset and training
- :mod:`.experiments`   the presets: each recipe's problem and influence settings
- :mod:`.responses`     every response function of Table 1 (PBRF included), vectorised
- :mod:`.training`      base training with a recorded batch order
- :mod:`.decomposition` the five gaps, test-loss changes, correlations
- :mod:`.runner`        resumable runs over removed points
- :mod:`.report`        tables and figures
- :mod:`.mislabel`      mislabel detection by self-influence (Figure 6)
- :mod:`.sweep`         ablations (Figure 5)
- :mod:`.demo`          the README's main job
- :mod:`.evaluate_job`  attribution quality of each solver (LDS, LOO, brittleness)
- :mod:`.reproduce`     every row of the paper's tables and figures, run and reported
- :mod:`.builtin_scores` the built-in models of the ``scores`` job (the job itself is
                        :mod:`pbrf_fast.scale.scores_job`), trained by :mod:`.scale_training`
- :mod:`.models`, :mod:`.resnet`, :mod:`.data` the paper's networks and data loaders

Nothing is imported here: ``import pbrf_fast.paper`` stays cheap.
"""
