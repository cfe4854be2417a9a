"""Hugging Face adapter: loading, hooks that read what the modules really output, neurons, splicing, errors.

Tiny GPT-2, BERT and Llama models are built from configs and saved as safetensors; nothing reaches the network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.activations import NewGELUActivation

from saebench_poly.errors import UserError
from saebench_poly.integrity import content_sha256
from saebench_poly.models import MODEL_LOADERS, Batch, ModelConfig
from saebench_poly.models.hf import HFModelAdapter, load_hf_model
from tests.conftest import char_tokenizer

CPU = torch.device("cpu")
VOCAB = 32


def save_char_tokenizer(folder) -> None:
    char_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Saved tiny models: GPT-2 (causal LM, with a tokenizer), BERT (encoder only, none), Llama (gated MLP)."""
    torch.manual_seed(0)
    built = {
        "gpt2": GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=1)
        ),
        "bert": BertModel(
            BertConfig(
                vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
            )
        ),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
            )
        ),
    }
    folders = {}
    for name, model in built.items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        folders[name] = str(folder)
    save_char_tokenizer(folders["gpt2"])
    return folders


def load(folder: str, **options) -> HFModelAdapter:
    return load_hf_model(ModelConfig(loader="hf", name=folder, options=options), CPU, torch.float32)


@pytest.fixture(scope="module")
def gpt2(folders) -> HFModelAdapter:
    return load(folders["gpt2"])


@pytest.fixture(scope="module")
def bert(folders) -> HFModelAdapter:
    return load(folders["bert"])


def batch(n: int = 3, context: int = 6) -> Batch:
    inputs = torch.randint(0, VOCAB, (n, context), generator=torch.Generator().manual_seed(1))
    return Batch(inputs=inputs, score_mask=torch.ones(n, context, dtype=torch.bool))


def no_hooks_left(adapter: HFModelAdapter) -> bool:
    """None of the adapter's forward hooks is still registered (transformers keeps hooks of its own)."""
    hooks = [hook for module in adapter.model.modules() for hook in module._forward_hooks.values()]
    owners = {getattr(getattr(hook, "func", None), "__module__", None) for hook in hooks}
    return "saebench_poly.models.hf" not in owners


def test_loader_is_registered_and_describes_the_model(gpt2, bert, folders):
    assert MODEL_LOADERS.get("hf") is load_hf_model
    assert gpt2.describe() == {  # a local folder's revision is the sha256 of its files
        "model_id": folders["gpt2"], "model_revision": content_sha256(Path(folders["gpt2"])), "model_family": "hf",
        "tokenizer": folders["gpt2"],
    }
    assert gpt2.supports_downstream and not bert.supports_downstream
    assert gpt2.tokenizer is not None and gpt2.tokenizer("ab", add_special_tokens=False)["input_ids"] == [3, 4]
    assert gpt2.bos_token_id == 0
    assert bert.tokenizer is None  # the data must then be pre-tokenized
    assert not gpt2.model.training


def test_gpt2_hooks_read_the_module_outputs(gpt2):
    hooks = ["transformer.h.0", "transformer.h.1", "transformer.ln_f", "transformer.h.1.ln_2"]
    hooks.append("transformer.h.1.mlp.act")
    b = batch()
    out = gpt2.forward(b, hooks)
    with torch.no_grad():
        reference = gpt2.model(b.inputs, output_hidden_states=True)
    assert torch.allclose(out.activations["transformer.h.0"], reference.hidden_states[1])
    # GPT-2's last hidden state is taken after the final layer norm
    assert torch.allclose(out.activations["transformer.ln_f"], reference.hidden_states[2])
    with torch.no_grad():
        final = gpt2.model.transformer.ln_f(out.activations["transformer.h.1"])
    assert torch.allclose(final, reference.hidden_states[2])
    assert torch.allclose(out.logits, reference.logits)
    mlp = gpt2.model.transformer.h[1].mlp
    neurons = NewGELUActivation()(mlp.c_fc(out.activations["transformer.h.1.ln_2"]))
    assert torch.allclose(out.activations["transformer.h.1.mlp.act"], neurons)
    assert out.activations["transformer.h.1.mlp.act"].shape == (3, 6, 64)
    assert [gpt2.hook_width(h) for h in hooks] == [16, 16, 16, 16, 64]
    assert no_hooks_left(gpt2)


def test_without_logits_the_pass_stops_after_the_last_hook(gpt2):
    b = batch()
    full = gpt2.forward(b, ["transformer.h.0.mlp.act", "transformer.h.0"])
    calls = []
    handle = gpt2.model.transformer.h[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        early = gpt2.forward(b, ["transformer.h.0", "transformer.h.0.mlp.act"], logits=False)
    finally:
        handle.remove()
    assert calls == [] and early.logits is None
    assert all(torch.equal(early.activations[h], full.activations[h]) for h in full.activations)
    assert no_hooks_left(gpt2)


def test_bert_hooks_and_tuple_outputs(bert):
    b = batch()
    hooks = ["encoder.layer.0.intermediate", "encoder.layer.0.intermediate.intermediate_act_fn", "encoder.layer.1"]
    out = bert.forward(b, hooks)
    with torch.no_grad():
        reference = bert.model(b.inputs, output_hidden_states=True)
    assert torch.allclose(out.activations["encoder.layer.1"], reference.hidden_states[2])
    assert torch.equal(out.activations[hooks[0]], out.activations[hooks[1]])
    assert out.activations[hooks[0]].shape == (3, 6, 32) and bert.hook_width(hooks[0]) == 32
    assert out.logits is None
    # the attention block returns a tuple: its hook is the first element
    assert bert.hook_width("encoder.layer.0.attention.self") == 16
    assert "pooler" not in bert.hook_names()  # [batch, width]: no position axis


def test_unknown_hooks_name_close_matches(gpt2, bert):
    with pytest.raises(UserError, match="no hook 'transformer.h.1.mlp.actt'; did you mean 'transformer.h.1.mlp.act'"):
        gpt2.forward(batch(), ["transformer.h.1.mlp.actt"])
    with pytest.raises(UserError, match="did you mean 'encoder.layer.0.intermediate'"):
        bert.hook_width("encoder.layers.0.intermediate")
    with pytest.raises(UserError, match="'pooler' .* does not output \\[batch, position, width\\]"):
        bert.hook_width("pooler")
    assert no_hooks_left(gpt2)


def test_modules_run_more_than_once_are_not_hooks():
    """ALBERT runs one shared layer at every depth: its output is not one activation, so it is no hook."""
    config = AlbertConfig(
        vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32,
    )
    albert = HFModelAdapter(AlbertModel(config), tokenizer=None, model_id="tiny-albert")
    shared = "encoder.albert_layer_groups.0.albert_layers.0"
    assert shared not in albert.hook_names() and "encoder.embedding_hidden_mapping_in" in albert.hook_names()
    with pytest.raises(UserError, match="once per forward pass"):
        albert.hook_width(shared)
    assert albert.comparison_neuron_hook("encoder.embedding_hidden_mapping_in") is None


def test_comparison_neurons_and_their_input_map(gpt2, bert, folders):
    assert gpt2.comparison_neuron_hook("transformer.h.1") == "transformer.h.1.mlp.act"
    assert gpt2.comparison_neuron_hook("transformer.h.0.attn.c_proj") == "transformer.h.0.mlp.act"
    assert gpt2.comparison_neuron_hook("transformer.wte") is None
    assert bert.comparison_neuron_hook("encoder.layer.1.output") == "encoder.layer.1.intermediate.intermediate_act_fn"
    llama = load(folders["llama"])
    assert llama.comparison_neuron_hook("model.layers.1") == "model.layers.1.mlp.act_fn"

    fc = gpt2.neuron_input_module("transformer.h.1.mlp.act")
    assert fc.module == "transformer.h.1.mlp.c_fc" and fc.weight.shape == (64, 16)
    out = gpt2.forward(batch(), ["transformer.h.1.ln_2", "transformer.h.1.mlp.act"])
    pre = out.activations["transformer.h.1.ln_2"] @ fc.weight.T + fc.bias
    assert torch.allclose(NewGELUActivation()(pre), out.activations["transformer.h.1.mlp.act"], atol=1e-6)
    assert bert.neuron_input_module("encoder.layer.0.intermediate.intermediate_act_fn").module == (
        "encoder.layer.0.intermediate.dense"
    )
    assert llama.neuron_input_module("model.layers.0.mlp.act_fn").module == "model.layers.0.mlp.gate_proj"
    # a gated MLP's activation module is its gate only: the run says so; GPT-2's and BERT's neurons need no caveat
    assert "not its product with model.layers.0.mlp.up_proj(x)" in llama.units_caveat("model.layers.0.mlp.act_fn")
    assert gpt2.units_caveat("transformer.h.1.mlp.act") is None and llama.units_caveat("model.layers.1") is None
    assert bert.units_caveat("encoder.layer.0.intermediate.intermediate_act_fn") is None
    assert gpt2.neuron_input_module("transformer.h.1") is None
    # BERT's intermediate returns its GELU's output tensor: the same neurons, under the spec's name
    assert bert.units_of("encoder.layer.0.intermediate") == "encoder.layer.0.intermediate.intermediate_act_fn"
    assert bert.comparison_neuron_hook("encoder.layer.0.intermediate") == "encoder.layer.0.intermediate"
    assert bert.neuron_input_module("encoder.layer.0.intermediate").module == "encoder.layer.0.intermediate.dense"
    assert gpt2.units_of("transformer.h.1.mlp") == "transformer.h.1.mlp"  # the MLP's output is after c_proj


def test_replacement_changes_the_logits_as_the_weights_would(gpt2):
    b = batch()
    clean = gpt2.forward(b, ["transformer.h.1.mlp.act"])
    same = gpt2.forward_with_replacement(b, clean, "transformer.h.1.mlp.act", lambda x: x)
    assert torch.allclose(same, clean.logits)
    zeroed = gpt2.forward_with_replacement(b, clean, "transformer.h.1.mlp.act", torch.zeros_like)
    # gelu_new(0) = 0: zeroing c_fc silences the same neurons inside the weights
    model = copy.deepcopy(gpt2.model)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.zero_()
        model.transformer.h[1].mlp.c_fc.bias.zero_()
        expected = model(b.inputs).logits
    assert torch.allclose(zeroed, expected, atol=1e-5) and not torch.allclose(zeroed, clean.logits)
    # tuple outputs are spliced too: the attention output feeds the residual stream
    attn = gpt2.forward_with_replacement(b, clean, "transformer.h.0.attn", lambda x: 2 * x)
    assert not torch.allclose(attn, clean.logits)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gpt2.forward_with_replacement(b, clean, "transformer.h.1.mlp.act", broken)
    assert no_hooks_left(gpt2)
    assert torch.allclose(gpt2.forward(b, []).logits, clean.logits)


def test_encoders_do_not_splice(bert):
    b = batch()
    with pytest.raises(NotImplementedError):
        bert.forward_with_replacement(b, bert.forward(b, []), "encoder.layer.0", lambda x: x)


def test_auto_class_overrides_the_saved_architecture(folders):
    body = load(folders["gpt2"], auto_class="AutoModel")
    assert type(body.model).__name__ == "GPT2Model" and not body.supports_downstream
    assert "h.0.mlp.act" in body.hook_names() and body.forward(batch(), ["h.0"]).logits is None
    with pytest.raises(UserError, match="did you mean 'AutoModelForCausalLM'"):
        load(folders["gpt2"], auto_class="AutoModelForCausalLMM")
    with pytest.raises(UserError, match="hf model option 'revision'.*known options: auto_class"):
        load(folders["gpt2"], revision="main")


def test_inputs_the_model_cannot_take(gpt2):
    with pytest.raises(UserError, match="outside model .* 32 ids; was the data tokenized for another model"):
        gpt2.forward(Batch(torch.full((1, 4), VOCAB), torch.ones(1, 4, dtype=torch.bool)), [])
    with pytest.raises(UserError, match="contexts of 17 tokens are longer than .* \\(16\\); lower context_size"):
        gpt2.forward(batch(1, 17), [])


def test_loading_mistakes_are_one_line(folders, tmp_path):
    bin_only = tmp_path / "bin-only"
    model = GPT2LMHeadModel.from_pretrained(folders["gpt2"])
    model.save_pretrained(bin_only, safe_serialization=True)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    cases = {
        "no-such-org/no-such-model": "is not a local folder nor in the local cache, and the Hugging Face hub is "
        "unreachable",
        str(tmp_path / "missing"): "does not exist or has no config.json",
        str(bin_only): "safetensors weights only",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as error:
            load(name)
        assert "\n" not in str(error.value) and name in str(error.value)
