"""Tokens that are not text (BOS, EOS, pad, CLS, SEP, ...) are scored by no metric, wherever they stand in a
context, unless the spec's ``ignore_tokens`` says otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saebench_poly.models.base import ModelConfig
from saebench_poly.models.hooked import load_hooked_transformer
from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec
from tests.conftest import BOS, D_MLP, D_MODEL, EOS, VOCAB, char_tokenizer

NEURONS = "blocks.0.mlp.hook_post"
CONTEXT = 8
SPECIAL = {BOS, EOS}  # the char tokenizer's BOS and EOS (its pad is EOS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny transformer-lens model of conftest, with the char tokenizer in its folder."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    cfg = HookedTransformerConfig(n_layers=1, d_model=D_MODEL, n_ctx=32, d_head=4, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    folder = save_hooked_transformer(HookedTransformer(cfg), tmp_path_factory.mktemp("tl-with-tokenizer"))
    char_tokenizer().save_pretrained(folder)
    return folder


def token_rows(n_rows: int = 40, length: int = 12) -> list[list[int]]:
    """Text ids (3..31) with BOS and EOS at random places, position 0 of many contexts included."""
    rng = np.random.default_rng(1)
    rows = rng.integers(3, 32, size=(n_rows, length))
    rows[rng.random(rows.shape) < 0.15] = EOS
    rows[rng.random(rows.shape) < 0.1] = BOS
    rows[::3, 0] = BOS
    return rows.tolist()


def write_spec(tmp_path: Path, model_dir: Path, **top: object) -> Path:
    pd.DataFrame({"input_ids": token_rows()}).to_parquet(tmp_path / "ids.parquet")
    settings = {"name": "special", "tokens": 160, "fit_tokens": 40, "context_size": CONTEXT, "batch_size": 3,
                "prepend_bos": False, "hooks": [NEURONS], "baselines": ["neurons"], "device": "cpu", **top}
    lines = [f"{key} = {value!r}".replace("'", '"').replace("False", "false").replace("True", "true")
             for key, value in settings.items()]
    lines += ['output = "board.parquet"', "[model]", 'loader = "transformer_lens"', f'name = "{model_dir}"',
              "[dataset]", 'kind = "tokens"', 'path = "ids.parquet"', "shuffle_buffer = 0"]
    path = tmp_path / "spec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def scored_contexts(fit_tokens: int, tokens: int, prepend_bos: bool) -> torch.Tensor:
    """The score part's contexts, cut by hand from the rows (concatenated, in order, windows of CONTEXT)."""
    width = CONTEXT - prepend_bos
    stream = np.concatenate(token_rows())
    windows = stream[: len(stream) // width * width].reshape(-1, width)
    skip = -(-fit_tokens // width)
    windows = windows[skip : skip + -(-tokens // width)]
    if prepend_bos:
        windows = np.concatenate([np.full((len(windows), 1), BOS), windows], axis=1)
    return torch.from_numpy(windows)


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_special_tokens_are_excluded_from_every_metric_wherever_they_stand(tmp_path, model_dir, prepend_bos) -> None:
    loaded = load_spec(write_spec(tmp_path, model_dir, prepend_bos=prepend_bos))
    result = run_benchmark(loaded, write=False)

    contexts = scored_contexts(40, 160, prepend_bos)
    scored = ~torch.isin(contexts, torch.tensor(sorted(SPECIAL)))
    if prepend_bos:
        scored[:, 0] = False
    assert bool((contexts[:, 0] == BOS).any()) and bool((contexts[:, 1:] == EOS).any())  # the data do test it
    assert result.tokens_scored == int(scored.sum()) < contexts.numel() - prepend_bos * len(contexts)

    model = load_hooked_transformer(ModelConfig(loader="transformer_lens", name=str(model_dir)), torch.device("cpu"),
                                    torch.float32).model
    _, cache = model.run_with_cache(contexts, names_filter=[NEURONS])
    expected_max = cache[NEURONS][scored].max(dim=0).values.double()
    units = result.units[result.units["entry"] == f"neurons:{NEURONS}"].sort_values("unit")
    np.testing.assert_allclose(units["max_activation"].to_numpy(), expected_max.numpy(), rtol=1e-5)
    examples = [e for unit in units["central_examples"] if unit is not None for e in unit]
    assert examples and all(int(contexts[e["context"], e["position"]]) not in SPECIAL for e in examples)


def test_ignore_tokens_is_a_spec_key_in_the_spec_hash(tmp_path, model_dir) -> None:
    default = load_spec(write_spec(tmp_path, model_dir))
    everything = load_spec(write_spec(tmp_path, model_dir, ignore_tokens=[]))
    only_eos = load_spec(write_spec(tmp_path, model_dir, ignore_tokens=[EOS]))
    hashes = {spec.spec.settings_hash() for spec in (default, everything, only_eos)}
    assert len(hashes) == 3 and default.spec.settings()["ignore_tokens"] == "special"

    contexts = scored_contexts(40, 160, prepend_bos=False)
    assert run_benchmark(everything, write=False).tokens_scored == contexts.numel()
    assert run_benchmark(only_eos, write=False).tokens_scored == int((contexts != EOS).sum())


def test_a_bad_ignore_tokens_value_is_one_line(tmp_path, model_dir, run_cli) -> None:
    spec = write_spec(tmp_path, model_dir, ignore_tokens="all")
    code, _, err = run_cli("run", str(spec))
    assert code == 2 and err.startswith("saebench-poly: error:") and "ignore_tokens" in err and len(err.splitlines()) == 1


def test_a_bert_models_cls_sep_and_pad_are_not_scored_at_position_0_or_anywhere(tmp_path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(35))]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32)
    BertModel(config).save_pretrained(tmp_path / "bert", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "bert")
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    rng = np.random.default_rng(0)
    rows = [[cls, *rng.integers(5, 40, size=n).tolist(), sep] + [pad] * (8 - n) for n in rng.integers(3, 9, size=30)]
    pd.DataFrame({"input_ids": rows}).to_parquet(tmp_path / "ids.parquet")  # each row one 10-token context
    (tmp_path / "bert.toml").write_text(f'''
name = "bert-special"
tokens = 200
fit_tokens = 0
context_size = 10
prepend_bos = false
device = "cpu"
hooks = ["encoder.layer.0.intermediate.intermediate_act_fn"]
baselines = ["neurons"]
output = "board.parquet"
[model]
loader = "hf"
name = "{tmp_path / 'bert'}"
[dataset]
kind = "tokens"
path = "ids.parquet"
shuffle_buffer = 0
''')
    result = run_benchmark(load_spec(tmp_path / "bert.toml"), write=False)
    contexts = torch.tensor(rows[:20])
    assert result.tokens_scored == int((contexts >= 5).sum())
    units = result.units[result.units["entry"] == "neurons:encoder.layer.0.intermediate.intermediate_act_fn"]
    examples = [e for unit in units["central_examples"] if unit is not None for e in unit]
    assert examples and all(int(contexts[e["context"], e["position"]]) >= 5 for e in examples)
    assert all(e["position"] > 0 for e in examples)


def test_a_list_of_end_of_sequence_ids_in_a_config_names_every_one() -> None:
    """Llama 3's config names several ``eos_token_id``s; each is a special token (was: the list was skipped)."""
    from types import SimpleNamespace

    from saebench_poly.models.base import special_token_ids

    config = SimpleNamespace(eos_token_id=[128001, 128008, 128009], bos_token_id=128000, pad_token_id=None)
    assert special_token_ids(config) == {128000, 128001, 128008, 128009}
    assert special_token_ids(SimpleNamespace(eos_token_id=True)) == set()  # a flag is not an id
