"""Run configuration: three sections (`model`, `data`, `train`) read from YAML, with `section.key=value` overrides.

Unknown keys and bad values are rejected (`revival.errors.UserError`) with the valid choices listed. The `model`
section is a preset name plus `ModelConfig` overrides (validated by `ModelConfig` itself), or `init_from: DIR` (a run
or model directory to fine-tune: its config and tokenizer are used) plus overrides that keep every weight's shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MissingPathError, UserError, reject_unknown


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # a corpus name (stdlib, shakespeare, kjv, python-docs, english-mix) or a path
    tokenizer: str = "byte"  # "byte" or "bpe"
    bpe_vocab_size: int = 4096
    context_length: int = 256
    # every layer restarts at each document start of the packed rows, so no document sees the one before it
    # (docs/math.md); False: the state runs on across documents
    reset_at_documents: bool = True
    text_field: str = "text"  # the field holding a document's text in a .jsonl corpus
    # fractions of a corpus read from a path that go to validation / test (None: 0.01 each); named corpora have theirs
    validation_fraction: float | None = None
    test_fraction: float | None = None

    def corpus_options(self) -> dict[str, Any]:
        """The `load_corpus` keyword arguments this section sets beyond the corpus name."""
        options: dict[str, Any] = {"text_field": self.text_field}
        for name in ("validation_fraction", "test_fraction"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_docs: int = 32  # validation documents per evaluation (whole documents, state carried)
    eval_max_tokens: int = 65536  # cap on tokens per evaluation
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 5  # NaN/inf losses in a row before stopping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    out_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% slower
    parallel: str = "none"  # none | ddp | fsdp: several processes via torchrun or `revival train --nproc N`


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "xlstm[7:1]"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise UserError(f"config: expected a mapping with sections model, data, train; got {type(raw).__name__}")
        unknown = set(raw) - {"model", "data", "train"}
        if unknown:
            raise UserError(f"config: unknown section(s) {sorted(unknown)}; valid: ['data', 'model', 'train']")
        model = dict(raw.get("model") or {})
        if "preset" in model and "init_from" in model:
            raise UserError("model: expected one of model.preset (a new model) and model.init_from (fine-tune a saved "
                            "one), got both")
        if "preset" not in model and "init_from" not in model:
            raise UserError("model.preset: missing; expected a preset name such as 'xlstm[7:1]' or 'llama' (or "
                            "model.init_from: DIR to fine-tune a saved model)")
        config = cls(model=model, data=_build(DataConfig, raw.get("data") or {}, "data"),
                     train=_build(TrainConfig, raw.get("train") or {}, "train"))
        config.validate()
        return config

    def model_config(self, vocab_size: int | None = None):
        """The `ModelConfig` of the `model` section (`vocab_size` fills in when the section does not set it); for
        `init_from` the saved model's config is read by the trainer."""
        from ..models import preset_config

        if "init_from" in self.model:
            raise UserError("model.init_from: the model config is the saved model's; load it with Trainer")
        options = {k: v for k, v in self.model.items() if k != "preset"}
        if vocab_size is not None:
            options.setdefault("vocab_size", vocab_size)
        try:
            return preset_config(self.model["preset"], **options)
        except ValueError as error:
            raise UserError(f"model: {error}") from None

    def validate(self) -> None:
        if "init_from" in self.model:
            from .checkpoint import resolve_checkpoint

            resolve_checkpoint(self.model["init_from"], argument="model.init_from")
        else:
            self.model_config()  # rejects unknown presets, keys and bad values now, not after loading the data
        d, t = self.data, self.train
        if d.tokenizer not in ("byte", "bpe"):
            raise UserError(f"data.tokenizer: expected one of ['byte', 'bpe'], got {d.tokenizer!r}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(d, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"data.{name}: expected a fraction in [0, 1), got {value}")
        if (d.validation_fraction or 0.01) + (d.test_fraction or 0.01) >= 1:
            raise UserError("data.validation_fraction + data.test_fraction: expected less than 1, got "
                            f"{d.validation_fraction} + {d.test_fraction}")
        if t.parallel not in ("none", "ddp", "fsdp"):
            raise UserError(f"train.parallel: expected one of ['none', 'ddp', 'fsdp'], got {t.parallel!r}")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"train.precision: expected one of ['auto', 'fp32', 'bf16'], got {t.precision!r}")
        for section, name in [("data", "context_length"), ("data", "bpe_vocab_size"), ("train", "steps"),
                              ("train", "batch_size"), ("train", "grad_accum"), ("train", "eval_every"),
                              ("train", "checkpoint_every"), ("train", "log_every"), ("train", "max_bad_steps"),
                              ("train", "eval_docs"), ("train", "keep_checkpoints"), ("train", "eval_max_tokens")]:
            value = getattr(getattr(self, section), name)
            if value < 1:
                raise UserError(f"{section}.{name}: expected a positive integer, got {value}")
        for name in ("lr", "grad_clip"):
            if not (getattr(t, name) > 0 and math.isfinite(getattr(t, name))):
                raise UserError(f"train.{name}: expected a positive number, got {getattr(t, name)}")
        if t.warmup_steps < 0:
            raise UserError(f"train.warmup_steps: expected >= 0, got {t.warmup_steps}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise UserError(f"train.min_lr_ratio: expected a number in [0, 1], got {t.min_lr_ratio}")


def _build(cls, values: dict[str, Any], section: str):
    valid = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(values, sorted(valid), section, error=UserError)
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if default is None:  # an optional number: None (YAML null) or a float
            kwargs[name] = None if value is None else _coerce(f"{section}.{name}", value, float)
        else:
            kwargs[name] = _coerce(f"{section}.{name}", value, type(default))
    return cls(**kwargs)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{name}: expected true or false, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    return str(value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=100' -> (['train', 'steps'], 100): a YAML scalar; the field's type is applied later."""
    if "=" not in text:
        raise UserError(f"override: expected SECTION.KEY=VALUE (e.g. train.steps=100), got {text!r}")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise UserError(f"override: expected SECTION.KEY=VALUE with SECTION in model, data, train; got {text!r}")
    return path, yaml.safe_load(value)


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or the defaults when `path` is None) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"config: no such file {str(path)!r}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config: {str(path)!r} is not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(raw, dict):
            raise UserError(f"config: {str(path)!r} must hold a mapping with sections model, data, train")
    else:
        raw = RunConfig().to_dict()
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return RunConfig.from_dict(raw)
