"""Training checkpoints, written atomically: each one is built in a temporary directory and renamed into place, and
the `latest` pointer is replaced with `os.replace`, so the latest complete checkpoint is always loadable.

Layout: <out_dir>/checkpoints/step-00000100/{config.json, model.safetensors, tokenizer files, run.yaml,
trainer_state.pt} and <out_dir>/checkpoints/latest (the name of the newest complete one).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import MissingPathError, UserError


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, run_config: dict[str, Any],
                    trainer_state: dict[str, Any], keep: int = 2, extra: dict[str, Path] | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` checkpoints.

    `extra` ({name: directory}) moves already written directories into the checkpoint before it is published."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        model.save_pretrained(tmp / "model")
        for item in (tmp / "model").iterdir():
            os.replace(item, tmp / item.name)
        (tmp / "model").rmdir()
        tokenizer.save(tmp)
        (tmp / "run.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        for item_name, directory in (extra or {}).items():
            os.replace(directory, tmp / item_name)
        if final.exists():  # the same step saved again: move the old one aside first, remove it once replaced
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=root))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / "latest")
    existing = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p != final)
    for old in existing[: max(0, len(existing) - (keep - 1))]:  # the newest `keep`, counting the one just written
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path, argument: str = "checkpoint") -> Path:
    """A run directory (its latest checkpoint), a checkpoints/ folder, or a model directory itself."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"{argument}: {str(path)!r} does not exist; expected a run directory or a model "
                               "directory")
    for pointer in (path / "checkpoints" / "latest", path / "latest"):
        if pointer.is_file():
            return pointer.parent / pointer.read_text().strip()
    if (path / "config.json").is_file():
        return path
    raise MissingPathError(
        f"{argument}: {str(path)!r} is neither a run directory (with checkpoints/latest) nor a model directory "
        "(with config.json)")


def load_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "trainer_state.pt"
    if not path.is_file():
        raise UserError(f"resume: {checkpoint_dir} has no trainer_state.pt (a model directory, not a training "
                        "checkpoint); fine-tune it with model.init_from instead")
    try:
        return torch.load(path, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is damaged
        raise UserError(f"{path}: unreadable ({type(error).__name__}: {error}); the file is corrupt") from None


def load_run_config_dict(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The run config a checkpoint was trained with (`run.yaml`), or {} for a plain model directory."""
    path = Path(checkpoint_dir) / "run.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None


def load_for_inference(checkpoint: str | Path, device: str = "auto"):
    """(model on `device` in eval mode, tokenizer, checkpoint directory, run config dict or {}) for eval / generate."""
    from ..data.tokenizers import load_tokenizer
    from ..models import from_pretrained
    from .trainer import resolve_device

    directory = resolve_checkpoint(checkpoint)
    device = resolve_device(device, argument="--device")
    tokenizer = load_tokenizer(directory)
    try:
        model = from_pretrained(directory, device=device)
    except UserError:
        raise
    except ValueError as error:  # a config.json or weights file that does not describe a loadable model
        raise UserError(f"checkpoint {str(directory)!r}: {error}") from None
    model.eval()
    return model, tokenizer, directory, load_run_config_dict(directory)
