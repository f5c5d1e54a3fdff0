"""Training: the public Python API behind `revival train`.

    from revival.train import Trainer, load_run_config, train

    summary = train("configs/xlstm-tiny.yaml", ["train.steps=100", "train.out_dir=runs/mine"])

    run = load_run_config("configs/xlstm-tiny.yaml", ["train.steps=100"])   # or RunConfig(...) / RunConfig.from_dict
    trainer = Trainer(run)                       # resume=True | overwrite=True, force=True, corpus=<Corpus>
    summary = trainer.train()                    # losses, tokens/s, validation, paths
    trainer.model.save_pretrained("my-model", tokenizer=trainer.tokenizer)   # then: revival generate my-model

Fine-tune a saved model with `model: {init_from: DIR}` (a run or model directory, Hugging Face xLSTM included);
activation checkpointing per block with `train.activation_checkpointing: true`. Every key: `RunConfig`,
`DataConfig`, `TrainConfig` (revival/train/config.py) and docs/cli.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DataConfig, RunConfig, TrainConfig, load_run_config
from .trainer import EvalResult, Trainer, TrainingStopped, estimate_cost, evaluate


def train(config: RunConfig | dict | str | Path, overrides: list[str] = (), *, resume: bool = False,
          overwrite: bool = False, force: bool = False, corpus=None) -> dict[str, Any]:
    """Train from a `RunConfig`, a dict with sections model/data/train, or a YAML file path (with `overrides`,
    'section.key=value' strings, as on the command line); returns `Trainer.train()`'s summary."""
    if isinstance(config, (str, Path)):
        run = load_run_config(config, list(overrides))
    else:
        if overrides:
            raise ValueError("overrides: only taken with a YAML file path; edit the RunConfig or dict instead")
        run = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    return Trainer(run, resume=resume, overwrite=overwrite, force=force, corpus=corpus).train()


__all__ = ["DataConfig", "EvalResult", "RunConfig", "TrainConfig", "Trainer", "TrainingStopped", "estimate_cost",
           "evaluate", "load_run_config", "train"]
