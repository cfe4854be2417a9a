"""The ``saebench-poly`` command line.

Exit status: 0 done (for ``check``: pass), 1 a metric regressed or is missing (``check``), 2 a user mistake
(`UserError`: one line on stderr, no traceback), 3 not comparable (``check``), 70 an internal error (a bug in
saebench-poly: its traceback, then one line saying so), 130 interrupted. A run's temporary files go into a folder of
its own (`own_temporary_folder`). Everything printed goes through consoles with rich markup, highlighting and emoji codes off, and
user text (names, paths) through `usertext.printable`, so a name such as ``[/]x`` or one holding ESC prints as
itself and cannot act on the terminal.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from saebench_poly.errors import UserError
from saebench_poly.usertext import printable

DEFAULT_SPEC = "toy-superposition"
REPOSITORY_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# Leaderboard metric -> column heading of the summary table printed after a run.
SUMMARY_METRICS = {"l0": "L0", "dead_fraction": "dead", "rate_bits_per_token": "rate", "fvu": "FVU", "cosine_similarity": "cos",
                   "ce_increase": "dCE", "kl_divergence": "KL", "ce_loss_recovered": "CE rec",
                   "mean_max_cosine": "feat cos", "fraction_recovered": "feat rec",
                   "mean_effective_behaviours": "eff beh", "monosemantic_fraction": "mono"}
# Frontier flag -> its column heading in `show`.
FRONTIER_HEADINGS = {"pareto_rate_distortion": "RD", "pareto_rate_distortion_polysemanticity": "RDP"}
# saebench_poly.checkpoint's (tests/test_checkpoint.py checks that they agree), written out here so that the
# command line starts without importing torch
CHECKPOINT_FILE = "pass-checkpoint.safetensors"
DEFAULT_CHECKPOINT_EVERY = 100
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE of sysexits.h; apart from check's 0-3, so that a crash never reads as a verdict
EXIT_INTERRUPTED = 130

# Plain help (no rich boxes): typer's rich help labels every flag `<bool>`.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Are SAE latents more monosemantic than the model's own neurons, and at what rate and distortion?")
err_console = Console(stderr=True, markup=False, highlight=False, emoji=False)
# Wide enough for the summary table when stdout is a file or a CI log, which rich would otherwise cut at 80.
out_console = Console(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False, emoji=False)


class _Command(typer.core.TyperCommand):
    """Writes arguments in the usage line as click does, ``RESULTS`` and ``[SPEC]``, not as typer's ``{results}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece[1:-1].upper() if piece.startswith("{") and piece.endswith("}") else piece.upper()
                for piece in super().collect_usage_pieces(ctx)]


# click's UsageError (a bad option, a missing argument, an unknown command) and ClickException (any error click
# reports itself), found from typer's public BadParameter: typer vendors its own click, whose classes are not click's
USAGE_ERROR, CLICK_ERROR = (next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == name)
                            for name in ("UsageError", "ClickException"))


class _Escaped(Exception):  # noqa: N818 - a carrier, not an error of its own
    """Carries an EOFError or KeyboardInterrupt out of a command past click, which would print "Aborted!" and
    exit 1, the status `check` gives a regression."""


def command(name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command``, with the usage line of `_Command` and EOFError / KeyboardInterrupt carried to `main`."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except (EOFError, KeyboardInterrupt) as err:
                raise _Escaped() from err

        app.command(name, cls=_Command)(guarded)
        return function

    return register


def resolve_spec_path(spec: str) -> Path:
    """A spec file path, or a spec name looked up in ./benchmarks, this checkout's benchmarks/, and the default
    specs shipped in the installed package."""
    from saebench_poly.spec import PACKAGED_SPECS

    candidate = Path(spec)
    if candidate.is_file():
        return candidate
    for folder in (Path.cwd() / "benchmarks", REPOSITORY_BENCHMARKS, PACKAGED_SPECS):
        named = folder / f"{spec}.toml"
        if named.is_file():
            return named
    raise UserError(f"no spec file or benchmark named {spec!r} (looked in ./benchmarks, {REPOSITORY_BENCHMARKS} and the installed default specs)")


class RichReporter:
    """Progress bars and messages on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        description = TextColumn("{task.description}", markup=False)
        if total is None:  # a stage of unknown length: how long it has taken, not a count out of "?"
            columns = [description, TimeElapsedColumn()]
        else:
            columns = [description, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(printable(description), total=total)
            yield lambda n: progress.advance(task_id, n)

    def message(self, text: str) -> None:
        self.console.print(Text(printable(text), style="dim"))


@command()
def run(
    spec: Annotated[str, typer.Argument(help="Spec file, or the name of a spec in benchmarks/.")] = DEFAULT_SPEC,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the spec's, auto).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float64, bfloat16 or float16.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens to score (changes the spec hash).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Contexts (or samples) per batch; results do not depend on it.")] = None,
    output: Annotated[Path | None, typer.Option(help="Leaderboard file to write instead of the spec's.")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Members stored per behaviour besides its central example (the report's text).")] = 5,
    executor: Annotated[str, typer.Option(help="local (this process) or ray (the pass sharded over Ray workers).")] = "local",
    address: Annotated[str | None, typer.Option(help="--executor ray: the Ray cluster (default: a new local one).")] = None,
    workers: Annotated[int | None, typer.Option(help="--executor ray: slices of the contexts (default: the cluster's GPUs, else CPUs).")] = None,
    entry_groups: Annotated[int | None, typer.Option(help=(
        "--executor ray: also split the entries into G groups, each task holding one group (G x workers tasks); "
        "for entries that do not fit one GPU together. Default 1."))] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help=(
        "--executor local: write a checkpoint of the pass every N batches, to <artifacts>/"
        f"{CHECKPOINT_FILE} (the spec's artifacts folder); 0: none. Removed when the run finishes."))] = DEFAULT_CHECKPOINT_EVERY,
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue from the checkpoint a killed run left (refused if the spec's settings or entries changed); "
        "without one, score from the start."))] = False,
) -> None:
    """Score every entry of a spec and the raw neurons in one pass; write the Parquet leaderboard."""
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec, with_overrides

    if output is not None and output.is_dir():
        raise UserError(f"--output {output} is a folder: name a file, e.g. {output / 'results.parquet'}")
    loaded = load_spec(resolve_spec_path(spec))
    overrides = {"device": device, "dtype": dtype, "tokens": tokens, "batch_size": batch_size,
                 "output": str(output.resolve()) if output else None}
    loaded = with_overrides(loaded, {k: v for k, v in overrides.items() if v is not None})
    chosen = _executor(executor, address, workers, entry_groups)
    result = run_benchmark(loaded, RichReporter(err_console), examples=examples, executor=chosen,
                           checkpoint_every=checkpoint_every if chosen is None else 0, resume=resume)
    out_console.print(summary_table(result.rows, f"{loaded.spec.name}: {result.tokens_scored:,} tokens scored"))
    stem = result.output.name.removesuffix(".parquet")
    out_console.print(printable(f"wrote {result.output}, {stem}.units.parquet and {stem}.examples.parquet"))
    out_console.print(printable(f"see why: saebench-poly report {result.output}"))


def _executor(name: str, address: str | None, workers: int | None, entry_groups: int | None) -> Any:
    """The `saebench_poly.run.Executor` of ``--executor`` (None: this process)."""
    if name == "local":
        if address is not None or workers is not None or entry_groups is not None:
            raise UserError("--address, --workers and --entry-groups apply to --executor ray only")
        return None
    if name == "ray":
        from saebench_poly.executors import RayExecutor

        return RayExecutor(address=address, workers=workers, groups=1 if entry_groups is None else entry_groups)
    raise UserError(f"unknown executor {name!r}: use local or ray")


def summary_table(rows: Any, title: str) -> Table:
    """Entries as rows, the main metrics as columns, in the order they were scored."""
    wide = rows.pivot_table(index="entry", columns="metric", values="value", sort=False)
    metrics = [m for m in SUMMARY_METRICS if m in wide.columns]
    table = Table(title=printable(title), caption=", ".join(f"{SUMMARY_METRICS[m]} = {m}" for m in metrics))
    table.add_column("entry", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("width", justify="right")
    for metric in metrics:
        table.add_column(SUMMARY_METRICS[metric], justify="right", no_wrap=True)
    kinds = rows.drop_duplicates("entry").set_index("entry")
    for entry, values in wide.iterrows():
        cells = [f"{values[m]:.4g}" for m in metrics]
        table.add_row(printable(entry), printable(kinds.at[entry, "entry_kind"]), str(kinds.at[entry, "width"]), *cells)
    return table


@command("list")
def list_registered() -> None:
    """Print the registered SAE sources, model loaders and metrics."""
    from saebench_poly.metrics import all_metrics
    from saebench_poly.models import MODEL_LOADERS
    from saebench_poly.sources import SOURCES

    for title, registry in (("sources (URI schemes)", SOURCES), ("model loaders", MODEL_LOADERS)):
        table = Table(title=title)
        table.add_column("name")
        table.add_column("implemented by")
        for name in registry.names():
            table.add_row(printable(name), printable(registry.origin(name)))
        out_console.print(table)
    table = Table(title="metrics")
    for column in ("name", "version", "direction", "family", "definition"):
        table.add_column(column)
    for name, (metric, _) in all_metrics().items():
        table.add_row(printable(name), str(metric.version), printable(metric.direction), printable(metric.family),
                      printable(metric.definition))
    out_console.print(table)


@command()
def hooks(spec: Annotated[str, typer.Argument(help="Spec file or name.")] = DEFAULT_SPEC) -> None:
    """Print the hooks of a spec's model with their widths (tab-separated, for scripts)."""
    import torch

    from saebench_poly.models import MODEL_LOADERS
    from saebench_poly.run import resolve_device
    from saebench_poly.spec import load_spec

    loaded = load_spec(resolve_spec_path(spec))
    model = loaded.spec.model
    adapter = MODEL_LOADERS.get(model.loader)(model, resolve_device(loaded.spec.device), getattr(torch, loaded.spec.dtype))
    for name in adapter.hook_names():
        typer.echo(f"{printable(name)}\t{adapter.hook_width(name)}")


@command()
def submit(
    results: Annotated[Path, typer.Argument(help="Results file written by `saebench-poly run SPEC --output FILE`.")],
    leaderboard: Annotated[Path, typer.Option(help="Leaderboard to add the entries to (leaderboards/<name>.parquet).")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace an entry already on the leaderboard (same weights or name).")] = False,
) -> None:
    """Validate a results file and add its entries to a leaderboard, atomically; print where they rank."""
    from saebench_poly.submit import submit as submit_results

    done = submit_results(results, leaderboard, replace=replace)
    replaced = f" (replacing {', '.join(done.replaced)})" if done.replaced else ""
    out_console.print(printable(f"added {', '.join(done.added)} to {done.leaderboard}{replaced}"))
    if done.skipped:
        out_console.print(printable(f"left out {', '.join(done.skipped)}: the leaderboard has its own"))
    from saebench_poly.frontier import FRONTIERS

    shown = list(dict.fromkeys([*SUMMARY_METRICS, *(m for axes in FRONTIERS.values() for m in axes)]))
    for name, frame in done.standings.items():
        out_console.print(standing_table(name, frame[frame["metric"].isin(shown)]))


def standing_table(name: str, frame: Any) -> Table:
    """An entry's value and rank on each metric, beside its raw-neuron baseline's value."""
    neurons = frame.attrs.get("neurons")
    table = Table(title=printable(f"{name}: rank among the entries of its spec"), caption="rank 1 is best; - = no better direction")
    for column, justify in (("metric", "left"), ("better", "left"), ("value", "right"), ("rank", "right"),
                            (printable(neurons or "raw neurons"), "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for row in frame.itertuples():
        rank = "-" if row.rank is None or row.rank != row.rank else f"{row.rank:.0f} of {row.of}"
        table.add_row(printable(row.metric), printable(row.direction), f"{row.value:.4g}", rank, f"{row.neurons:.4g}")
    return table


@command()
def show(
    leaderboard: Annotated[Path, typer.Argument(help="Leaderboard file.")],
    model: Annotated[str | None, typer.Option(help="Only entries on this model (model_id).")] = None,
    hook: Annotated[str | None, typer.Option(help="Only entries at this hook.")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="A metric to show (repeatable; default: the summary metrics).")] = None,
    rank_by: Annotated[str | None, typer.Option(help="Rank by this metric (default: the mean rank over the metrics shown).")] = None,
) -> None:
    """Print a leaderboard's entries, ranked, one table per spec hash (only those are comparable)."""
    import difflib

    import pandas as pd

    from saebench_poly.frontier import FRONTIERS
    from saebench_poly.leaderboard import entry_keys, read_table
    from saebench_poly.ranking import MEAN_RANK, ranked

    if not leaderboard.is_file():
        raise UserError(f"there is no leaderboard at {leaderboard}")
    rows = read_table(leaderboard)
    for column, wanted in (("model_id", model), ("hook", hook)):
        if wanted is not None:
            if wanted not in set(rows[column]):
                raise UserError(f"{leaderboard} has no entries with {column} {wanted!r} (it has {', '.join(sorted(set(rows[column])))})")
            rows = rows[rows[column] == wanted]
    available = list(dict.fromkeys(rows["metric"]))
    for name in [*(metric or []), *([rank_by] if rank_by else [])]:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(f"{leaderboard} has no metric {name!r}{hint}")
    shown = metric or [m for m in SUMMARY_METRICS if m in available]
    for spec_hash, group in rows.groupby("spec_hash", sort=False):
        table_rows = ranked(group, shown, rank_by)
        described = group.assign(key=entry_keys(group)).drop_duplicates("key").set_index("key")
        names = described["entry"]
        frontiers = [f for f in FRONTIERS if f in described.columns and described[f].notna().any()]
        hooks = sorted(set(group["hook"]))
        title = (f"{', '.join(sorted(set(group['spec_name'])))} (spec {spec_hash[:12]}) on {', '.join(sorted(set(group['model_id'])))}"
                 + (f" at {hooks[0]}" if len(hooks) == 1 else ""))
        flag_names = {f: FRONTIER_HEADINGS.get(f, f) for f in frontiers}
        legend = [f"{SUMMARY_METRICS[m]} = {m}" for m in shown if m in SUMMARY_METRICS]
        legend += [f"{heading} = on the {f.removeprefix('pareto_').replace('_', '-')} frontier" for f, heading in flag_names.items()]
        # Fits 120 columns with every summary metric: one space between columns and no box, 3 significant
        # digits, and the hook in the title when the table has only one.
        table = Table(title=printable(title), caption=", ".join(legend), box=None, pad_edge=False, header_style="bold underline",
                      padding=(0, 1, 0, 0))
        columns = ["rank", "entry", "kind", *(["hook"] if len(hooks) > 1 else []), "width"]
        for column in columns:
            folds = column in ("entry", "hook")  # a long name wraps onto a second line rather than losing its end
            table.add_column(column, justify="right" if column in ("rank", "width") else "left", no_wrap=not folds,
                             overflow="fold" if folds else "ellipsis", min_width=12 if folds else None)
        extra = [MEAN_RANK] if MEAN_RANK in table_rows.columns else []
        for column in [*shown, *extra]:
            table.add_column(printable(SUMMARY_METRICS.get(column, column)), justify="right", no_wrap=True)
        for heading in flag_names.values():
            table.add_column(heading, justify="center", no_wrap=True)
        for key, values in table_rows.iterrows():
            info = described.loc[key]
            label = info["entry"] if (names == info["entry"]).sum() == 1 else f"{info['entry']} ({info['spec_name']})"
            cells = ["-" if values[m] != values[m] else f"{values[m]:.3g}" for m in [*shown, *extra]]
            flags = ["-" if pd.isna(info[f]) else ("yes" if info[f] else "") for f in frontiers]
            described_cells = {"rank": f"{values['rank']:.0f}" if values["rank"] == values["rank"] else "-",
                               "entry": printable(label), "kind": printable(info["entry_kind"]),
                               "hook": printable(info["hook"]), "width": str(info["width"])}
            table.add_row(*(described_cells[c] for c in columns), *cells, *flags)
        out_console.print(table)


@command()
def check(
    candidate: Annotated[str, typer.Argument(help="sae-lens checkpoint folder, or a results file (FILE or FILE::ENTRY).")],
    baseline: Annotated[str, typer.Option(help="Results file, or one entry of a results file or leaderboard: FILE::ENTRY.")],
    spec: Annotated[str, typer.Option(help="Spec (file or name) that scores a checkpoint folder; the baseline's.")] = DEFAULT_SPEC,
    two_sided: Annotated[bool, typer.Option("--two-sided", help="Also fail when a metric improves beyond its tolerance.")] = False,
    update_baseline: Annotated[bool, typer.Option("--update-baseline", help="Write the candidate over the baseline file, on purpose.")] = False,
    report_dir: Annotated[Path, typer.Option(help="Folder for check-report.md, check-report.json and candidate.parquet.")] = Path("check-report"),
    tolerance: Annotated[list[str] | None, typer.Option("--tolerance", help="METRIC=ABS,REL: replace a metric's tolerance (repeatable).")] = None,
) -> None:
    """Compare a checkpoint or results file with a baseline, metric by metric, within per-metric tolerances.

    Exit status: 0 pass, 1 a metric regressed or is missing, 2 usage or validation error, 3 not comparable,
    70 internal error (a bug in saebench-poly)."""
    from saebench_poly.regression import check as check_regression
    from saebench_poly.regression import parse_tolerances
    from saebench_poly.results import split_reference

    spec_path = resolve_spec_path(spec) if split_reference(candidate)[0].is_dir() else None
    report = check_regression(candidate, baseline, spec_path=spec_path, two_sided=two_sided, update_baseline=update_baseline,
                              report_dir=report_dir, tolerances=parse_tolerances(tolerance or []), reporter=RichReporter(err_console))
    moved = [(cells, fails) for cells, fails, status in report.rows() if status != "ok"]
    if moved and not report.not_comparable:  # numbers that are not comparable did not regress
        table = Table(title=printable(f"{report.candidate} vs {report.baseline}: metrics that moved beyond their tolerance"),
                      caption=f"{len(report.checks) - len(moved)} other metrics within tolerance (all in the report)")
        for column in ("entry", "metric", "better", "baseline", "candidate", "change", "allowed", "status"):
            table.add_column(column, justify="right" if column in ("baseline", "candidate", "change", "allowed") else "left", no_wrap=True)
        for cells, fails in moved:
            table.add_row(*map(printable, cells), style="red" if fails else "yellow")
        out_console.print(table)
    for line in [*report.not_comparable, *report.notes]:
        out_console.print(printable(line))
    out_console.print(printable(f"check: {report.summary()}; reports in {report_dir}"))
    raise typer.Exit(report.exit_code)


@app.command()
def report(
    leaderboard: Annotated[Path, typer.Argument(help="Leaderboard file (leaderboards/<name>.parquet).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file to write (default: the leaderboard's name with .html).")] = None,
    max_units: Annotated[int, typer.Option(min=1, help="Units per entry whose values and examples go into the page.")] = 500,
) -> None:
    """Write one self-contained HTML report (opens offline): the table, the frontiers, the behaviours and a unit explorer."""
    from saebench_poly.report import build_report

    done = build_report(leaderboard, output, max_units=max_units)
    examples = "" if done.has_examples else " (no stored examples beside the leaderboard: run the spec again to store them)"
    out_console.print(printable(f"wrote {done.output} ({done.bytes / 2**20:.1f} MiB, {done.entries} entries, "
                                f"{done.units_shown} units in the explorer){examples}"))


@contextmanager
def own_temporary_folder() -> Iterator[Path]:
    """Point Python's temporary files at a new folder ``saebench-poly-<pid>-<random>`` in the temp directory,
    removed at exit; first remove such folders (of this user) whose process no longer exists. sae-lens imports
    wandb, which makes two temporary folders at import and removes them only at a clean exit: a killed run
    would leave them in the temp directory, one pair per kill."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob("saebench-poly-*-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and stale.is_dir() and not stale.is_symlink() and stale.stat().st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"saebench-poly-{os.getpid()}-", dir=base))
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    try:
        with own_temporary_folder():
            # click's own handling would print a usage block of several lines for a bad option; it is one line here
            code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # a command's typer.Exit, returned by click outside standalone mode
            sys.exit(code)
    except UserError as err:
        err_console.print(f"saebench-poly: error: {printable(err)}", soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except CLICK_ERROR as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `saebench-poly` alone: the help, as click shows it
            err.show()
            sys.exit(err.exit_code)
        message = err.format_message().rstrip(".")
        if isinstance(err, USAGE_ERROR):
            message += f"; see {err.ctx.command_path if err.ctx is not None else 'saebench-poly'} --help"
        err_console.print(f"saebench-poly: error: {printable(message)}", soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, _Escaped, typer.Abort) as err:
        cause = err.__cause__ if isinstance(err, (_Escaped, typer.Abort)) else err
        if not isinstance(cause, KeyboardInterrupt):
            _internal_error(cause)
        err_console.print("saebench-poly: interrupted", soft_wrap=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - anything else is a bug: its traceback, and a status of its own
        _internal_error(err)


def _internal_error(err: BaseException) -> None:
    traceback.print_exception(err)
    err_console.print(f"saebench-poly: internal error: {printable(type(err).__name__)} (a bug in saebench-poly, not a "
                      f"mistake in the input; please report it with the traceback above); exit status {EXIT_INTERNAL_ERROR}",
                      soft_wrap=True)
    sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
