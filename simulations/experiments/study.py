"""The one pipeline of the study drivers (:mod:`~simulations.experiments.fedau`,
:mod:`~simulations.experiments.fedins`, :mod:`~simulations.experiments.robust`).

A study is a grid of cells, each run on several seeds; a method's learning rate may be tuned
first, on a seed the table does not use (:mod:`~simulations.experiments.tuning`). A driver
describes its grid with a :class:`StudyJob` subclass (its axes: e.g. ``pattern`` × ``method``)
and hands a :class:`Study` (its loader, job builders, runner and report) to :func:`run_study`
(``Study.main``), which

1. parses the common flags (:func:`~simulations.experiments.grid.grid_parser`), loads and checks
   the experiment, resolves the output paths, builds the tuning jobs and validates every table
   cell before anything runs (a ConfigError: exit 2);
2. runs the tuning jobs (unless ``--report-only``), scores them and chooses each tuned value
   (:func:`collect_tuning`; a tuning run not finished: exit ``Study.tuning_exit``);
3. builds the table jobs with the chosen values (:func:`table_jobs`), runs them and collects
   the results;
4. hands the :class:`Run` to the driver's ``report`` (results.json, docs sections, figures), whose
   return value is the exit code. :func:`write_results` and :func:`publish` are the report steps
   the FedAU and FedIns studies share.

Run directories: ``<out>/tune/<tune axes>/<key>-<value>/`` for tuning,
``<out>/<axes>/seed-<s>/`` for the table; finished runs of the same config are reused
(:func:`simulations.experiments.grid.run_all`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from fedagg.errors import ConfigError
from simulations.experiments import grid, tuning
from simulations.report import write_section

#: A tune grid: ``(key, values)`` (:func:`~simulations.experiments.tuning.check_tune`).
TuneGrid = tuple[str, list[float]]


# ------------------------------------------------------------------------------ jobs
@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyJob(grid.GridJob):
    """One run of a study: of the table (``value`` None) or of tuning (``value`` the tuned
    ``key``'s value). A driver's ``Job`` adds one field per axis of its grid and names them in
    ``AXES``; ``TUNE_AXES`` are the axes a tuning run is named and keyed by (its run directory,
    the nesting of :func:`collect_tuning`), the last one the method's (its ``tune`` grid)."""

    #: The grid's axes, in run-directory order (one dataclass field each).
    AXES: ClassVar[tuple[str, ...]] = ()
    #: The axes that name a tuning run; the last one names the tuned method.
    TUNE_AXES: ClassVar[tuple[str, ...]] = ()

    seed: int
    config: dict[str, Any]
    value: float | None = None
    key: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        taken = [a for a in cls.AXES if a in vars(StudyJob)]
        if taken:  # a field named like a property would take the property as its default
            raise TypeError(f"{cls.__name__}: axis {taken[0]!r} is a StudyJob attribute; "
                            "name it otherwise")

    @staticmethod
    def label(axis: str, value: Any) -> str:
        """The path component of ``axis`` = ``value`` (in the job's name and run directory)."""
        return str(value)

    @classmethod
    def labels(cls, axes: Mapping[str, Any], names: Sequence[str]) -> list[str]:
        return [cls.label(a, axes[a]) for a in names]

    @property
    def axes(self) -> dict[str, Any]:
        """``{axis: value}`` of this job's cell."""
        return {a: getattr(self, a) for a in self.AXES}

    @property
    def cell(self) -> tuple[Any, ...]:
        """The values of ``AXES``: the table cell (all its seeds share it)."""
        return tuple(getattr(self, a) for a in self.AXES)

    @property
    def tune_cell(self) -> tuple[Any, ...]:
        """The values of ``TUNE_AXES``: where a tuning score (and the choice) is filed."""
        return tuple(getattr(self, a) for a in self.TUNE_AXES)

    @property
    def keeps_failed(self) -> bool:
        """Whether a run the runner stops counts as finished (``failed.json``): tuning runs."""
        return self.value is not None

    @property
    def name(self) -> str:
        if self.value is not None:
            return "/".join(["tune", *self.labels(self.axes, self.TUNE_AXES),
                             f"{self.key}={self.value:g}"])
        return "/".join([*self.labels(self.axes, self.AXES), f"seed-{self.seed}"])


J = TypeVar("J", bound=StudyJob)
#: ``config(axes, seed, run directory, extra) -> validated run config`` of one cell.
CellConfig = Callable[[Mapping[str, Any], int, Path, Mapping[str, Any]], dict[str, Any]]


def cell_config(base: Mapping[str, Any], method: Mapping[str, Any],
                layers: Sequence[Mapping[str, Any]], extra: Mapping[str, Any], *, seed: int,
                out: Path, name: str, fixed: Mapping[str, Any] | None = None,
                drop: Sequence[str] = ()) -> dict[str, Any]:
    """The validated run config of one cell: ``base`` ← ``method`` (its ``tune`` grid left
    out) ← each of ``layers`` ← ``extra`` (recursive merges, :func:`grid.merge`), then ``seed``,
    ``fixed`` and ``out`` set and the keys ``drop`` removed; a ConfigError names ``name``
    (:func:`grid.validate_cell`)."""
    data = grid.merge(base, {k: v for k, v in method.items() if k != "tune"})
    for layer in (*layers, extra):
        data = grid.merge(data, layer)
    data.update({"seed": int(seed), **(fixed or {}), "out": str(out)})
    for key in drop:
        data.pop(key, None)
    grid.validate_cell(data, name)
    return data


def tune_jobs(job: type[J], out: Path,
              cells: Iterable[tuple[Mapping[str, Any], TuneGrid, Mapping[str, Any]]], seed: int,
              config: CellConfig) -> list[J]:
    """One job per value of each tuned cell ``(axes, (key, values), extra)``, on ``seed``, into
    ``out/tune/<TUNE_AXES>/<key>-<value>``; its config gets ``{key: value, **extra}``."""
    jobs = []
    for axes, (key, values), extra in cells:
        for v in values:
            run = out.joinpath("tune", *job.labels(axes, job.TUNE_AXES), f"{key}-{v:g}")
            jobs.append(job(**axes, seed=seed, value=v, key=key,
                            config=config(axes, seed, run, {key: v, **extra})))
    return jobs


def table_jobs(job: type[J], out: Path, cells: Iterable[tuple[Mapping[str, Any], Sequence[int]]],
               grids: Mapping[str, TuneGrid], chosen: Mapping[str, Any] | None,
               config: CellConfig) -> list[J]:
    """One job per table cell ``(axes, seeds)`` and seed, into ``out/<AXES>/seed-<s>``. A
    method with a tune grid (``grids``, by the last of ``TUNE_AXES``) gets its chosen value
    (``chosen``, nested by ``TUNE_AXES``: :func:`chosen_values`) or, without ``chosen`` (checking
    the configs before tuning has run), the first value of its grid."""
    jobs = []
    for axes, seeds in cells:
        extra = {}
        spec = grids.get(axes[job.TUNE_AXES[-1]])
        if spec is not None:
            key, values = spec
            extra[key] = (values[0] if chosen is None
                          else _dig(chosen, [axes[a] for a in job.TUNE_AXES]))
        for seed in seeds:
            run = out.joinpath(*job.labels(axes, job.AXES), f"seed-{seed}")
            jobs.append(job(**axes, seed=int(seed), config=config(axes, seed, run, extra)))
    return jobs


@dataclasses.dataclass(frozen=True)
class MethodGrid:
    """The jobs and the tuning of an ``<axis> × method`` study (FedAU: patterns, FedIns:
    levels): the experiment's ``methods`` (each may have a ``tune`` grid) on every cell of
    ``exp[cells]``, tuned on ``tuning.<axis>`` (``each`` cell, or one whose choices serve all).
    A cell's run config is ``base`` ← method ← ``layer(exp[cells][cell])`` ← the tuned value
    (:func:`cell_config`; a ConfigError names ``<cell>.<method>``)."""

    job: type[StudyJob]
    axis: str
    cells: str
    layer: Callable[[Any], Mapping[str, Any]] = lambda over: over

    def _config(self, exp: Mapping[str, Any]) -> CellConfig:
        def config(axes: Mapping[str, Any], seed: int, run: Path,
                   extra: Mapping[str, Any]) -> dict[str, Any]:
            cell, method = axes[self.axis], axes["method"]
            return cell_config(exp["base"], exp["methods"][method],
                               [self.layer(exp[self.cells][cell])], extra, seed=seed, out=run,
                               name=f"{cell}.{method}")
        return config

    def tune_jobs(self, exp: Mapping[str, Any], out: Path) -> list[Any]:
        """Every (tuned cell, tuned method, value) on the tuning seed, for ``tuning.rounds``
        rounds, validated up front; none without a ``tuning`` section."""
        if not exp.get("tuning"):
            return []
        t = exp["tuning"]
        on = list(exp[self.cells]) if t[self.axis] == "each" else [t[self.axis]]
        cells = [({self.axis: c, "method": m}, spec, {"rounds": t["rounds"]})
                 for c in on for m, spec in tuning.tune_grids(exp["methods"]).items()]
        return tune_jobs(self.job, out, cells, t["seed"], self._config(exp))

    def table_jobs(self, exp: Mapping[str, Any], out: Path,
                   chosen: Mapping[str, Mapping[str, float]] | None = None) -> list[Any]:
        """Every (cell, method, seed) of the table, validated up front (a ConfigError names the
        cell). A tuned method gets ``chosen[cell][method]``; without ``chosen`` (checking the
        configs before tuning has run) the first value of its grid."""
        cells = [({self.axis: c, "method": m}, exp["seeds"]) for c in exp[self.cells]
                 for m in exp["methods"]]
        return table_jobs(self.job, out, cells, tuning.tune_grids(exp["methods"]), chosen,
                          self._config(exp))

    def collect_tuning(self, exp: Mapping[str, Any], jobs: Sequence[StudyJob]) -> dict[str, Any]:
        """``{cell: {method: {key, values, scores, chosen}}}`` for every cell of the table
        (:func:`collect_tuning`; tuned on one cell, its choices are copied to the others,
        ``from`` names it)."""
        tuned = collect_tuning(exp, jobs)
        if not exp.get("tuning"):
            return tuned
        return spread(tuned, exp["tuning"][self.axis], exp[self.cells])

    def study(self, name: str, doc: str, config: Path, out: str, **hooks: Any) -> Study:
        """The :class:`Study` of ``python -m simulations.experiments.<name>`` on this grid: runs
        under ``out`` by default, the docs page ``docs/<name>.md``, figures in ``docs/figures``;
        ``hooks``: its ``load_experiment``, ``run_all``, ``collect`` and ``report``."""
        return Study(
            module=f"simulations.experiments.{name}", doc=doc, config=config,
            docs_help=f"docs page to update (default docs/{name}.md; none with --quick)",
            figures_help="figure folder (default docs/figures; --out with --quick)",
            job=self.job,
            paths=lambda args, exp: grid.output_paths(args, out, Path(f"docs/{name}.md"),
                                                      Path("docs/figures")),
            make_tune_jobs=self.tune_jobs, make_jobs=self.table_jobs,
            collect_tuning=self.collect_tuning,
            table_line=lambda exp, root, jobs: (
                f"table: {len(jobs)} runs ({len(exp[self.cells])} {self.cells} × "
                f"{len(exp['methods'])} methods × {len(exp['seeds'])} seeds) → {root}"),
            **hooks)

    def chosen_values(self, tuned: Mapping[str, Any]) -> dict[str, dict[str, float]]:
        """``{cell: {method: chosen value}}`` of :meth:`collect_tuning`."""
        return chosen_values(tuned, 2)


def _dig(tree: Mapping[str, Any], keys: Sequence[Any]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def slot(tree: dict[Any, Any], keys: Sequence[Any], init: Any) -> Any:
    """``tree[k0][k1]...[kn]``, nested dicts and the leaf ``init`` made where missing."""
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    return tree.setdefault(keys[-1], init)


# ------------------------------------------------------------------------------ running
def run_jobs(jobs: Sequence[StudyJob], run_job: Callable[[Any, bool], dict[str, Any]],
             initializer: Callable[[], None], workers: int = 2, fresh: bool = False,
             echo: Callable[[str], None] = print, **options: Any) -> dict[str, dict[str, Any]]:
    """:func:`grid.run_all` of a study's jobs: finished runs of another config are redone, a run
    the runner stopped counts as finished where the job keeps failed runs
    (:attr:`StudyJob.keeps_failed`); ``options`` go to :func:`grid.run_all`."""
    return grid.run_all(jobs, run_job, initializer=initializer, workers=workers, fresh=fresh,
                        echo=echo, keep_failed=any(j.keeps_failed for j in jobs),
                        stale=grid.config_stale, **options)


# ------------------------------------------------------------------------------ results
def usable(job: StudyJob) -> bool:
    """A finished run of this job's config (another config's results are never reported)."""
    return grid.finished(job.run_dir, failed=job.keeps_failed) and not grid.config_stale(job)


def complete(jobs: Sequence[J]) -> list[J]:
    """The jobs of the cells whose every seed is :func:`usable` (only those are reported)."""
    incomplete = {j.cell for j in jobs if not usable(j)}
    return [j for j in jobs if j.cell not in incomplete]


def missing_cells(jobs: Sequence[StudyJob]) -> list[str]:
    """``<cell>/… (k of n seeds finished)`` for every cell with an unfinished run."""
    cells: dict[tuple[Any, ...], tuple[StudyJob, list[bool]]] = {}
    for j in jobs:
        cells.setdefault(j.cell, (j, []))[1].append(usable(j))
    return [f"{'/'.join(j.labels(j.axes, j.AXES))} ({sum(done)} of {len(done)} seeds finished)"
            for j, done in cells.values() if not all(done)]


def collect_tuning(exp: Mapping[str, Any], jobs: Sequence[StudyJob],
                   edge: bool = False) -> dict[str, Any]:
    """``{<TUNE_AXES>...: {key, values, scores, chosen}}`` (nested by the jobs' ``TUNE_AXES``). A
    score is the headline of the tuning run (:func:`~simulations.experiments.tuning.tuning_score`,
    NaN for a run the runner stopped); ``chosen`` has the best score; with ``edge``, ``edge`` says
    it is the first or last value of the grid. ``ConfigError("tuning", ...)`` if a tuning run is
    not finished or every value of a grid failed."""
    flat: dict[tuple[Any, ...], dict[str, Any]] = {}
    for job in jobs:
        if not usable(job):
            raise ConfigError("tuning", f"run {job.name} is not finished; run without "
                              "--report-only")
        cell = flat.setdefault(job.tune_cell, {"key": job.key, "values": [], "scores": []})
        cell["values"].append(job.value)
        cell["scores"].append(tuning.tuning_score(job.run_dir, exp["last_rounds"]))
    out: dict[str, Any] = {}
    for keys, cell in flat.items():
        cell["chosen"] = tuning.choose(cell["values"], cell["scores"])
        if edge:
            cell["edge"] = cell["chosen"] in (cell["values"][0], cell["values"][-1])
        slot(out, keys, cell)
    return out


def spread(tuned: Mapping[str, Any], where: str, cells: Iterable[str]) -> dict[str, Any]:
    """Tuning on one cell ``where`` (not ``each``) serves every one of ``cells``: its choices
    copied to each, ``from`` naming ``where``."""
    if where == "each":
        return dict(tuned)
    return {c: {m: {**t, "from": where} for m, t in tuned[where].items()} for c in cells}


def chosen_values(tuned: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """The chosen values of :func:`collect_tuning` (``depth``: its number of tune axes), nested
    the same way."""
    if depth == 1:
        return {k: c["chosen"] for k, c in tuned.items()}
    return {k: chosen_values(sub, depth - 1) for k, sub in tuned.items()}


def tuning_walls(jobs: Sequence[StudyJob]) -> tuple[int, float]:
    """``(runs, summed run seconds)`` of the finished tuning runs."""
    secs = [float(grid.read_summary(j.run_dir, failed=True).get("wall_seconds", 0.0))
            for j in jobs if grid.finished(j.run_dir, failed=True)]
    return len(secs), float(sum(secs))


# ------------------------------------------------------------------------------ pipeline
@dataclasses.dataclass
class Run:
    """One invocation of a study, handed to its report: the parsed flags, the experiment, the
    output paths, the jobs, the tuning (``{}`` without one) and its choices (None without), the
    collected ``results``, the summaries of the runs this invocation ran (or reused)."""

    study: Study
    args: argparse.Namespace
    exp: dict[str, Any]
    out: Path
    docs: Path | None
    figures: Path | None
    tune_jobs: list[Any]
    jobs: list[Any]
    tuning: dict[str, Any]
    chosen: dict[str, Any] | None
    results: dict[str, Any]
    summaries: dict[str, Any]
    t0: float
    echo: Callable[[str], None]

    def walls(self) -> dict[str, float]:
        """``table_runs`` (summed run seconds of the reported cells, ``results[a][b]``),
        ``tuning_runs`` and ``tuning_count`` (:func:`tuning_walls`) and, unless
        ``--report-only``, ``invocation`` (wall seconds so far)."""
        n_tune, tune_secs = tuning_walls(self.tune_jobs)
        walls = {"table_runs": sum(sum(c["wall_seconds"]) for cells in self.results.values()
                                   for c in cells.values()),
                 "tuning_runs": tune_secs, "tuning_count": n_tune}
        if not self.args.report_only:
            walls["invocation"] = time.perf_counter() - self.t0
        return walls


@dataclasses.dataclass(frozen=True)
class Study:
    """What a study driver plugs into :func:`main`."""

    module: str                  #: ``python -m <module>``
    doc: str                     #: the driver's docstring (its first paragraph: the description)
    config: Path                 #: the default experiment YAML
    docs_help: str
    figures_help: str
    job: type[StudyJob]
    #: ``(path, quick) -> exp``, checked (ConfigError).
    load_experiment: Callable[..., dict[str, Any]]
    #: ``(args, exp) -> (runs root, docs page or None, figure folder or None)``.
    paths: Callable[[argparse.Namespace, Mapping[str, Any]], tuple[Path, Path | None, Path | None]]
    make_tune_jobs: Callable[[Mapping[str, Any], Path], list[Any]]
    #: ``(exp, out, chosen=None) -> table jobs``.
    make_jobs: Callable[..., list[Any]]
    #: ``(jobs, workers=, fresh=, echo=) -> {name: summary}``.
    run_all: Callable[..., dict[str, dict[str, Any]]]
    collect_tuning: Callable[[Mapping[str, Any], Sequence[Any]], dict[str, Any]]
    collect: Callable[[Mapping[str, Any], Sequence[Any]], dict[str, Any]]
    #: ``(run) -> exit code``: results.json, docs, figures.
    report: Callable[[Run], int]
    #: ``(exp, out, jobs) -> line`` announcing the table runs.
    table_line: Callable[[Mapping[str, Any], Path, Sequence[Any]], str]
    #: ``(out, jobs) -> line`` announcing the tuning runs.
    tune_line: Callable[[Path, Sequence[Any]], str] = (
        lambda out, jobs: f"tuning: {len(jobs)} runs → {out / 'tune'}")
    workers_help: str = "runs in parallel (default 2)"
    #: Announce the stages with ``--report-only`` too.
    announce_always: bool = False
    #: The exit code when tuning cannot be collected (a run not finished).
    tuning_exit: int = 1
    #: Stop with exit 1 when no cell is finished.
    require_results: bool = True

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The driver's command line: :func:`run_study`."""
        return run_study(self, argv)


def run_study(study: Study, argv: Sequence[str] | None = None) -> int:
    """Run the pipeline of ``study`` (see the module docstring); the exit code."""
    parser = grid.grid_parser(study.module, study.doc, study.config, docs_help=study.docs_help,
                              figures_help=study.figures_help, workers_help=study.workers_help)
    args = parser.parse_args(argv)
    try:
        exp = study.load_experiment(args.config, quick=args.quick)
        out, docs, figures = study.paths(args, exp)
        tune_jobs = study.make_tune_jobs(exp, out)
        study.make_jobs(exp, out)  # every table cell validated before anything runs
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    echo = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    running = not args.report_only
    summaries: dict[str, Any] = {}
    if tune_jobs and (running or study.announce_always):
        echo(study.tune_line(out, tune_jobs))
    if tune_jobs and running:
        summaries.update(study.run_all(tune_jobs, workers=args.workers, fresh=args.fresh,
                                       echo=echo))
    try:
        tuned = study.collect_tuning(exp, tune_jobs) if tune_jobs else {}
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return study.tuning_exit
    chosen = chosen_values(tuned, len(study.job.TUNE_AXES)) if tuned else None
    jobs = study.make_jobs(exp, out, chosen)
    if running or study.announce_always:
        echo(study.table_line(exp, out, jobs))
    if running:
        summaries.update(study.run_all(jobs, workers=args.workers, fresh=args.fresh, echo=echo))
    results = study.collect(exp, jobs)
    if not results and study.require_results:
        print("error: no finished runs to report", file=sys.stderr)
        return 1
    return study.report(Run(study, args, exp, out, docs, figures, tune_jobs, jobs, tuned, chosen,
                            results, summaries, t0, echo))


# ------------------------------------------------------------------------------ report steps
def write_results(run: Run, walls: Mapping[str, float], missing: Sequence[str],
                  **extra: Any) -> None:
    """``results.json`` in the runs root: config, tuning, chosen values, results, missing cells,
    ``extra`` (the driver's own measurements) and wall times."""
    from simulations.core.results import atomic_write_text

    atomic_write_text(run.out / "results.json", json.dumps(
        {"config": run.exp, "tuning": run.tuning, "chosen": run.chosen or {},
         "results": run.results, "missing": list(missing), **extra, "wall_seconds": walls},
        indent=1))


def publish(run: Run, head: str, text: str, marks: tuple[str, str],
            figures: Mapping[str, Callable[[Path], Any]]) -> None:
    """Print the claims ``head`` and the ``text``, draw the figures (``{file name: draw(path)}``,
    into ``--figures``), write both sections into the docs page (``marks``: the claims' and the
    results' markers)."""
    print(head + "\n\n" + text)
    assert run.figures is not None
    run.figures.mkdir(parents=True, exist_ok=True)
    for name, draw in figures.items():
        draw(run.figures / name)
    if run.docs is not None:
        write_section(run.docs, head, marks[0])
        write_section(run.docs, text, marks[1])
        run.echo(f"wrote {run.docs}")
    run.echo(f"figures in {run.figures}; results in {run.out / 'results.json'}")
