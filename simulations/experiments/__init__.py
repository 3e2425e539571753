"""Experiment drivers: ``python -m simulations.experiments.<name>`` reproduces a docs page's tables
and figures from a config in ``simulations/configs/``."""
