"""The ``saebench-poly`` command line.

A user mistake (`UserError`) prints one line on stderr and exits with status 2, with no traceback; a bug keeps
its traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from saebench_poly.errors import UserError

DEFAULT_SPEC = "toy-superposition"
REPOSITORY_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# Leaderboard metric -> column heading of the summary table printed after a run.
SUMMARY_METRICS = {"l0": "L0", "dead_fraction": "dead", "fvu": "FVU", "cosine_similarity": "cos",
                   "ce_increase": "dCE", "kl_divergence": "KL", "ce_loss_recovered": "CE rec",
                   "mean_max_cosine": "feat cos", "fraction_recovered": "feat rec"}
EXIT_USER_ERROR = 2

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Are SAE latents more monosemantic than the model's own neurons, and at what rate and distortion?")
err_console = Console(stderr=True)
# Wide enough for the summary table when stdout is a file or a CI log, which rich would otherwise cut at 80.
out_console = Console(width=None if sys.stdout.isatty() else 160)


def resolve_spec_path(spec: str) -> Path:
    """A spec file path, or a spec name looked up in ./benchmarks and then in this checkout's benchmarks/."""
    candidate = Path(spec)
    if candidate.is_file():
        return candidate
    for folder in (Path.cwd() / "benchmarks", REPOSITORY_BENCHMARKS):
        named = folder / f"{spec}.toml"
        if named.is_file():
            return named
    raise UserError(f"no spec file or benchmark named {spec!r} (looked in ./benchmarks and {REPOSITORY_BENCHMARKS})")


class RichReporter:
    """Progress bars and messages on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task_id, n)

    def message(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]")


@app.command()
def run(
    spec: Annotated[str, typer.Argument(help="Spec file, or the name of a spec in benchmarks/.")] = DEFAULT_SPEC,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the spec's, auto).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float64, bfloat16 or float16.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens to score (changes the spec hash).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Contexts (or samples) per batch; results do not depend on it.")] = None,
    output: Annotated[Path | None, typer.Option(help="Leaderboard file to write instead of the spec's.")] = None,
) -> None:
    """Score every entry of a spec and the raw neurons in one pass; write the Parquet leaderboard."""
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec, with_overrides

    loaded = load_spec(resolve_spec_path(spec))
    overrides = {"device": device, "dtype": dtype, "tokens": tokens, "batch_size": batch_size,
                 "output": str(output.resolve()) if output else None}
    loaded = with_overrides(loaded, {k: v for k, v in overrides.items() if v is not None})
    result = run_benchmark(loaded, RichReporter(err_console))
    out_console.print(summary_table(result.rows, f"{loaded.spec.name}: {result.tokens_scored:,} tokens scored"))
    out_console.print(f"wrote {result.output} and {result.output.name.removesuffix('.parquet')}.units.parquet")


def summary_table(rows: Any, title: str) -> Table:
    """Entries as rows, the main metrics as columns, in the order they were scored."""
    wide = rows.pivot_table(index="entry", columns="metric", values="value", sort=False)
    metrics = [m for m in SUMMARY_METRICS if m in wide.columns]
    table = Table(title=title, caption=", ".join(f"{SUMMARY_METRICS[m]} = {m}" for m in metrics))
    table.add_column("entry", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("width", justify="right")
    for metric in metrics:
        table.add_column(SUMMARY_METRICS[metric], justify="right", no_wrap=True)
    kinds = rows.drop_duplicates("entry").set_index("entry")
    for entry, values in wide.iterrows():
        cells = [f"{values[m]:.4g}" for m in metrics]
        table.add_row(str(entry), str(kinds.at[entry, "entry_kind"]), str(kinds.at[entry, "width"]), *cells)
    return table


@app.command("list")
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
            table.add_row(name, registry.origin(name))
        out_console.print(table)
    table = Table(title="metrics")
    for column in ("name", "version", "direction", "family", "definition"):
        table.add_column(column)
    for name, (metric, _) in all_metrics().items():
        table.add_row(name, str(metric.version), metric.direction, metric.family, metric.definition)
    out_console.print(table)


@app.command()
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
        typer.echo(f"{name}\t{adapter.hook_width(name)}")


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    try:
        app()
    except UserError as err:
        err_console.print(f"saebench-poly: error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
