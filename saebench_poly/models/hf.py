"""Hugging Face `transformers` models: every module's output is a hook, read with forward hooks.

Loading (`load_hf_model`): ``name`` is a local folder or a hub id. Weights load from safetensors only and remote code
never runs. The class is ``options.auto_class`` when set (an ``AutoModel*`` class of transformers), else the
architecture the checkpoint was saved as (``config.architectures[0]``, so hook names match the checkpoint's weight
names: ``bert.encoder...`` for a ``BertForMaskedLM``, ``encoder...`` for a ``BertModel``), else ``AutoModel``. The
tokenizer loads from the same place when it holds ``tokenizer_config.json`` or ``tokenizer.json``, else it is None
(the data must then be pre-tokenized).

Hooks: a module path from ``model.named_modules()`` means that module's output; a module returning a tuple or a
``ModelOutput`` is read through its first tensor. A module is a hook when a dry run on two tokens shows it runs once
per forward pass (not ALBERT's shared layers) and outputs ``[batch, position, width]``.

Neurons (`HFModelAdapter.comparison_neuron_hook`): the MLP neurons of layer ``L`` (the ``L``-th entry of the
outermost ``ModuleList`` on the hook's path) are the output of the layer's only elementwise activation module, e.g.
``transformer.h.L.mlp.act`` (GPT-2), ``bert.encoder.layer.L.intermediate.intermediate_act_fn`` (BERT),
``model.layers.L.mlp.act_fn`` (Llama). For gated MLPs (Llama) that is ``act(gate_proj(x))``, before the product with
``up_proj``: no module outputs the product (`HFModelAdapter.units_caveat` says so, and a run prints it).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, cached_file
from transformers.utils.hub import extract_commit_hash

from saebench_poly.errors import UserError
from saebench_poly.integrity import content_sha256
from saebench_poly.models.base import (
    Batch,
    ForwardOutput,
    ModelAdapter,
    ModelConfig,
    Replacement,
    UnitInputs,
    special_token_ids,
)

_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
# Activation-module classes that are not elementwise, so their outputs are not neurons.
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention, nn.GLU)


class HFOptions(BaseModel):
    """Options of the ``hf`` loader: ``auto_class`` names the transformers class to load with (for example
    ``AutoModelForCausalLM``), overriding the checkpoint's own architecture."""

    model_config = ConfigDict(extra="forbid")

    auto_class: str | None = None


@dataclass(frozen=True)
class NeuronInput:
    """The linear map that feeds the neurons at a hook: ``neurons = act(x @ weight.T + bias)``, with ``weight``
    ``[n_neurons, d_in]`` whatever the module's own layout (GPT-2's ``Conv1D`` stores it transposed)."""

    module: str
    weight: torch.Tensor
    bias: torch.Tensor | None


def load_hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> HFModelAdapter:
    """Load a transformers model and its tokenizer (see the module docstring for the rules)."""
    try:
        options = HFOptions.model_validate(cfg.options)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise UserError(f"hf model option {field!r}: {error['msg']} (known options: auto_class)") from e
    if cfg.name.startswith((".", "/")) and not Path(cfg.name, "config.json").is_file():
        raise UserError(f"model folder {cfg.name} does not exist or has no config.json; check the path")
    with _hub_errors(cfg, f"model {cfg.name!r}"):
        config_file = cached_file(cfg.name, "config.json", revision=cfg.revision)
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=False)
        model_class = _model_class(config, options.auto_class, cfg.name)
        with _no_loading_bar():
            model = model_class.from_pretrained(
                cfg.name, revision=cfg.revision, config=config, dtype=dtype, use_safetensors=True
            )
    with _hub_errors(cfg, f"the tokenizer of model {cfg.name!r}"):
        tokenizer = _load_tokenizer(cfg)
    # For hub models the cached config sits under snapshots/<commit>/: that commit pins the weights for provenance.
    # A local folder has no commit: its revision is the sha256 of what it holds.
    revision = content_sha256(Path(cfg.name)) if Path(cfg.name).is_dir() else extract_commit_hash(config_file, None) or cfg.revision
    return HFModelAdapter(model.to(device), tokenizer, model_id=cfg.name, revision=revision)


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' own "Loading weights" progress bar off while the model loads (the run reports its stages)."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


class HFModelAdapter(ModelAdapter):
    """A transformers model behind the adapter interface; hooks are module paths (see the module docstring).

    ``tokenizer`` may be None; ``bos_token_id`` is the tokenizer's BOS, else its CLS (BERT), else the config's.
    Spliced forward passes (``supports_downstream``) are offered for causal language models only.
    """

    family = "hf"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        model_id: str,
        revision: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.supports_downstream = type(model).__name__ in _CAUSAL_LM_CLASSES
        self.bos_token_id = _bos_token_id(model, tokenizer)
        self._modules = dict(model.named_modules())
        self._has_lm_head = model.get_output_embeddings() is not None
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        # A KV cache is of no use for one full pass and costs memory.
        accepted = inspect.signature(model.forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in accepted else {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_names(self) -> list[str]:
        return list(self._widths)

    def hook_width(self, hook: str) -> int:
        self._check_hook(hook)
        return self._widths[hook]

    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        """Capture ``hooks``; with ``logits=False`` the pass stops as soon as every hook is captured (no logits)."""
        for hook in hooks:
            self._check_hook(hook)
        activations: dict[str, torch.Tensor] = {}
        stop_after = None if logits else set(hooks)
        with self._hooks({hook: partial(_capture, activations, hook, stop_after) for hook in hooks}):
            try:
                output = self._run(batch.inputs)
            except _AllCaptured:
                return ForwardOutput(activations=activations)
        return ForwardOutput(activations=activations, logits=output.logits if logits and self._has_lm_head else None)

    def forward_with_replacement(
        self, batch: Batch, clean: ForwardOutput, hook: str, replacement: Replacement
    ) -> torch.Tensor:
        if not self.supports_downstream:
            return super().forward_with_replacement(batch, clean, hook, replacement)
        self._check_hook(hook)
        with self._hooks({hook: partial(_splice, replacement)}):
            return self._run(batch.inputs).logits

    def comparison_neuron_hook(self, hook: str) -> str | None:
        """The MLP-neuron hook of the layer that holds ``hook`` (rule in the module docstring), or None when
        ``hook`` is outside the layers or its layer has no single elementwise activation module. A hook whose output
        is those neurons (`units_of`) is its own neuron hook."""
        self._check_hook(hook)
        if hook in self._neuron_aliases:
            return hook
        layer = self._layer_of(hook)
        if layer is None:
            return None
        found = [name for name in self._widths if name.startswith(f"{layer}.") and _is_activation(self._modules[name])]
        return found[0] if len(found) == 1 else None

    def neuron_input_module(self, hook: str) -> NeuronInput | None:
        """The linear map that produces the pre-activations of the neurons at ``hook`` (an activation module): the
        first ``Linear`` or ``Conv1D`` among its siblings, when its width matches (GPT-2 ``mlp.c_fc``, BERT
        ``intermediate.dense``, Llama ``mlp.gate_proj``); None otherwise."""
        self._check_hook(hook)
        hook = self._neuron_aliases.get(hook, hook)
        if not _is_activation(self._modules[hook]):
            return None
        parent = hook.rpartition(".")[0]
        for name, child in self._modules[parent].named_children():
            if isinstance(child, (nn.Linear, Conv1D)):
                weight = child.weight.T if isinstance(child, Conv1D) else child.weight
                if weight.shape[0] != self._widths[hook]:
                    return None
                bias = None if child.bias is None else child.bias.detach()
                return NeuronInput(module=f"{parent}.{name}" if parent else name, weight=weight.detach(), bias=bias)
        return None

    def units_caveat(self, hook: str) -> str | None:
        """For the activation module of a gated MLP (a sibling linear map besides the one that feeds it has its
        width: Llama's ``up_proj`` beside ``gate_proj``): its output is act(gate(x)), not the product with the other
        map that the down projection reads, which no module outputs."""
        linear = self.neuron_input_module(hook)
        if linear is None:
            return None
        hook = self._neuron_aliases.get(hook, hook)
        parent = linear.module.rpartition(".")[0]
        others = [f"{parent}.{name}" if parent else name for name, child in self._modules[parent].named_children()
                  if isinstance(child, (nn.Linear, Conv1D)) and f"{parent}.{name}" != linear.module
                  and (child.weight.T if isinstance(child, Conv1D) else child.weight).shape[0] == self._widths[hook]]
        if not others:
            return None
        return (f"{hook} is the gate of a gated MLP, act({linear.module}(x)), not its product with {others[0]}(x) "
                "that the down projection reads (transformer-lens's blocks.L.mlp.hook_post): its neurons row, and an "
                "SAE placed there, see the gate only")

    def neuron_inputs(self, hook: str) -> UnitInputs | None:
        """The neurons at an activation module, in the convention of transformer-lens's neurons (one convention for
        every adapter): when the linear map that `neuron_input_module` finds reads the output of a ``LayerNorm``
        (GPT-2's ``ln_2``, BERT's attention-output LayerNorm), h is that LayerNorm's normalised input (centred and
        divided by its RMS, before the scale and shift), w_u = gamma ⊙ W[u] and b_u = b[u] + beta · W[u], the scale
        and shift folded into the weights as transformer-lens's ``fold_ln`` folds them. Otherwise h is the linear
        map's input, w_u its weight row and b_u its bias (0 without one). h is read with a forward pre-hook, the pass
        stopping there. None where `neuron_input_module` finds none."""
        linear = self.neuron_input_module(hook)
        if linear is None:
            return None
        weight = linear.weight.detach().to(torch.float64)
        bias = torch.zeros_like(weight[:, 0]) if linear.bias is None else linear.bias.detach().to(torch.float64)
        norm_name = self._layer_norm_feeding(linear.module)
        if norm_name is None:
            read, source = self._modules[linear.module], f"input of {linear.module}"

            def transform(h: torch.Tensor) -> torch.Tensor:
                return h
        else:
            norm = self._modules[norm_name]
            read, source = norm, f"normalised input of {norm_name}"
            if norm.bias is not None:
                bias = bias + weight @ norm.bias.detach().to(torch.float64)
            if norm.weight is not None:
                weight = weight * norm.weight.detach().to(torch.float64)[None, :]

            def transform(h: torch.Tensor) -> torch.Tensor:
                return nn.functional.layer_norm(h, norm.normalized_shape, None, None, norm.eps)

        def capture(batch: Batch, activations: object = None) -> torch.Tensor:  # reads no hook
            store: dict[str, torch.Tensor] = {}

            def read_input(module: nn.Module, args: Any, kwargs: Any) -> None:
                store["h"] = transform((args[0] if args else next(iter(kwargs.values()))).detach().clone())
                raise _AllCaptured

            handle = read.register_forward_pre_hook(read_input, with_kwargs=True)
            try:
                self._run(batch.inputs)
            except _AllCaptured:
                pass
            finally:
                handle.remove()
            return store["h"]

        return UnitInputs(source=source, weight=weight, bias=bias, capture=capture)

    def _layer_norm_feeding(self, linear: str) -> str | None:
        """The ``nn.LayerNorm`` whose output tensor is the input of module ``linear`` in the dry run, if any."""
        norms = [name for name in self._dry_run if isinstance(self._modules[name], nn.LayerNorm)]
        store: dict[str, Any] = {}

        def read_input(module: nn.Module, args: Any, kwargs: Any) -> None:
            store["input"] = args[0] if args else next(iter(kwargs.values()))

        handle = self._modules[linear].register_forward_pre_hook(read_input, with_kwargs=True)
        outputs: dict[str, list[torch.Tensor | None]] = {name: [] for name in norms}
        try:
            with self._hooks({name: partial(_record_output, outputs[name]) for name in norms}):
                self._run(torch.zeros(1, 2, dtype=torch.long))
        finally:
            handle.remove()
        found = [name for name in norms if any(out is store.get("input") for out in outputs[name])]
        return found[0] if len(found) == 1 else None

    def special_token_ids(self) -> set[int]:
        """The tokenizer's special tokens and those the model's config names (for pre-tokenized data without a
        tokenizer)."""
        return super().special_token_ids() | special_token_ids(self.model.config)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tokenizer": getattr(self.tokenizer, "name_or_path", "") or ""}

    def units_of(self, hook: str) -> str:
        """The activation module whose output ``hook`` outputs, the very tensor (BERT's ``intermediate``, dense then
        GELU, returns its ``intermediate_act_fn``'s output); else ``hook``."""
        return self._neuron_aliases.get(hook, hook)

    @cached_property
    def _dry_run(self) -> dict[str, list[torch.Tensor | None]]:
        """What every module outputs (its first tensor, once per call) in one dry run on two tokens."""
        outputs: dict[str, list[torch.Tensor | None]] = {name: [] for name in self._modules if name}
        with self._hooks({name: partial(_record_output, calls) for name, calls in outputs.items()}):
            self._run(torch.zeros(1, 2, dtype=torch.long))
        return outputs

    @cached_property
    def _widths(self) -> dict[str, int]:
        """The width of every hook, in ``named_modules`` order."""
        return {
            name: calls[0].shape[-1]
            for name, calls in self._dry_run.items()
            if len(calls) == 1 and calls[0] is not None and calls[0].dim() == 3 and tuple(calls[0].shape[:2]) == (1, 2)
        }

    @cached_property
    def _neuron_aliases(self) -> dict[str, str]:
        """Hook -> the activation module inside it whose output tensor it returns as its own (`units_of`)."""
        aliases = {}
        for name in self._widths:
            if _is_activation(self._modules[name]):
                for outer in self._widths:
                    if name.startswith(f"{outer}.") and self._dry_run[outer][0] is self._dry_run[name][0]:
                        aliases[outer] = name
        return aliases

    def _check_hook(self, hook: str) -> None:
        if hook in self._widths:
            return
        if hook in self._modules:
            raise UserError(
                f"module {hook!r} of model {self.model_id!r} does not output [batch, position, width] activations "
                "once per forward pass; pick another module"
            )
        close = difflib.get_close_matches(hook, list(self._widths), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
        raise UserError(
            f"model {self.model_id!r} has no hook {hook!r}{hint} (hooks are module paths from model.named_modules())"
        )

    def _layer_of(self, hook: str) -> str | None:
        parts = hook.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit() and isinstance(self._modules[".".join(parts[:i])], nn.ModuleList):
                return ".".join(parts[: i + 1])
        return None

    @contextmanager
    def _hooks(self, hooks: dict[str, Callable[..., Any]]) -> Iterator[None]:
        """Forward hooks on the named modules, removed on the way out whatever happens."""
        handles = []
        try:
            for name, hook in hooks.items():
                handles.append(self._modules[name].register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run(self, inputs: torch.Tensor) -> Any:
        inputs = inputs.to(self.device)
        if inputs.numel() and (inputs.min() < 0 or inputs.max() >= self._vocab_size):
            raise UserError(
                f"token ids {int(inputs.min())}..{int(inputs.max())} fall outside model {self.model_id!r}'s "
                f"{self._vocab_size} ids; was the data tokenized for another model?"
            )
        if self._max_positions is not None and inputs.shape[1] > self._max_positions:
            raise UserError(
                f"contexts of {inputs.shape[1]} tokens are longer than model {self.model_id!r} takes "
                f"({self._max_positions}); lower context_size"
            )
        with torch.no_grad():
            return self.model(input_ids=inputs, attention_mask=torch.ones_like(inputs), **self._forward_kwargs)


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a hook reads from a module's output: the output itself, or its first element or field."""
    if isinstance(output, ModelOutput):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def _with_first(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with the tensor `_first_tensor` reads replaced by ``tensor``."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, ModelOutput):
        output[next(iter(output.keys()))] = tensor
        return output
    rest = list(output[1:])
    return (tensor, *rest) if isinstance(output, tuple) else [tensor, *rest]


def _record_output(calls: list[torch.Tensor | None], module: nn.Module, args: Any, output: Any) -> None:
    calls.append(_first_tensor(output))


class _AllCaptured(Exception):
    """Raised by a hook once every wanted activation is captured, to skip the rest of the forward pass."""


def _capture(
    store: dict[str, torch.Tensor], hook: str, stop_after: set[str] | None, module: nn.Module, args: Any, output: Any
) -> None:
    # A copy, since a later in-place operation of the model may reuse the output's memory.
    store[hook] = _first_tensor(output).detach().clone()
    if stop_after is not None and stop_after <= store.keys():
        raise _AllCaptured


def _splice(replacement: Replacement, module: nn.Module, args: Any, output: Any) -> Any:
    original = _first_tensor(output)
    replaced = replacement(original)
    if replaced.shape != original.shape:
        raise ValueError(
            f"a replacement must keep the activations' shape {tuple(original.shape)}, got {tuple(replaced.shape)}"
        )
    return _with_first(output, replaced.to(original.dtype))


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in _ACTIVATION_MODULES and not isinstance(module, _NOT_ELEMENTWISE)


def _bos_token_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    if tokenizer is not None:
        for token_id in (tokenizer.bos_token_id, tokenizer.cls_token_id):
            if token_id is not None:
                return token_id
    return getattr(model.config, "bos_token_id", None)


def _model_class(config: Any, auto_class: str | None, name: str) -> Any:
    if auto_class is not None:
        known = [attr for attr in dir(transformers) if attr.startswith("AutoModel")]
        if auto_class not in known:
            close = difflib.get_close_matches(auto_class, known, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(f"auto_class {auto_class!r} is not an AutoModel class of transformers{hint}")
        return getattr(transformers, auto_class)
    if not config.architectures:
        return transformers.AutoModel
    architecture = config.architectures[0]
    model_class = getattr(transformers, architecture, None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise UserError(
            f"model {name!r} was saved as {architecture}, which transformers {transformers.__version__} does not "
            "have (remote code is never run); set options.auto_class, e.g. 'AutoModelForCausalLM'"
        )
    return model_class


def _load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase | None:
    for filename in _TOKENIZER_FILES:
        found = cached_file(
            cfg.name,
            filename,
            revision=cfg.revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if found is not None:
            return AutoTokenizer.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=False)
    return None


@contextmanager
def _hub_errors(cfg: ModelConfig, what: str) -> Iterator[None]:
    """Turn the errors of transformers and the hub while loading ``what`` into one-line `UserError`s."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UserError(_explain(e, cfg, what)) from e


def _explain(error: BaseException, cfg: ModelConfig, what: str) -> str:
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__

    def raised(*kinds: type[BaseException]) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    model = f"model {cfg.name!r}"
    if raised(GatedRepoError):
        return f"{model} is gated on the Hugging Face hub; accept its terms on the hub and log in (hf auth login)"
    if raised(RepositoryNotFoundError):
        return f"{model} is neither a local folder nor a model on the Hugging Face hub; check the name"
    if raised(RevisionNotFoundError):
        return f"{model} has no revision {cfg.revision!r} on the Hugging Face hub; check the revision"
    # Offline, or the hub unreachable with nothing cached: huggingface_hub raises LocalEntryNotFoundError.
    if raised(LocalEntryNotFoundError, ConnectionError):
        return (
            f"{model} is not a local folder nor in the local cache, and the Hugging Face hub is unreachable; "
            "connect to the internet or pass a local folder"
        )
    text = str(error).strip()
    message = text.splitlines()[0] if text else type(error).__name__
    if "trust_remote_code" in text:
        message += " (saebench-poly never runs remote code)"
    elif "safetensors" in text:
        message += " (saebench-poly loads safetensors weights only)"
    return f"cannot load {what}: {message}"
