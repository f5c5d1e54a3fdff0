"""Parity probes on a CPU (issue 22 point 4): which sLSTM-containing layout / lr learns parity fastest per wall second.

    OMP_NUM_THREADS=1 python benchmarks/cpu_parity_probe.py --out benchmarks/results         (~12 min, 4 probes)
    OMP_NUM_THREADS=1 python benchmarks/cpu_parity_probe.py --out /tmp/p --smoke             (seconds)

Each probe is PRESET@LR@BATCH: the paper's parity model (2 blocks, d_model 64) trained by
`revival.eval.tasks.train_on_task` on the paper's data (100k examples of lengths 3-40) for at most 2000 steps
(100 warmup, cosine) or --seconds of wall time, the test accuracy on the first 600 of the 3000 test examples
(lengths 40-256) every 100 steps, stopping at 0.99; then the accuracy on 1000 training examples. Writes
cpu_parity_probes.json. The main runs use `revival eval task` with configs/tasks/parity_cpu.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from revival.bench.report import environment  # noqa: E402
from revival.data.tasks import parity  # noqa: E402
from revival.eval.tasks import _head, accuracy, task_model_config, train_on_task  # noqa: E402
from revival.models import LanguageModel  # noqa: E402

PROBES = ("xlstm[0:1]@3e-3@64", "xlstm[1:1]@3e-3@64", "xlstm[0:1]@1e-3@64", "xlstm[1:1]@1e-3@64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probes", nargs="*", default=list(PROBES), help="PRESET@LR@BATCH (default: the four above)")
    parser.add_argument("--out", required=True, help="folder for cpu_parity_probes.json")
    parser.add_argument("--seconds", type=float, default=170.0, help="wall-time cap per probe (default 170)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and 20 steps: checks the script runs")
    args = parser.parse_args()
    examples, steps, every = (200, 20, 10) if args.smoke else (100_000, 2000, 100)
    train = parity(num_examples=examples, min_length=3, max_length=40, seed=0)
    probe_test = parity(num_examples=60 if args.smoke else 600, min_length=40, max_length=256, seed=1)
    rows = []
    for spec in args.probes:
        preset, lr, batch = spec.split("@")
        torch.manual_seed(0)
        model = LanguageModel(task_model_config(preset, train.vocab_size, 64, 2))
        trained = train_on_task(model, train, probe_test, steps=steps, batch_size=int(batch), lr=float(lr),
                                warmup_steps=steps // 20, eval_every=every, early_stop_accuracy=0.99,
                                max_seconds=args.seconds)
        row = {"preset": preset, "lr": float(lr), "batch": int(batch), **trained,
               "train_accuracy": accuracy(model, _head(train, 1000), 256)["accuracy"]}
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**environment(torch.device("cpu")), "smoke": args.smoke, "max_steps": steps, "seconds_cap": args.seconds,
              "probe_test_examples": len(probe_test), "probes": rows}
    (out / "cpu_parity_probes.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'cpu_parity_probes.json'}")


if __name__ == "__main__":
    main()
