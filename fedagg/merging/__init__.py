"""Model merging: Fisher merging, model soups, task arithmetic and TIES.

Models are dicts ``{name: array}`` of numpy arrays or torch tensors; every function returns the
same kind (and dtype/device) and never mutates its inputs.

- :func:`fisher_merge` — Fisher-weighted averaging (Matena & Raffel 2022, arXiv 2111.09832);
  :func:`diagonal_fisher` estimates the diagonal Fishers of a torch classifier.
- :func:`uniform_soup`, :func:`greedy_soup`, :func:`learned_soup`, :func:`linear` — model soups
  (Wortsman et al. 2022, arXiv 2203.05482).
- :func:`task_arithmetic` (Ilharco et al. 2023, arXiv 2212.04089) and :func:`ties` (Yadav et al.
  2023, arXiv 2306.01708), with mergekit's conventions.
- :func:`merge` / :func:`build` / :func:`names` — the ``merge_method`` registry behind
  ``python -m simulations.merge config.yaml`` (mergekit-style configs).

Reference notes: ``../shared/reference/fedins_merging.md`` §4–§8.
"""

from fedagg.merging.arithmetic import magnitude_trim, task_arithmetic, ties
from fedagg.merging.fisher import FISHER_ESTIMATORS, diagonal_fisher
from fedagg.merging.fisher_merging import (
    dirichlet_coefficients,
    fisher_merge,
    fisher_norm,
    pairwise_grid_coefficients,
    search_coefficients,
)
from fedagg.merging.methods import (
    MERGE_METHODS,
    MergeMethod,
    Merger,
    build,
    describe,
    merge,
    names,
    spec,
)
from fedagg.merging.soups import (
    GreedySoupResult,
    LearnedSoupResult,
    greedy_soup,
    learned_soup,
    linear,
    uniform_soup,
)

__all__ = [
    "FISHER_ESTIMATORS",
    "MERGE_METHODS",
    "GreedySoupResult",
    "LearnedSoupResult",
    "MergeMethod",
    "Merger",
    "build",
    "describe",
    "diagonal_fisher",
    "dirichlet_coefficients",
    "fisher_merge",
    "fisher_norm",
    "greedy_soup",
    "learned_soup",
    "linear",
    "magnitude_trim",
    "merge",
    "names",
    "pairwise_grid_coefficients",
    "search_coefficients",
    "spec",
    "task_arithmetic",
    "ties",
    "uniform_soup",
]
