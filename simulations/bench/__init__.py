"""Benchmarks: ``python -m simulations.bench NAME`` (engine, aggregators, fedau, scale, ...).

Each benchmark module ``simulations/bench/<name>.py`` exposes ``run(out_md=None, **kw) -> str``:
it measures side by side in one process, prints a markdown section and returns it. The dispatcher
writes that section into ``docs/benchmarks.md`` between ``<!-- bench:NAME -->`` markers (other
sections are kept). Timings are reported, never asserted in tests.
"""
