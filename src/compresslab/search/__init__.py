"""Hyperparameter and compression search on Optuna (>= 4): multi-objective studies over any
results.json figure, pruning of hopeless trials from their per-epoch validation metric, and a
persistent study (SQLite in the sweep dir, a journal file, or any RDB URL).

The Hydra sweeper that drives a search lives in ``hydra_plugins.compresslab_optuna_sweeper``
(Hydra instantiates sweepers only from that namespace); this package holds what it, the jobs
and ``compresslab-report`` share: :mod:`.study` (storage, objectives), :mod:`.space` (the search
space from Hydra's sweep syntax), :mod:`.pruning` (the Lightning callback) and :mod:`.pareto`.
"""
