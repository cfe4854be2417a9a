"""The polysemanticity metric on a real pretrained model, run as a user runs it (issue 13 section 3).

Writes a spec that trains two sae-lens SAEs on one MLP hook of a Hugging Face model, runs ``saebench-poly run`` on
it, then scores the same entries again (the trained SAEs loaded from disk as ``disk:`` entries, the polysemanticity
family only) with other sample seeds (``[metric_options.polysemanticity] seed``) and on a disjoint slice of the
text. It prints, per entry (raw neurons, each SAE, the PCA and random baselines), from the leaderboard and its
per-unit table (``<board>.units.parquet``):

- the headline numbers: mean and median effective behaviours exp(H), the monosemantic and too-few-examples
  fractions, the median ``n_examples`` over live units (at least one example);
- ``K=n``: the share of ``ok`` units whose K equals their example count (every example its own behaviour);
- SAE minus neurons in mean effective behaviours, with a bootstrap 95% interval over units;
- the spread of every entry's mean effective behaviours, and of the difference, over the sample seeds and the two
  token slices.

Without ``--text`` the text is documentation shipped with Python: the paragraphs of ``pydoc_data.topics`` and of
the docstrings of the standard library's modules, classes and functions. The documents (paragraphs, one per line)
are split in turn between slice A (PCA fit, scored tokens, then the SAEs' training tokens) and slice B (the second
scored slice), so that the two scored slices share no document.

    python scripts/poly_real_model.py --model /tmp/minilm/model --hook encoder.layer.3.intermediate \\
        --tokens 50000 --out /tmp/poly-real
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# The trained SAEs by default: name -> [[train]] fields besides d_sae and training_samples (`--sae` sets others).
SAES: dict[str, dict[str, object]] = {
    "topk-k32": {"architecture": "topk", "k": 32},
    "batchtopk-k64": {"architecture": "batchtopk", "k": 64},
}
NEURONS_PREFIX = "neurons:"
# Paragraphs shorter than this, or with fewer letters than LETTER_SHARE of their characters, are code or tables.
MIN_PARAGRAPH = 80
LETTER_SHARE = 0.6
SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3"}


def parse_sae(text: str) -> tuple[str, dict[str, object]]:
    """``NAME:ARCHITECTURE[,FIELD=VALUE...]`` (``[[train]]`` fields, e.g. ``l1:standard,l1_coefficient=3``) as a name
    and its fields."""
    name, _, rest = text.partition(":")
    architecture, *settings = rest.split(",")
    if not name or not architecture:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME:ARCHITECTURE[,FIELD=VALUE...]")
    fields: dict[str, object] = {"architecture": architecture}
    for setting in settings:
        key, _, value = setting.partition("=")
        fields[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-." else value
    return name, fields


def python_doc_paragraphs() -> list[str]:
    """Prose shipped with Python: the paragraphs of ``pydoc_data.topics`` (the language reference's topics that
    ``help()`` shows) and of the standard library's docstrings, in a fixed order, each on one line, duplicates
    dropped."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIPPED_STDLIB_PARTS & set(parts) or any(part.startswith("test_") for part in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                texts.append(ast.get_docstring(node) or "")
    return paragraphs(texts)


def paragraphs(texts: Iterable[str]) -> list[str]:
    """The prose paragraphs of ``texts``, whitespace collapsed, first occurrences only: blank-line separated, or one
    a line in a text without blank lines (a ``kind = "text"`` data file)."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        for block in text.split("\n\n") if "\n\n" in text else text.splitlines():
            paragraph = " ".join(block.split())
            letters = sum(c.isalpha() for c in paragraph)
            if len(paragraph) >= MIN_PARAGRAPH and letters >= LETTER_SHARE * len(paragraph) and paragraph not in seen:
                seen.add(paragraph)
                kept.append(paragraph)
    return kept


def split_documents(lengths: Sequence[int], tokens_a: int, tokens_b: int) -> tuple[list[int], list[int]]:
    """Indices of the documents for slice A and slice B: each document in turn goes to the slice furthest from its
    target (by its share of the target filled), so that both slices sample the whole text."""
    a: list[int] = []
    b: list[int] = []
    filled = [0, 0]
    for index, length in enumerate(lengths):
        slice_b = filled[1] / tokens_b < filled[0] / tokens_a
        (b if slice_b else a).append(index)
        filled[slice_b] += length
    if filled[0] < tokens_a or filled[1] < tokens_b:
        raise SystemExit(f"the text holds {sum(lengths):,} tokens; slice A needs {tokens_a:,} and slice B {tokens_b:,}: "
                         "give more text (--text) or fewer --tokens")
    return a, b


def bootstrap_difference(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b), and its bootstrap 95% interval: units of each entry resampled with replacement."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    means_a = a[rng.integers(0, a.size, size=(samples, a.size))].mean(axis=1)
    means_b = b[rng.integers(0, b.size, size=(samples, b.size))].mean(axis=1)
    low, high = np.quantile(means_a - means_b, [0.025, 0.975])
    return float(a.mean() - b.mean()), float(low), float(high)


def saturated_share(units: pd.DataFrame) -> float:
    """The share of an entry's ``ok`` units whose K equals their example count (NaN when none is ok)."""
    ok = units[units["poly_status"] == "ok"]
    return float((ok["n_behaviours"] == ok["n_examples"]).mean()) if len(ok) else math.nan


def entry_summary(units: pd.DataFrame) -> dict[str, float]:
    """One entry's headline numbers from its per-unit rows."""
    ok = units[units["poly_status"] == "ok"]
    live = units[units["n_examples"].fillna(0) > 0]
    return {
        "units": len(units),
        "ok": len(ok),
        "mean_eff": float(ok["effective_behaviours"].mean()) if len(ok) else math.nan,
        "median_eff": float(ok["effective_behaviours"].median()) if len(ok) else math.nan,
        "mono": float((ok["n_behaviours"] == 1).sum() / len(units)),
        "too_few": float((units["poly_status"] == "too_few_examples").sum() / len(units)),
        "median_n_live": float(live["n_examples"].median()) if len(live) else math.nan,
        "K=n": saturated_share(units),
    }


def summary_table(units: pd.DataFrame, neurons: str, samples: int = 2000) -> pd.DataFrame:
    """Per entry: `entry_summary`, and for every other entry its mean effective behaviours minus the neurons',
    with a bootstrap 95% interval over units."""
    rows = []
    ok = units[units["poly_status"] == "ok"]
    base = ok.loc[ok["entry"] == neurons, "effective_behaviours"].to_numpy()
    for entry, group in units.groupby("entry", sort=False):
        row = {"entry": entry, **entry_summary(group)}
        values = ok.loc[ok["entry"] == entry, "effective_behaviours"].to_numpy()
        if entry != neurons and values.size and base.size:
            row["minus_neurons"], row["ci_low"], row["ci_high"] = bootstrap_difference(values, base, samples)
        rows.append(row)
    return pd.DataFrame(rows)


def spread_table(runs: dict[str, pd.DataFrame], neurons: str) -> pd.DataFrame:
    """Per entry, over the runs (sample seeds, slices): mean effective behaviours in each, its range, and the
    range of the difference with the neurons."""
    wide = pd.DataFrame({name: table.set_index("entry")["mean_eff"] for name, table in runs.items()})
    difference = wide - wide.loc[neurons]
    out = wide.copy()
    out["range"] = wide.max(axis=1) - wide.min(axis=1)
    out["minus_neurons_min"] = difference.min(axis=1)
    out["minus_neurons_max"] = difference.max(axis=1)
    return out.reset_index(names="entry")


def write_spec(path: Path, *, name: str, model: Path, text: Path, hook: str, tokens: int, fit_tokens: int,
               context_size: int, batch_size: int, train: list[dict[str, object]], entries: list[str],
               metrics: list[str] | None, poly_seed: int) -> Path:
    """A spec as a user writes one: the model folder, a text file, the hook and its baselines, the SAEs."""
    lines = [
        f"name = {json.dumps(name)}",
        f"tokens = {tokens}",
        f"fit_tokens = {fit_tokens}",
        f"context_size = {context_size}",
        f"batch_size = {batch_size}",
        'device = "cpu"',
        f"hooks = [{json.dumps(hook)}]",
        f"entries = {json.dumps(entries)}",
        'output = "{name}.parquet"',
        'artifacts = "artifacts"',
    ]
    if metrics is not None:
        lines.append(f"metrics = {json.dumps(metrics)}")
    lines += ["[model]", 'loader = "hf"', f"name = {json.dumps(str(model))}",
              "[dataset]", 'kind = "text"', f"path = {json.dumps(str(text))}",
              "[metric_options.polysemanticity]", f"seed = {poly_seed}"]
    for sae in train:
        lines += ["[[train]]", *(f"{key} = {json.dumps(value)}" for key, value in sae.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(spec: Path, log: Path) -> float:
    """``saebench-poly run spec``; the seconds it took. Its output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "saebench_poly.cli", "run", str(spec)], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"saebench-poly run {spec} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def polysemanticity_metrics() -> list[str]:
    from saebench_poly.metrics import all_metrics

    return [name for name, (metric, _) in all_metrics().items() if metric.family == "polysemanticity"]


def read_units(out: Path, name: str) -> pd.DataFrame:
    units = pd.read_parquet(out / f"{name}.units.parquet",
                            columns=["entry", "unit", "poly_status", "n_examples", "n_behaviours", "effective_behaviours"])
    return units[units["poly_status"] != "no_embedding"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder (safetensors)")
    parser.add_argument("--hook", default="encoder.layer.3.intermediate", help="the MLP hook (its neurons)")
    parser.add_argument("--text", type=Path, nargs="*", default=[],
                        help="text files (paragraphs separated by blank lines, or one a line; prose only: at least "
                        f"{MIN_PARAGRAPH} characters, {LETTER_SHARE * 100:.0f}%% letters); default: Python's documentation")
    parser.add_argument("--tokens", type=int, default=50_000, help="scored tokens per slice")
    parser.add_argument("--fit-tokens", type=int, default=8192)
    parser.add_argument("--train-tokens", type=int, default=100_000, help="training tokens of each SAE")
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sae", type=parse_sae, action="append", metavar="NAME:ARCH[,FIELD=VALUE...]",
                        help="an SAE to train instead of the default two (repeat the option for more), e.g. "
                        "l1:standard,l1_coefficient=3 or jump:jumprelu,l0_coefficient=1")
    parser.add_argument("--sae-width", type=int, default=3072)
    parser.add_argument("--sae-batch", type=int, default=256)
    parser.add_argument("--sae-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sample seeds of the metric")
    parser.add_argument("--no-slice-b", action="store_true", help="skip the second token slice")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True, help="folder for the text, specs, boards and SAEs")
    args = parser.parse_args()
    saes = dict(args.sae) if args.sae else SAES
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers import AutoTokenizer

    out, model = args.out.resolve(), args.model.resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = paragraphs(p.read_text(encoding="utf-8", errors="replace") for p in args.text) if args.text else python_doc_paragraphs()
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]  # + the separator
    # a margin of 10% for the BOS of every context and the ignored separators
    need_a = int(1.1 * (args.fit_tokens + args.tokens + args.train_tokens + len(saes) * args.sae_batch))
    need_b = 0 if args.no_slice_b else int(1.1 * args.tokens)
    a, b = split_documents(lengths, need_a, max(need_b, 1))
    (out / "slice_a.txt").write_text("".join(docs[i] + "\n" for i in a))
    (out / "slice_b.txt").write_text("".join(docs[i] + "\n" for i in b))
    print(f"text: {len(docs):,} paragraphs, {sum(lengths):,} tokens; slice A {len(a):,} paragraphs, slice B {len(b):,}")

    common = dict(model=model, hook=args.hook, tokens=args.tokens, fit_tokens=args.fit_tokens,
                  context_size=args.context_size, batch_size=args.batch_size)
    train = [{"name": name, **fields, "d_sae": args.sae_width, "training_samples": args.train_tokens,
              "batch_size": args.sae_batch, "lr": args.sae_lr, "hook": args.hook} for name, fields in saes.items()]
    first = write_spec(out / "main.toml", name="main", text=out / "slice_a.txt", train=train, entries=[],
                       metrics=None, poly_seed=args.seeds[0], **common)
    print(f"saebench-poly run {first} ({len(saes)} SAEs trained, every metric) ...", flush=True)
    seconds = {"main": run_cli(first, out / "main.log")}
    trained = [f"disk:{out / 'artifacts' / 'saes' / name}" for name in saes]
    poly = polysemanticity_metrics()
    runs = {f"seed {args.seeds[0]}": "main"}
    for seed in args.seeds[1:]:
        name = f"seed{seed}"
        write_spec(out / f"{name}.toml", name=name, text=out / "slice_a.txt", train=[], entries=trained, metrics=poly,
                   poly_seed=seed, **common)
        seconds[name] = run_cli(out / f"{name}.toml", out / f"{name}.log")
        runs[f"seed {seed}"] = name
    if not args.no_slice_b:
        write_spec(out / "sliceb.toml", name="sliceb", text=out / "slice_b.txt", train=[], entries=trained, metrics=poly,
                   poly_seed=args.seeds[0], **common)
        seconds["sliceb"] = run_cli(out / "sliceb.toml", out / "sliceb.log")
        runs["slice B"] = "sliceb"
    print("run seconds:", {name: round(s) for name, s in seconds.items()})

    neurons = f"{NEURONS_PREFIX}{args.hook}"
    tables = {label: summary_table(read_units(out, name), neurons, args.bootstrap) for label, name in runs.items()}
    pd.set_option("display.width", 200)
    main_table = tables[f"seed {args.seeds[0]}"]
    print(f"\n{model.name} {args.hook}, {args.tokens:,} tokens, context {args.context_size}, seed {args.seeds[0]}, slice A:")
    print(main_table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    main_table.to_csv(out / "summary.csv", index=False)
    spread = spread_table(tables, neurons)
    print("\nmean effective behaviours over sample seeds and token slices:")
    print(spread.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    spread.to_csv(out / "spread.csv", index=False)
    worst = main_table["K=n"].max()
    print(f"\nlargest K=n share over entries: {worst:.1%} ({'below' if worst < 0.2 else 'NOT below'} 20%)")


if __name__ == "__main__":
    main()
