"""One CPU training step (forward + backward + AdamW): official xlstm 2.0.6 `xLSTMLMModel` vs revival's equivalent.

Model: xLSTM[3:1] with the sLSTM at block 1, embedding 256, 4 blocks, 4 heads, conv kernel 4, qkv block size 4,
vocab 256, context 256, sLSTM `backend: vanilla`; batch 8 x 256. Both models are built in this one process, with the
same torch and thread count, and timed alternately (one step each, same batch). The official package is a
benchmark-only install:

    python3 -m venv .cache/xlstm-venv && .cache/xlstm-venv/bin/pip install torch==2.13.0 xlstm==2.0.6 \
        mlstm_kernels==2.0.6 dacite omegaconf einops && .cache/xlstm-venv/bin/pip install --no-deps -e .
    .cache/xlstm-venv/bin/python benchmarks/cpu_train_step.py

Without xlstm installed the script times revival alone and records the official model as "not installed".
`--compile` adds a third model: revival with its mLSTM mixers and feed-forwards wrapped in `torch.compile` (inductor's
C++ backend; needs a C++ compiler and the Python headers); its first step, which compiles, is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cpu_mlstm import cpu_model  # benchmarks/ is on the path when this script runs

import revival
from revival.models import LanguageModel, preset_config

BATCH, CONTEXT, VOCAB, D_MODEL, BLOCKS, HEADS = 8, 256, 256, 256, 4, 4


def official_model():
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMLMModel,
        xLSTMLMModelConfig,
    )

    config = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=HEADS)),
        slstm_block=sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(backend="vanilla", num_heads=HEADS, conv1d_kernel_size=4,
                                   bias_init="powerlaw_blockdependent"),
            feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu")),
        context_length=CONTEXT, num_blocks=BLOCKS, embedding_dim=D_MODEL, slstm_at=[1], vocab_size=VOCAB)
    model = xLSTMLMModel(config)
    model.reset_parameters()
    return model, lambda ids: model(ids)


def revival_model():
    config = preset_config("xlstm[3:1]", d_model=D_MODEL, num_blocks=BLOCKS, num_heads=HEADS, vocab_size=VOCAB,
                           slstm_at=[1])
    model = LanguageModel(config)
    return model, lambda ids: model(ids)[0]


def revival_compiled_model():
    """revival's model with the mLSTM mixers and the feed-forwards compiled (the sLSTM recurrence stays eager: a
    256-step loop would unroll into one huge graph)."""
    model, forward = revival_model()
    for block in model.blocks:
        if block.letter == "m":
            block.mixer.forward = torch.compile(block.mixer.forward, dynamic=False)
        if block.ffn is not None:
            block.ffn.forward = torch.compile(block.ffn.forward, dynamic=False)
    return model, forward


class Trainer:
    """One model with its optimizer; `step(ids)` runs forward + backward + AdamW and returns the seconds taken."""

    def __init__(self, model, forward):
        self.model, self.forward = model, forward
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(self, ids: torch.Tensor) -> float:
        start = time.perf_counter()
        logits = self.forward(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu_train_step.json")
    parser.add_argument("--compile", action="store_true", help="also time revival with torch.compile'd layers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    candidates = {"revival": revival_model}
    if args.compile:
        candidates["revival_compiled"] = revival_compiled_model
    try:
        import xlstm

        candidates["official"] = official_model
        official_version = getattr(xlstm, "__version__", None) or _dist_version("xlstm")
    except ImportError as error:
        official_version = f"not installed ({error})"

    trainers = {name: Trainer(*build()) for name, build in candidates.items()}
    results = {name: {"parameters": sum(p.numel() for p in t.model.parameters()), "step_s": []}
               for name, t in trainers.items()}
    generator = torch.Generator().manual_seed(0)
    if "revival_compiled" in trainers:  # the compile happens in the first step: time it on its own
        first_ids = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
        results["revival_compiled"]["first_step_s"] = trainers["revival_compiled"].step(first_ids)
    load_before = os.getloadavg()
    # one step of each model in turn, on the same batch, so background load affects both alike
    for index in range(args.warmup + args.steps):
        ids = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=generator)
        for name, trainer in trainers.items():
            seconds = trainer.step(ids)
            if index >= args.warmup:
                results[name]["step_s"].append(seconds)
    load_after = os.getloadavg()
    for record in results.values():
        times = record.pop("step_s")
        record["median_ms"] = 1000 * statistics.median(times)
        record["min_ms"] = 1000 * min(times)
        record["step_ms"] = [round(1000 * t, 2) for t in times]
    summary = {
        "benchmark": "cpu_train_step", "batch": BATCH, "context": CONTEXT, "pattern": "xLSTM[3:1], sLSTM at block 1",
        "device": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_average_before": load_before,
                   "load_average_after": load_after},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "revival": revival.__version__,
                     "xlstm": official_version},
        "results": results,
    }
    if "official" in results:
        summary["speedup"] = results["official"]["median_ms"] / results["revival"]["median_ms"]
        summary["speedup_of_min"] = results["official"]["min_ms"] / results["revival"]["min_ms"]
        summary["parameter_ratio"] = results["revival"]["parameters"] / results["official"]["parameters"]
        if "revival_compiled" in results:
            summary["speedup_compiled"] = results["official"]["median_ms"] / results["revival_compiled"]["median_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for name, record in results.items():
        print(f"{name:9s} params {record['parameters']:,}  median step {record['median_ms']:.1f} ms  "
              f"(min {record['min_ms']:.1f})")
    if "speedup" in summary:
        print(f"speed-up {summary['speedup']:.2f}x (of minima {summary['speedup_of_min']:.2f}x)  "
              f"parameter ratio {summary['parameter_ratio']:.4f}")
    if "revival_compiled" in results:
        print(f"revival_compiled: first step (compiles) {results['revival_compiled']['first_step_s']:.1f} s"
              + (f", speed-up {summary['speedup_compiled']:.2f}x" if "speedup_compiled" in summary else ""))


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
