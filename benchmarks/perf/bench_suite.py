"""Where the time of a run goes, family by family, measured in one run on the same data.

Two cases, each on random weights (throughput does not depend on what the weights learned):

- ``tl``: the random 4-layer transformer-lens model of `bench_pass.py` (d_model 256) and two TopK SAEs of 4,096
  latents on ``blocks.2.hook_resid_post`` and ``blocks.2.hook_mlp_out``; the run adds the MLP neurons of block 2
  and the neurons, PCA and random rotation of the residual stream, and scores the downstream splices;
- ``bert``: a BERT-size encoder (Hugging Face ``BertModel``: 6 layers, hidden 384, intermediate 1536, the shape of
  MiniLM-L6) and two TopK SAEs of 3,072 latents (L0 32) on the 1,536 MLP neurons of layer 3
  (``encoder.layer.3.intermediate.intermediate_act_fn``); the run adds their neurons, PCA and random rotation (an
  encoder has no next-token loss, so no downstream splices).

For each case, on the entries a run scores (the SAEs and the baselines it adds; PCA fitted once, up front):

- bare pass: the model forward with the hooks cached, plus every entry's encode and decode (the
  `saebench_poly.activations.score` loop with no accumulator); "SAEs only" also drops the baselines;
- each metric family alone: the same pass feeding that family's accumulators, then their `compute`;
- the post-pass stage (`saebench_poly.revisit.revisit`, after the polysemanticity selection) and the
  Parquet write (records and `leaderboard.replace_spec_rows`), each added to the bare pass;
- the full suite: `run_benchmark` end to end as the CLI runs it (model and entry loading, PCA fit, the pass with
  every metric, the post-pass stage, the write), with and without the downstream splices.

Each configuration runs ``--repeats`` times, round-robin (so that a shared machine's drift hits all of them), and
the median counts. Ratios are tokens/s of the configuration over tokens/s of the bare pass (1 = free).
``--rss`` also runs the full suite in fresh processes at 1x and 10x ``--rss-tokens`` and reports their peak RSS, in
all and stage by stage (``--rss-only``: that alone).
``--device cuda`` runs the same on a GPU, timed by the wall clock after a CUDA synchronisation; ``--dtype``
(default float32) sets the specs' dtype.

    python benchmarks/perf/bench_suite.py [--case tl|bert|all] [--tokens N] [--repeats R] [--rss | --rss-only] [--only F ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pass import build_inputs  # noqa: E402

# family label -> the accumulator families (registry names) it feeds
FAMILIES: dict[str, tuple[str, ...]] = {
    "core": ("sparsity", "reconstruction"),
    "downstream": ("downstream",),
    "capacity": ("capacity",),
    "rate": ("rate",),
    "geometry": ("geometry",),
    "polysemanticity selection": ("polysemanticity",),
}
STAGES = ("post-pass stage", "parquet write")
FULL = ("full suite without downstream", "full suite")


def build_bert(folder: Path, tokens: int, context: int, batch_size: int, d_sae: int, device: str = "cpu",
               dtype: str = "float32") -> Path:
    """A random BERT-size encoder, two random TopK SAEs on its layer-3 MLP neurons, token rows, and the spec."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "model", safe_serialization=True)
    hook = "encoder.layer.3.intermediate.intermediate_act_fn"
    for index in range(2):
        sae = TopKSAE(TopKSAEConfig(d_in=1536, d_sae=d_sae, k=32))
        with torch.no_grad():
            for param in sae.parameters():
                param.normal_(0, 0.02)
        sae.cfg.metadata.hook_name = hook
        sae.save_model(folder / f"sae{index}")
    _token_rows(folder, tokens, context, 8192)
    spec = folder / "spec.toml"
    spec.write_text(
        f'name = "perf-bert"\ntokens = {tokens}\nfit_tokens = {max(tokens // 4, 1024)}\ncontext_size = {context}\n'
        f'batch_size = {batch_size}\nbos_token_id = 0\ndevice = "{device}"\ndtype = "{dtype}"\nhooks = ["{hook}"]\n'
        'entries = ["disk:sae0", "disk:sae1"]\noutput = "board.parquet"\n'
        f'[model]\nloader = "hf"\nname = "{folder / "model"}"\n'
        '[dataset]\nkind = "tokens"\npath = "tokens.parquet"\n'
    )
    return spec


def _token_rows(folder: Path, tokens: int, context: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    rows = 2 * tokens // context + 8
    pd.DataFrame({"input_ids": [rng.integers(1, vocab, context).tolist() for _ in range(rows)]}).to_parquet(
        folder / "tokens.parquet")


def build_case(case: str, folder: Path, args: argparse.Namespace, tokens: int) -> Path:
    if case == "bert":
        return build_bert(folder, tokens, args.context, args.batch_size, args.bert_d_sae, args.device, args.dtype)
    tl = argparse.Namespace(layers=4, d_model=256, context=args.context, vocab=4096, d_sae=4096, tokens=tokens,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    spec, _ = build_inputs(folder, tl)
    return spec


class Prepared:
    """The model, the entries a run scores (PCA fitted) and the scored batches, loaded once."""

    def __init__(self, loaded) -> None:
        from saebench_poly.activations import fit_baselines
        from saebench_poly.inputs import Inputs
        from saebench_poly.metrics import resolve_metric_options
        from saebench_poly.models import MODEL_LOADERS
        from saebench_poly.run import _load_entries

        spec = loaded.spec
        self.loaded, self.device, dtype = loaded, torch.device(spec.device), getattr(torch, spec.dtype)
        self.adapter = MODEL_LOADERS.get(spec.model.loader)(spec.model, self.device, dtype)
        self.inputs = Inputs(spec, self.adapter)
        self.entries = _load_entries(loaded, self.adapter, self.device, dtype)
        fit_baselines(self.adapter, self.entries, self.inputs.batches("fit"))
        for entry in self.entries:
            entry.to(self.device, dtype)
        self.batches = list(self.inputs.batches("score"))
        self.options = resolve_metric_options(spec.metric_options)

    def scored(self, families: tuple[str, ...], saes_only: bool = False):
        from saebench_poly.activations import ScoredEntry
        from saebench_poly.metrics import ACCUMULATORS, build_accumulator

        scored = []
        for entry in self.entries:
            if saes_only and entry.kind != "sae":
                continue
            kinds = [ACCUMULATORS.get(name) for name in families]
            accumulators = [build_accumulator(kind, entry, self.adapter, self.options) for kind in kinds
                            if kind.applies(entry, self.adapter)]
            scored.append(ScoredEntry(entry, accumulators))
        return scored


def _cuda_wall_time() -> float:
    """Wall time once the GPU has finished the work queued so far."""
    torch.cuda.synchronize()
    return time.perf_counter()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter, "cuda": _cuda_wall_time}
clock = CLOCKS["cpu"]


def _timed_seconds(work: Callable[[], object]) -> float:
    start = clock()
    work()
    return clock() - start


def pass_seconds(prepared: Prepared, families: tuple[str, ...], saes_only: bool = False) -> tuple[int, float, float]:
    """One scoring pass feeding ``families`` on every entry, then their `compute` (except for the polysemanticity
    selection, whose results come after the post-pass stage): tokens, seconds in all, seconds of `compute`."""
    from saebench_poly.activations import score

    scored = prepared.scored(families, saes_only)
    tokens, computing = 0, 0.0

    def work() -> None:
        nonlocal tokens, computing
        tokens = score(prepared.adapter, scored, prepared.batches)
        if families != FAMILIES["polysemanticity selection"]:
            computing = _timed_seconds(lambda: [a.compute() for item in scored for a in item.accumulators])

    seconds = _timed_seconds(work)
    return tokens, seconds, computing


def necessary_forwards_seconds(prepared: Prepared) -> float:
    """The bare pass plus the forwards that the downstream statistics cannot do without: the clean forward to the
    logits, one zero-ablation per hook, one splice per entry whose reconstruction differs from its input (beyond
    rounding, `saebench_poly.activations.reproduces`); no log-probabilities, no statistics."""
    from saebench_poly.activations import _spliced, reproduces

    adapter, entries = prepared.adapter, prepared.entries
    hooks = sorted({hook for entry in entries for hook in (entry.hook, entry.output_hook)})
    spliced_hooks = sorted({entry.output_hook for entry in entries})

    def work() -> None:
        with torch.no_grad():
            for batch in prepared.batches:
                clean = adapter.forward(batch, hooks, logits=True)
                activations = {hook: clean.activations[hook][batch.score_mask] for hook in hooks}
                for hook in spliced_hooks:
                    adapter.forward_with_replacement(batch, clean, hook, _spliced(batch.score_mask, None))
                for entry in entries:
                    x = activations[entry.hook]
                    x_hat = entry.reconstruct(x, entry.encode(x))
                    if not reproduces(activations[entry.output_hook], x_hat):
                        adapter.forward_with_replacement(batch, clean, entry.output_hook, _spliced(batch.score_mask, x_hat))

    return _timed_seconds(work)


def stage_seconds(prepared: Prepared, stage: str, board: Path) -> float:
    """Seconds of the post-pass stage (after a pass with the polysemanticity selection: the one re-run of the
    characteristic examples' contexts, with the stored examples' windows, the behaviours, then the stored examples'
    rows) or of the Parquet write (after a pass with every
    metric, the post-pass stage and the records built from them, whose `compute` calls belong to the families):
    the stage alone, not what comes before it."""
    from saebench_poly import leaderboard
    from saebench_poly.activations import score
    from saebench_poly.example_windows import stored_examples
    from saebench_poly.metrics import ACCUMULATORS, resolve_metrics
    from saebench_poly.metrics.base import ExampleWindows
    from saebench_poly.revisit import revisit
    from saebench_poly.run import _records
    from saebench_poly.stored_examples import DEFAULT_MEMBERS, WINDOW_AFTER, WINDOW_BEFORE

    contexts = prepared.inputs.scored_contexts
    families = FAMILIES["polysemanticity selection"] if stage == "post-pass stage" else tuple(ACCUMULATORS.names())
    scored = prepared.scored(families)
    tokens = score(prepared.adapter, scored, prepared.batches)

    def post_pass() -> dict:
        revisit(prepared.adapter, scored, contexts,
                windows=ExampleWindows(members=DEFAULT_MEMBERS, before=WINDOW_BEFORE, after=WINDOW_AFTER))
        return stored_examples(scored, prepared.adapter)

    if stage == "post-pass stage":
        return _timed_seconds(post_pass)
    windows = post_pass()
    spec = prepared.loaded.spec
    rows, units, stored = _records(prepared.loaded, prepared.adapter, prepared.inputs, scored, resolve_metrics(None),
                                   tokens, prepared.device, windows)
    board.unlink(missing_ok=True)
    return _timed_seconds(lambda: leaderboard.replace_spec_rows(board, spec.name, rows, units, settings=spec.settings(),
                                                                examples=stored))


class TimingReporter:
    """Records the time of each task a run reports (`saebench_poly.run.Reporter`), by the first word of its
    description, on ``timer`` (by default the script's `clock`)."""

    def __init__(self, timer: Callable[[], float] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.timer = timer

    @contextmanager
    def task(self, description: str, total: int | None):
        now = self.timer or clock
        start = now()
        yield lambda _n: None
        self.seconds[description.split(" ")[0]] = now() - start

    def message(self, text: str) -> None:
        pass


def full_seconds(loaded, downstream: bool) -> tuple[int, float, dict[str, float]]:
    """`run_benchmark` end to end (writing its leaderboard): tokens, seconds, seconds per reported task."""
    from saebench_poly.metrics import all_metrics
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import with_overrides

    metrics = None if downstream else [n for n, (spec, _) in all_metrics().items() if spec.family != "downstream"]
    reporter = TimingReporter()
    loaded = with_overrides(loaded, {"metrics": metrics})
    start = clock()
    result = run_benchmark(loaded, reporter)
    return result.tokens_scored, clock() - start, reporter.seconds


def measure(case: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(label, tokens/s, ratio to the bare pass) for every configuration of ``case``."""
    from saebench_poly.spec import load_spec

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        loaded = load_spec(build_case(case, folder, args, args.tokens if case == "tl" else args.bert_tokens))
        prepared = Prepared(loaded)
        downstream = prepared.adapter.supports_downstream
        wanted = [label for label in (*FAMILIES, *STAGES, *FULL) if not args.only or label in args.only]
        if not downstream:
            wanted = [label for label in wanted if label not in ("downstream", "full suite")]
        pass_seconds(prepared, ())  # warm-up: first-call allocations and kernel selection
        seconds: dict[str, list[float]] = {}
        fixed: dict[str, list[float]] = {}
        tokens = 0
        for _ in range(args.repeats):
            tokens, bare, _ = pass_seconds(prepared, ())
            seconds.setdefault("bare pass", []).append(bare)
            seconds.setdefault("bare pass, SAEs only", []).append(pass_seconds(prepared, (), saes_only=True)[1])
            if downstream and "downstream" in wanted:
                seconds.setdefault("downstream: necessary forwards", []).append(necessary_forwards_seconds(prepared))
            for label in wanted:
                if label in FAMILIES:
                    _, value, computing = pass_seconds(prepared, FAMILIES[label])
                    fixed.setdefault(label, []).append(computing)
                elif label in STAGES:
                    value = bare + stage_seconds(prepared, label, folder / "stage.parquet")
                else:
                    value = full_seconds(loaded, downstream=label == "full suite")[1]
                seconds.setdefault(label, []).append(value)
        entries = ", ".join(f"{e.name} ({e.width})" for e in prepared.entries)
    median = {label: statistics.median(values) for label, values in seconds.items()}
    print(f"\ncase {case}: {tokens} tokens, batch {args.batch_size} x context {args.context}, "
          f"{args.device}, {args.dtype}, {torch.get_num_threads()} thread(s), {args.clock} time, median of {args.repeats}; "
          f"entries: {entries}")
    print(f"  {'configuration':<32} {'tokens/s':>10}   ratio to bare (every entry / SAEs only);  per-batch ratio and "
          "fixed seconds (compute) of a family")
    results = []
    bare, saes = median["bare pass"], median["bare pass, SAEs only"]
    for label, value in median.items():
        results.append((label, tokens / value, bare / value, saes / value))
        split = ""
        if label in fixed:
            computing = statistics.median(fixed[label])
            split = f"  per batch {bare / (value - computing):6.3f}, fixed {computing:6.2f} s"
        print(f"  {label:<32} {tokens / value:10,.0f}   {bare / value:6.3f} / {saes / value:6.3f}{split}   "
              f"({value:.2f} s; runs {', '.join(f'{v:.2f}' for v in seconds[label])})")
    if "downstream" in median and "downstream: necessary forwards" in median:
        needed = median["downstream: necessary forwards"] - bare
        print(f"  downstream costs {(median['downstream'] - bare) / needed:.2f}x its necessary forwards "
              f"({median['downstream'] - bare:.2f} s against {needed:.2f} s)")
    return results


def _memory_gib() -> tuple[float, float]:
    """(resident, peak resident since the last `_reset_peak`) of this process, GiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 2**20 for key in ("VmRSS", "VmHWM"))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


class MemoryReporter:
    """Records the peak resident memory of each task a run reports (`saebench_poly.run.Reporter`)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    @contextmanager
    def task(self, description: str, total: int | None):
        self._between()
        yield lambda _n: None
        self.peaks[description] = max(self.peaks.get(description, 0.0), _memory_gib()[1])
        _reset_peak()

    def message(self, text: str) -> None:
        pass

    def _between(self) -> None:
        """The peak since the last task ended (loading, the records' `compute` calls, the write), then a reset."""
        self.peaks[BETWEEN] = max(self.peaks.get(BETWEEN, 0.0), _memory_gib()[1])
        _reset_peak()


BETWEEN = "outside the stages (loading, compute, write)"


def peak_rss(case: str, args: argparse.Namespace, tokens: int) -> dict[str, float]:
    """Peak resident memory (GiB) of a fresh process that runs the full suite of ``case`` on ``tokens`` tokens."""
    command = [sys.executable, __file__, "--child-rss", case, "--threads", str(args.threads or 1), "--context", str(args.context),
               "--batch-size", str(args.batch_size), "--bert-d-sae", str(args.bert_d_sae), "--tokens", str(tokens)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def child_rss(case: str, args: argparse.Namespace) -> None:
    """In a fresh process: the full suite's peak RSS, in all and in each stage it reports (and outside them:
    loading, the records' `compute` calls, the write), from the start of `run_benchmark` (building the case is left
    out)."""
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec

    reporter = MemoryReporter()
    with tempfile.TemporaryDirectory() as scratch:
        loaded = load_spec(build_case(case, Path(scratch), args, args.tokens))
        _reset_peak()
        run_benchmark(loaded, reporter)
        reporter._between()
    print(json.dumps({"peak_rss_gib": max(reporter.peaks.values()), **reporter.peaks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("tl", "bert", "all"), default="all")
    parser.add_argument("--tokens", type=int, default=16_384, help="scored tokens of the tl case")
    parser.add_argument("--bert-tokens", type=int, default=8_192, help="scored tokens of the bert case")
    parser.add_argument("--bert-d-sae", type=int, default=3072)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="measure only these configurations (labels as printed)")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS of the full suite at 1x and 10x")
    parser.add_argument("--rss-tokens", type=int, default=4_096)
    parser.add_argument("--rss-only", action="store_true", help="measure only the peak RSS (no timings)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 1 on the CPU, where CPU time is then wall time; torch's own on a GPU)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                        help="process CPU time (robust to other processes on a shared machine), wall time, or wall "
                             "time after a CUDA synchronisation (the default, and the only choice, on a GPU); "
                             "default cpu")
    parser.add_argument("--device", default="cpu", help="the specs' device (cpu, cuda)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32",
                        help="the specs' dtype")
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and args.clock not in (None, "cuda"):
        parser.error("on a GPU only the synchronised wall clock (--clock cuda) measures the work")
    if on_gpu and (args.rss or args.rss_only):
        parser.error("--rss measures the CPU process's resident memory: run it with --device cpu")
    args.clock = args.clock or ("cuda" if on_gpu else "cpu")
    global clock
    clock = CLOCKS[args.clock]
    if args.threads is None and not on_gpu:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child_rss:
        child_rss(args.child_rss, args)
        return
    cases = ("tl", "bert") if args.case == "all" else (args.case,)
    if not args.rss_only:
        for case in cases:
            measure(case, args)
    if args.rss or args.rss_only:
        for case in cases:
            low, high = (peak_rss(case, args, factor * args.rss_tokens) for factor in (1, 10))
            total_low, total_high = low.pop("peak_rss_gib"), high.pop("peak_rss_gib")
            print(f"case {case}: full suite peak RSS {total_low:.2f} GiB at {args.rss_tokens} tokens, {total_high:.2f} "
                  f"GiB at {10 * args.rss_tokens} tokens (+{100 * (total_high / total_low - 1):.1f}%); by stage:")
            for stage in low:
                print(f"  {stage:32s} {low[stage]:.2f} -> {high.get(stage, float('nan')):.2f} GiB")


if __name__ == "__main__":
    main()
