"""Shared fixtures: tiny models, SAEs and specs built locally, so that every test runs offline."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import string

import numpy as np
import pandas as pd
import pytest
import torch

from saebench_poly import cli

# The tests' tensors are tiny: with more than one thread torch's workers spin-wait on each other, which costs far
# more than it saves (a toy SAE trained in 7 s with 2 threads on a loaded machine and in 0.1 s with one).
torch.set_num_threads(1)

VOCAB = 64
D_MODEL = 16
D_MLP = 32
CONTEXT = 12
BOS, EOS = 0, 1
CHARS = string.ascii_lowercase + " .,"
TOY_SPEC = Path(__file__).resolve().parent.parent / "benchmarks" / "toy-superposition.toml"


def copy_of_toy_spec(folder: Path) -> Path:
    """The embedded default spec copied into ``folder``, so that a run of it trains its toy model and SAEs under
    ``folder`` and not in the checkout's ``benchmarks/.artifacts`` (which `make run` reuses)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(TOY_SPEC, folder / TOY_SPEC.name))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the hub, whatever the environment (the libraries read the flags once, at import)."""
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def char_tokenizer():
    """A character-level tokenizer: <bos>=0, <eos>=1, <unk>=2, then one id per character of CHARS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": BOS, "<eos>": EOS, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_tl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer transformer-lens model with random weights, saved as a local folder."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_ctx=32, d_head=4, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    return save_hooked_transformer(HookedTransformer(cfg), tmp_path_factory.mktemp("tl-model"))


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-tokenized data: 200 rows of 24 random token ids (ids 1..VOCAB-1; 0 is BOS)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tokens") / "tokens.parquet"
    pd.DataFrame({"input_ids": [rng.integers(1, VOCAB, size=24).tolist() for _ in range(200)]}).to_parquet(path)
    return path


def write_sae(folder: Path, architecture: str, d_in: int, d_sae: int, hook: str | None, seed: int = 0, **options) -> Path:
    """A sae-lens inference SAE of ``architecture`` with random (seeded) weights, saved with `save_model`."""
    from sae_lens.registry import get_sae_class

    torch.manual_seed(seed)
    sae_class, config_class = get_sae_class(architecture)
    cfg = config_class(d_in=d_in, d_sae=d_sae, **options)
    if hook is not None:
        cfg.metadata.hook_name = hook
    sae = sae_class(cfg)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name in ("threshold", "log_threshold"):
                param.fill_(0.01 if name == "threshold" else -4.6)
            elif param.dim() > 1 or name.startswith("b_"):
                param.copy_(torch.randn_like(param) * (0.3 if param.dim() > 1 else 0.05))
    sae.save_model(folder)
    return folder


@pytest.fixture
def tl_spec(tmp_path: Path, tiny_tl_model_dir: Path, token_file: Path) -> Callable[..., Path]:
    """Write a spec for the tiny transformer-lens model; keyword arguments override top-level keys."""

    def make(entries: list[str] | None = None, extra: str = "", **top: object) -> Path:
        settings = {"name": "tiny-tl", "tokens": 400, "fit_tokens": 200, "context_size": CONTEXT, "batch_size": 4,
                    "bos_token_id": 0, "hooks": ["blocks.0.hook_resid_post"], "device": "cpu", **top}
        lines = [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append(f"entries = {_toml(entries or [])}")
        lines.append(f"output = {_toml(str(tmp_path / 'out' / 'board.parquet'))}")
        lines += ["[model]", 'loader = "transformer_lens"', f"name = {_toml(str(tiny_tl_model_dir))}"]
        lines += ["[dataset]", 'kind = "tokens"', f"path = {_toml(str(token_file))}", extra]
        path = tmp_path / "spec.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run the real ``saebench-poly`` entry point in-process: returns (exit code, stdout, stderr)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["saebench-poly", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


# Every token string is markup: the report must show each as text.
HOSTILE_TOKEN = "<script>window.__token_ran = 1</script>"


def hostile_tokenizer():
    """A word-level tokenizer over the test vocabulary whose every token string is HTML."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{(HOSTILE_TOKEN if i == 5 else f"<b>t{i}</b>"): i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<b>t1</b>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<b>t1</b>", unk_token="<b>t1</b>")


@pytest.fixture(scope="session")
def text_tl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny transformer-lens model of conftest, saved with `hostile_tokenizer`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=32, d_head=4, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    folder = save_hooked_transformer(HookedTransformer(cfg), tmp_path_factory.mktemp("tl-text"))
    hostile_tokenizer().save_pretrained(folder)  # the loader takes a tokenizer from the model's folder
    return folder
