"""SAEs loaded by sae-lens: pretrained releases (``sae_lens:<release>/<sae_id>``) and checkpoint folders
(``disk:<path>``, a ``cfg.json`` plus ``sae_weights.safetensors``, any architecture sae-lens registers; a
mid-training checkpoint of sae-lens's trainer has its activation normalisation folded in, as the trainer folds it at
the end of training)."""

from __future__ import annotations

import difflib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from saebench_poly.errors import UserError, first_line
from saebench_poly.hub import is_offline_error
from saebench_poly.sources.architectures import architecture_row
from saebench_poly.sources.base import SAEEntry, SourceContext, checkpoint_folder, file_sha256

SAE_CONFIG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
# normalize_activations modes whose statistics sae-lens's trainer keeps outside the SAE (activation_scaler.json and
# activation_whitening.safetensors) until it folds them into the weights at the end of training
TRAINER_NORMALISATIONS = ("expected_average_only_in", "covariance_whitening")


def load_disk(argument: str, context: SourceContext) -> SAEEntry:
    """A sae-lens checkpoint folder; relative paths resolve against the spec's folder. The recorded sha256 is
    that of ``sae_weights.safetensors``, or, when the trainer's normalisation statistics are folded in, the sha256 of
    the space-joined sha256s of the weights file and the statistics' files."""
    folder = checkpoint_folder(argument, context, "SAE checkpoint")
    for name in (SAE_CONFIG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is not a sae-lens checkpoint: {name} is missing (save with SAE.save_model)")
    try:
        architecture = json.loads((folder / SAE_CONFIG_FILENAME).read_text()).get("architecture", "standard")
        sae = _load_inference_sae(folder, architecture, context.device)
        statistics = _fold_trainer_normalisation(sae, folder)
    except UserError:
        raise
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / SAE_CONFIG_FILENAME} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except Exception as err:  # noqa: BLE001 - a broken checkpoint can fail anywhere inside sae-lens
        raise UserError(f"SAE checkpoint {folder} could not be loaded: {first_line(err)}") from None
    uri = f"disk:{argument}"
    weights = file_sha256(folder / SAE_WEIGHTS_FILENAME)
    if statistics:  # the weights scored are these files together: a digest of their digests, the same on any device
        weights = hashlib.sha256(" ".join([weights, *(file_sha256(file) for file in statistics)]).encode()).hexdigest()
    return checked_entry(sae, name=folder.name, uri=uri, context=context, sha256=weights)


def _load_inference_sae(folder: Path, architecture: str, device: torch.device) -> Any:
    """The inference SAE in ``folder``. A training-only architecture (``batchtopk``, ``matryoshka_batchtopk``,
    saved from a `TrainingSAE`) is converted as sae-lens converts it (``save_inference_model``: BatchTopK becomes
    JumpReLU with its learned threshold), so that scoring never depends on the batch."""
    from sae_lens import SAE, TrainingSAE

    if not architecture_row(architecture, f"SAE checkpoint {folder}").training_only:
        return SAE.load_from_disk(folder, device=str(device))
    training_sae = TrainingSAE.load_from_disk(folder, device=str(device))
    with tempfile.TemporaryDirectory(prefix=".saebench-tmp-") as converted:
        training_sae.save_inference_model(converted)
        return SAE.load_from_disk(converted, device=str(device))


def _fold_trainer_normalisation(sae: Any, folder: Path) -> list[Path]:
    """An SAE whose ``normalize_activations`` is one of `TRAINER_NORMALISATIONS` reads activations scaled (x s) or
    whitened ((x - mean) M) by statistics that sae-lens's trainer saves beside a mid-training checkpoint, not in the
    SAE (its own normalisation is then the identity). Fold them into the weights with sae-lens's
    `fold_activation_norm_scaling_factor` / `fold_activation_whitening`, as `SAETrainer.fit` does after training,
    so that the SAE reads raw activations; without them the SAE cannot be scored. Returns the statistics' files
    (none when there is nothing to fold)."""
    from sae_lens.constants import ACTIVATION_SCALER_CFG_FILENAME, ACTIVATION_WHITENING_FILENAME
    from sae_lens.training.activation_scaler import ActivationScaler

    mode = sae.cfg.normalize_activations
    if mode not in TRAINER_NORMALISATIONS:
        return []
    scaler_file, whitening_file = folder / ACTIVATION_SCALER_CFG_FILENAME, folder / ACTIVATION_WHITENING_FILENAME
    needed = {"expected_average_only_in": f"the scaling factor in {ACTIVATION_SCALER_CFG_FILENAME}",
              "covariance_whitening": f"{ACTIVATION_SCALER_CFG_FILENAME} and the whitening in {ACTIVATION_WHITENING_FILENAME}"}[mode]
    scaler = ActivationScaler()
    if scaler_file.is_file():
        scaler.load(scaler_file)
    statistic = scaler.scaling_factor if mode == "expected_average_only_in" else scaler.whitening
    if statistic is None:
        raise UserError(f"SAE checkpoint {folder} says normalize_activations = {mode!r} but lacks {needed}, which "
                        "sae-lens's trainer writes beside a checkpoint: score the SAE that training returns (sae-lens "
                        "folds them into its weights), or put the trainer's files beside cfg.json")
    if scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
    if scaler.whitening is not None:
        whitening = scaler.whitening
        sae.fold_activation_whitening(mean=whitening.mean, whitening_matrix=whitening.matrix,
                                      unwhitening_matrix=whitening.inverse_matrix)
    return [file for file in (scaler_file, whitening_file) if file.is_file()]


def load_pretrained(argument: str, context: SourceContext) -> SAEEntry:
    """``<release>/<sae_id>`` through `sae_lens.SAE.from_pretrained` (needs the Hugging Face hub)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sep, sae_id = argument.partition("/")
    if not sep or not sae_id:
        raise UserError(f"sae_lens:{argument} must be written sae_lens:<release>/<sae_id>")
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"sae-lens has no release {release!r}{hint}")
    if sae_id not in directory[release].saes_map:
        close = difflib.get_close_matches(sae_id, list(directory[release].saes_map), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"release {release!r} has no SAE {sae_id!r}{hint}")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=str(context.device))
    except Exception as err:  # noqa: BLE001 - the hub stack raises many types
        if is_offline_error(err):
            raise UserError(
                f"SAE {release}/{sae_id} could not be downloaded: the Hugging Face hub is unreachable (offline); "
                "save it once with SAE.save_model and use disk:<folder>"
            ) from None
        raise UserError(f"SAE {release}/{sae_id} could not be loaded: {first_line(err)}") from None
    return checked_entry(sae, name=f"{release}/{sae_id}", uri=f"sae_lens:{argument}", context=context, sha256=None)


def checked_entry(sae: Any, name: str, uri: str, context: SourceContext, sha256: str | None,
                  hook: str | None = None, output_hook: str | None = None,
                  skip_weight: torch.Tensor | None = None) -> SAEEntry:
    """The `SAEEntry` of a loaded sae-lens SAE, after the checks every source shares: a hook (the spec's, else
    ``hook``, else the checkpoint's ``metadata.hook_name``, else the spec's only hook) whose width is d_in, an output
    hook of width d_out for transcoders, and finite weights. ``output_hook`` and ``skip_weight``: see `SAEEntry`."""
    hook = context.hook or hook or sae.cfg.metadata.hook_name or context.default_hook
    if hook is None:
        raise UserError(f"SAE {name} names no hook (cfg.json metadata.hook_name): give the entry a hook in the spec")
    for param_name, param in sae.named_parameters():
        if not torch.isfinite(param).all():
            raise UserError(f"SAE {name} has non-finite values (NaN or inf) in {param_name}: the checkpoint is broken")
    entry = SAEEntry(sae, name=name, uri=uri, hook=hook, sha256=sha256, output_hook=output_hook, skip_weight=skip_weight)
    for which, entry_hook, size in (("d_in", entry.hook, entry.d_in), ("d_out", entry.output_hook, entry.d_out)):
        width = context.adapter.hook_width(entry_hook)
        if size != width:
            raise UserError(
                f"SAE {name} has {which}={size} but hook {entry_hook!r} of {context.adapter.model_id} has width "
                f"{width}: it was trained on another hook or model"
            )
    return entry.to(context.device, context.dtype)


def recorded_model_kwargs(uri: str, base_dir: Path) -> dict[str, Any] | None:
    """The ``model_from_pretrained_kwargs`` that the sae-lens SAE at ``uri`` records it was trained with (how
    transformer-lens loaded the model), read before the model loads: a ``disk:`` folder's ``cfg.json``
    (``metadata.model_from_pretrained_kwargs``, or the older top-level key), a ``sae_lens:`` release's
    ``config_overrides``. None when it records none, or ``uri`` is not a sae-lens SAE (its loader reports any
    problem with it later)."""
    scheme, _, argument = uri.partition(":")
    if scheme == "disk":
        folder = Path(argument).expanduser()
        try:
            cfg = json.loads(((folder if folder.is_absolute() else base_dir / folder) / SAE_CONFIG_FILENAME).read_text())
        except (OSError, ValueError):
            return None
        metadata = cfg.get("metadata") if isinstance(cfg, dict) else None
        found = (metadata or {}).get("model_from_pretrained_kwargs", cfg.get("model_from_pretrained_kwargs"))
        return found if isinstance(found, dict) else None
    if scheme == "sae_lens":
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        release = get_pretrained_saes_directory().get(argument.partition("/")[0])
        found = ((release.config_overrides or {}) if release is not None else {}).get("model_from_pretrained_kwargs")
        return found if isinstance(found, dict) else None
    return None
