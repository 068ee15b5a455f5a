"""The paper harness: everything that reproduces Bae et al. (2022) on top of the
library. It imports :mod:`pbrf_fast`; the library never imports it.

- :mod:`.config`        typed settings the command line parses into
- :mod:`.jobs`          build an experiment; decompose / correlate / train
- :mod:`.experiments`   the presets: data, model, training and influence settings
- :mod:`.responses`     every response function of Table 1 (PBRF included), vectorised
- :mod:`.training`      base training with a recorded batch order
- :mod:`.decomposition` the five gaps, test-loss changes, correlations
- :mod:`.runner`        resumable runs over removed points
- :mod:`.report`        tables and figures
- :mod:`.mislabel`      mislabel detection by self-influence (Figure 6)
- :mod:`.sweep`         ablations (Figure 5)
- :mod:`.demo`          the README's main job
- :mod:`.scores_job`    the ``scores`` job on built-in data (:mod:`pbrf_fast.scale` underneath)
- :mod:`.scale_training` base-model training for that job
- :mod:`.models`, :mod:`.resnet`, :mod:`.data` the paper's networks and data loaders

Nothing is imported here: ``import pbrf_fast.paper`` stays cheap.
"""
