"""`saebench-poly run` end to end on tiny Hugging Face models saved to a folder: a causal LM read from text with its
own tokenizer (downstream metrics included), and an encoder read from pre-tokenized ids."""

from __future__ import annotations

import string
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import char_tokenizer, write_sae


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_spec(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_gpt2_from_text_scores_an_sae_on_the_mlp_neurons_and_the_residual(gpt2_folder, run_cli, tmp_path: Path) -> None:
    (tmp_path / "docs.txt").write_text("".join(f"the {c}{c} cat sat on a mat, {c}.\n" for c in string.ascii_lowercase * 3))
    write_sae(tmp_path / "neuron-sae", "standard", 64, 96, "transformer.h.1.mlp.act")
    write_sae(tmp_path / "resid-sae", "topk", 16, 48, "transformer.h.0", k=3)
    spec = write_spec(tmp_path / "gpt2.toml", f'''
name = "tiny-gpt2"
tokens = 300
fit_tokens = 100
context_size = 16
batch_size = 4
device = "cpu"
entries = ["disk:neuron-sae", "disk:resid-sae"]
output = "board.parquet"
[model]
loader = "hf"
name = "{gpt2_folder}"
[dataset]
kind = "text"
path = "docs.txt"
''')
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "board.parquet")
    wide = rows.pivot_table(index="entry", columns="metric", values="value")
    assert set(wide.index) == {"neuron-sae", "resid-sae", "neurons:transformer.h.1.mlp.act", "neurons:transformer.h.0.mlp.act"}
    assert wide.loc["resid-sae", "l0"] == pytest.approx(3)
    assert wide.loc["neurons:transformer.h.1.mlp.act", "ce_increase"] == 0
    assert wide.loc["neuron-sae", "kl_divergence"] > 0
    first = rows.iloc[0]
    assert first["model_family"] == "hf" and first["tokenizer"] and first["dataset_revision"]
    # 20 contexts of 15 scored positions, less the 11 EOS between documents (28 tokens each with its EOS) that
    # fall in them: separators are special tokens, never scored
    assert first["tokens_scored"] == 20 * 15 - 11


def test_bert_encoder_from_token_ids_scores_neurons_without_downstream_metrics(bert_folder, run_cli, tmp_path: Path) -> None:
    pd.DataFrame({"input_ids": [[(7 * i + j) % 39 + 1 for j in range(20)] for i in range(40)]}).to_parquet(tmp_path / "ids.parquet")
    write_sae(tmp_path / "sae", "jumprelu", 32, 64, "encoder.layer.0.intermediate")
    spec = write_spec(tmp_path / "bert.toml", f'''
name = "tiny-bert"
tokens = 200
fit_tokens = 50
context_size = 10
prepend_bos = false
device = "cpu"
hooks = ["encoder.layer.0.intermediate"]
entries = ["disk:sae"]
output = "board.parquet"
[model]
loader = "hf"
name = "{bert_folder}"
[dataset]
kind = "tokens"
path = "ids.parquet"
''')
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "board.parquet")
    # BERT's `intermediate` (dense then GELU) outputs the MLP neurons themselves: one unit set, one neurons row,
    # with neuron embeddings, and the SAE on it gets the neuron participation ratios
    assert set(rows["entry"]) == {"sae", "neurons:encoder.layer.0.intermediate", "pca:encoder.layer.0.intermediate",
                                  "random:encoder.layer.0.intermediate"}
    assert "downstream" not in set(rows["metric_family"])
    assert {"neuron_pr_mean", "neuron_pr_median"} <= set(rows.loc[rows["entry"] == "sae", "metric"])
    units = pd.read_parquet(tmp_path / "board.units.parquet")
    assert set(units.loc[units["entry"] == "neurons:encoder.layer.0.intermediate", "poly_status"]) - {"no_embedding"}
    assert rows.iloc[0]["tokens_scored"] == 20 * 10


def test_an_sae_trained_on_text_gets_all_its_samples_though_separators_are_not_samples(gpt2_folder, run_cli, tmp_path: Path) -> None:
    # one EOS in every 28 tokens is ignored: the train slice must read on past the contexts its sample count fills
    (tmp_path / "docs.txt").write_text("".join(f"the {c}{c} cat sat on a mat, {c}.\n" for c in string.ascii_lowercase * 6))
    spec = write_spec(tmp_path / "train.toml", f'''
name = "tiny-gpt2-train"
tokens = 300
fit_tokens = 100
context_size = 16
device = "cpu"
hooks = ["transformer.h.1.mlp.act"]
baselines = ["neurons"]
metrics = ["l0"]
output = "board.parquet"
[[train]]
name = "sae"
architecture = "topk"
d_sae = 16
k = 2
training_samples = 2000
batch_size = 20
lr = 1e-3
[model]
loader = "hf"
name = "{gpt2_folder}"
[dataset]
kind = "text"
path = "docs.txt"
''')
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    assert pd.read_parquet(tmp_path / "board.parquet").set_index("entry").loc["sae", "value"] == pytest.approx(2)
