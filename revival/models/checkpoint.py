"""Save and load models: `config.json` + `model.safetensors` ("revival" format), or a Hugging Face xLSTM directory.

revival format: `config.json` holds the `ModelConfig` fields plus `"model_type": "revival"`, the library version and the
weight dtype; `model.safetensors` holds the state dict (a tied LM head is stored once, as `embedding.weight`).
Writes are atomic: a new directory is assembled in a temporary sibling and renamed into place; into an existing
directory, each file is written to a temporary name and renamed, the weights before the config. A failure leaves
either the old files or nothing, never a half-written file.

A `config.json` with `"model_type": "xlstm"` is a Hugging Face `xLSTMForCausalLM` checkpoint: `from_pretrained`
hands it to `revival.models.hf_xlstm`, as does `save_pretrained(..., format="hf")`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from . import hf_xlstm
from .config import CONFIG_VERSION, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMATS = ("revival", "hf")
_META_KEYS = ("model_type", "revival_version", "config_version", "torch_dtype")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tied_keys(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if model.config.tie_embeddings else set()


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    skip = _tied_keys(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in skip}


def _config_json(model: nn.Module) -> str:
    from .. import __version__

    d = {"model_type": "revival", "revival_version": __version__, "config_version": CONFIG_VERSION,
         "torch_dtype": str(model.dtype).removeprefix("torch.")}
    d.update(model.config.to_dict())
    return json.dumps(d, indent=2) + "\n"


def _write_files(directory: Path, model: nn.Module) -> None:
    """Write the two files into `directory`, each via a temporary name + rename (weights first)."""
    tensors = _tensors_to_save(model)
    config_text = _config_json(model)
    temps = []
    try:
        fd, weights_tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
        os.close(fd)
        temps.append(weights_tmp)
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        fd, config_tmp = tempfile.mkstemp(dir=directory, prefix=f".{CONFIG_NAME}.", suffix=".tmp")
        temps.append(config_tmp)
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def save_pretrained(model: nn.Module, directory: str | Path, format: str = "revival", tokenizer=None) -> Path:
    """Save `model` (and `tokenizer`, if given, so that `revival generate directory` works) to `directory` (created
    if missing); returns the directory path."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise ValueError(f"model: expected a LanguageModel, got {type(model).__name__}")
    directory = Path(directory)
    if format == "hf":
        hf_xlstm.save_hf_xlstm(model, directory)
        if tokenizer is not None:
            tokenizer.save(directory)
        return directory
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {str(directory)!r} exists and is not a directory")
    if directory.is_dir():
        _write_files(directory, model)
        if tokenizer is not None:
            tokenizer.save(directory)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        _write_files(staging, model)
        if tokenizer is not None:
            tokenizer.save(staging)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> dict:
    """The raw `config.json` of a checkpoint directory, with clear errors when it is missing or broken."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"directory: {str(directory)!r} is not a directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"directory: no {CONFIG_NAME} in {str(directory)!r}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype: expected None, a torch.dtype or one of {list(_DTYPES)}, got {dtype!r}")


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in _tied_keys(model)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [f"{k}: expected {tuple(expected[k])}, got {tuple(tensors[k].shape)}"
                 for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors [{'; '.join(misshaped)}]")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def load_pretrained(model_class: type, directory: str | Path, device=None, dtype=None) -> nn.Module:
    """A `model_class` (revival's `LanguageModel`) from a directory written by `save_pretrained` (or a HF xLSTM
    directory) on `device`, cast to `dtype` if given; without `dtype` it takes the dtype the weights were stored in.
    `LanguageModel.from_pretrained` / `revival.from_pretrained` are the public entries.
    """
    directory = Path(directory)
    raw = read_config(directory)
    dtype = _resolve_dtype(dtype)
    model_type = raw.get("model_type", "revival")
    if model_type == "xlstm":
        return hf_xlstm.load_hf_xlstm(model_class, directory, device=device, dtype=dtype)
    if model_type != "revival":
        raise ValueError(f"{directory / CONFIG_NAME}: model_type {model_type!r} is not supported; "
                         f"expected 'revival' or 'xlstm' (Hugging Face xLSTMForCausalLM)")
    stored_dtype = _resolve_dtype(raw.get("torch_dtype"))
    config = ModelConfig.from_saved({k: v for k, v in raw.items() if k not in _META_KEYS}, raw.get("config_version"))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"directory: no {WEIGHTS_NAME} in {str(directory)!r}")
    tensors = _load_weights(weights)
    model = _empty_model(model_class, config, torch.device("cpu") if device is None else torch.device(device))
    check_state_dict(model, tensors, source=str(weights))
    target_dtype = dtype or stored_dtype
    if target_dtype is not None:
        model.to(target_dtype)
    model.load_state_dict(tensors, strict=not config.tie_embeddings)
    model.eval()
    return model


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError naming the file when it is truncated, damaged or non-finite."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: unreadable ({error}); the file is truncated or corrupt") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); the file is "
                            "corrupt or the run that wrote it diverged")
    return tensors


def _empty_model(model_class: type, config: ModelConfig, device: torch.device) -> nn.Module:
    """A model with uninitialised storage on `device` (skips the random init a load would overwrite anyway).

    Safe because the layers hold no buffers or tensors computed at construction: every tensor is a parameter in the
    state dict, and `from_pretrained` checks that the file provides all of them.
    """
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # re-tie: moving off "meta" may give the two names separate storage
        model.lm_head.weight = model.embedding.weight
    return model
