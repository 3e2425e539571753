"""fedagg: the framework-free math of the simulator.

Aggregators, attacks, participation processes, the FedAU estimator, Fisher merging and soups,
SSF pools, offline datasets, partitioners and small reference models, on numpy arrays and torch
tensors. Nothing here imports Flower or Ray.
"""

__version__ = "0.1.0"
