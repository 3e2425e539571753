"""The run core: one run from its typed config to its run directory.

``config`` (RunConfig, validated once), ``runner`` (Simulation: data, participation, strategy, round
loop), ``engine`` (inline / ray / flower engines handing the runner a Flower Grid), ``client_app``
and ``tasks`` (the Flower ClientApp and its registered client tasks), ``environment`` and
``byzantine`` (availability and Byzantine clients as properties of the environment), ``profiles``
and ``simtime`` (heterogeneous clients, simulated time), ``checkpoint``, ``results`` and
``trackers`` (what a run writes). Nothing here imports the command-line tools, studies or
benchmarks of :mod:`simulations`.
"""
