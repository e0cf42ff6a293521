"""How small a subspace does a task need? Intrinsic-dimension sweeps and effective rank.

* :func:`run_sweep` — d_int90 (Li et al. 2018) for any :class:`~hf_subspace.analysis.sweep.Task`: a log grid of
  d, several seeds, the learning rate chosen per d on validation, bisection, a bootstrap interval, a resumable
  results file, JSON / CSV / PNG outputs. Built-in tasks: :class:`MnistTask` (``fc``, ``lenet``), any example
  script (:class:`ScriptTask`). Command line: ``hf-subspace intrinsic-dim``.
* :func:`effective_rank` (Roy & Vetterli 2007) of a matrix, of every weight matrix of a model
  (:func:`model_effective_ranks`) and of a training trajectory (:func:`trajectory_effective_rank`), with
  :func:`suggest_twa_k` and :func:`suggest_dims`. Command line: ``hf-subspace effective-rank``.
"""
from .rank import (effective_rank, model_effective_ranks, plot_effective_ranks, suggest_dims, suggest_twa_k,
                   trajectory_effective_rank, trajectory_spectrum)
from .sweep import ResultStore, bootstrap_interval, run_sweep, summarize_dims
from .tasks import LeNet, MnistFC, MnistTask, ScriptTask, ToyTask

__all__ = ["LeNet", "MnistFC", "MnistTask", "ResultStore", "ScriptTask", "ToyTask", "bootstrap_interval",
           "effective_rank", "model_effective_ranks", "plot_effective_ranks", "run_sweep", "suggest_dims",
           "suggest_twa_k", "summarize_dims", "trajectory_effective_rank", "trajectory_spectrum"]
