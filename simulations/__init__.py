"""The fedagg runner: config schema, ClientApp, engines, results, plots and CLIs.

Entry points: ``python -m simulations.run | plot | bench`` (each with ``--help``).
"""
