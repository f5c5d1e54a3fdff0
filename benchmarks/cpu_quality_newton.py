"""CPU quality run (issue 19, point 6): ParaGRU / ParaLSTM vs minGRU vs xlstm-large vs llama at one parameter count.

    python benchmarks/cpu_quality_newton.py --out benchmarks/results      (~8 minutes on 2 busy CPU cores, 1 thread)
    python benchmarks/cpu_quality_newton.py --out /tmp/q --smoke          (seconds: checks the script itself)

Every model is trained by `revival.train.Trainer` (the path of `revival train`: AdamW, warmup + cosine, packed rows
with `data.reset_at_documents: true`) on the stdlib corpus that `revival demo` uses (the Python standard library
sources of this interpreter, byte tokenizer; the validation split is whole files, its hash is recorded), for the
same steps x batch x context tokens. xlstm-large at d_model 64 x 4 blocks sets the parameter count; every other
model is sized to it within 5% (`revival.demo.match_parameters`: the same depth, the closest width).

The Para cells train as ParaRNN trains them: Newton with a fixed 3 iterations (`max_iters=3, on_failure="return"`,
the gradient by the adjoint scan at that iterate); the layers' own default is recorded beside it (converge to the
dtype's tol, at most T iterations, fall back to the sequential loop). After training each Para model is evaluated
twice: as trained (3 iterations) and exactly (the layer default), with the Newton iterations the exact solve took.

Validation (as the demo): the first 16 KB of each validation file, in order, until 16,000 tokens (the last file
read to its end); the test split the same way, a second held-out number. The state is carried through each
document for the recurrent models; llama reads sliding windows of its training context. Writes
cpu_quality_newton.json (device, versions, commit, corpus, settings, one row per model) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from revival.bench.report import environment  # noqa: E402
from revival.data import load_corpus  # noqa: E402
from revival.data.tokenizers import ByteTokenizer  # noqa: E402
from revival.demo import count_parameters, match_parameters  # noqa: E402
from revival.layers.pararnn import ParaRNNOptions, _ParaRNN  # noqa: E402
from revival.train import evaluate  # noqa: E402
from revival.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from revival.train.trainer import Trainer  # noqa: E402

MODELS = ["paragru", "paralstm", "mingru", "xlstm-large", "llama"]
PARA_LETTERS = {"paragru": "G", "paralstm": "L"}
PARARNN_TRAINING = {"method": "deer", "max_iters": 3, "on_failure": "return"}  # ParaRNN's fixed 3 Newton steps
FULL = dict(reference="xlstm-large", d_model=64, num_blocks=4, num_heads=4, context=128, batch=8, steps=300,
            lr=3e-3, eval_tokens=16_000, eval_doc_bytes=16_384)
SMOKE = dict(reference="xlstm-large", d_model=16, num_blocks=2, num_heads=2, context=16, batch=2, steps=3,
             lr=3e-3, eval_tokens=200, eval_doc_bytes=512)


class SolverRecord:
    """Forward hooks on the Para layers: the Newton iterations, residuals and fall-backs of every solve."""

    def __init__(self, model):
        self.results = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, _ParaRNN)]

    def _hook(self, module, inputs, output):
        self.results.append(module.last_result)

    def summary(self) -> dict:
        for handle in self.handles:
            handle.remove()
        if not self.results:
            return {}
        iterations = [r.iterations for r in self.results]
        return {"solves": len(self.results), "iterations_mean": sum(iterations) / len(iterations),
                "iterations_max": max(iterations), "residual_max": max(r.residual for r in self.results),
                "converged_fraction": sum(r.converged for r in self.results) / len(self.results),
                "fell_back": sum(r.fell_back for r in self.results)}


def set_solver(model, max_iters, on_failure) -> None:
    for module in model.modules():
        if isinstance(module, _ParaRNN):
            module.max_iters, module.on_failure = max_iters, on_failure


def model_options(settings: dict, vocab_size: int) -> list[tuple[str, dict]]:
    """(preset, model section) per model: the reference at the settings' shape, the others within 5% of its
    parameter count (xlstm-large is the reference: its widths come in the coarsest steps, 16 at 4 heads)."""
    shape = {k: settings[k] for k in ("d_model", "num_blocks", "num_heads")}
    target = count_parameters(settings["reference"], **shape, vocab_size=vocab_size)
    chosen = []
    for preset in settings["models"]:
        if preset == settings["reference"]:
            options = {**shape, "vocab_size": vocab_size}
        else:
            options = match_parameters(preset, target, shape, vocab_size)
        if preset in PARA_LETTERS:
            options["layer_options"] = {PARA_LETTERS[preset]: dict(PARARNN_TRAINING)}
        chosen.append((preset, {"preset": preset, **options}))
    return chosen


def run_model(preset: str, model: dict, corpus, settings: dict, out_dir: Path, seed: int) -> dict:
    steps = settings["steps"]
    run = RunConfig(
        model=dict(model),
        data=DataConfig(corpus="stdlib", tokenizer="byte", context_length=settings["context"]),
        train=TrainConfig(steps=steps, batch_size=settings["batch"], lr=settings["lr"],
                          warmup_steps=max(1, steps // 10), eval_every=steps, eval_docs=len(corpus.validation),
                          eval_max_tokens=settings["eval_tokens"], checkpoint_every=steps, keep_checkpoints=1,
                          log_every=max(1, steps // 12), seed=seed, device="cpu", out_dir=str(out_dir / preset),
                          tensorboard=False, progress=False))
    run.validate()
    trainer = Trainer(run, corpus=corpus, print_fn=lambda *a, **k: print(f"  [{preset}]", *a, flush=True, **k))
    config = trainer.model_config
    print(f"[{preset}] pattern {config.pattern!r}, d_model {config.d_model}, {trainer.model.num_parameters():,} "
          "parameters", flush=True)
    record = SolverRecord(trainer.model)
    began = time.perf_counter()
    summary = trainer.train()
    seconds = time.perf_counter() - began
    row = {"model": preset, "pattern": config.pattern, "d_model": config.d_model, "num_blocks": config.num_blocks,
           "num_heads": config.num_heads, "parameters": summary["parameters"], "tokens": summary["tokens_seen"],
           "train_tokens_per_s": summary["train_tokens_per_s"], "wall_seconds": seconds,
           "final_train_loss": sum(summary["losses"][-10:]) / len(summary["losses"][-10:]),
           "val_loss": summary["val"]["loss"], "val_bits_per_byte": summary["val"]["bpb"],
           "val_tokens": summary["val"]["tokens"], "layer_options": model.get("layer_options", {})}
    def held_out(split: str):
        return evaluate(trainer.model, corpus.split(split), trainer.tokenizer, settings["context"], trainer.device,
                        settings["eval_tokens"])

    test = held_out("test")
    row.update(test_loss=test.loss, test_bits_per_byte=test.bits_per_byte, test_tokens=test.tokens)
    if preset in PARA_LETTERS:
        row["newton_training"] = record.summary()  # every forward of the run: training steps and the evaluations
        exact_record = SolverRecord(trainer.model)
        set_solver(trainer.model, max_iters=None, on_failure="sequential")
        exact, exact_test = held_out("validation"), held_out("test")
        row["exact_eval"] = {"val_loss": exact.loss, "val_bits_per_byte": exact.bits_per_byte,
                             "test_loss": exact_test.loss, "test_bits_per_byte": exact_test.bits_per_byte,
                             "newton": exact_record.summary()}
    print(f"[{preset}] val loss {row['val_loss']:.4f} ({row['val_bits_per_byte']:.4f} bits/byte), "
          f"{row['train_tokens_per_s']:,.0f} train tokens/s, {seconds:.0f} s"
          f"; test loss {row['test_loss']:.4f}"
          + (f"; exact solve: val loss {row['exact_eval']['val_loss']:.4f}, test loss "
             f"{row['exact_eval']['test_loss']:.4f}" if "exact_eval" in row else ""), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | layout | params | tokens | train tok/s | val loss | val bits/byte | test loss | test bits/byte "
             "| val / test loss, exact solve |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = (f"{r['exact_eval']['val_loss']:.4f} / {r['exact_eval']['test_loss']:.4f}" if "exact_eval" in r
                 else "-")
        lines.append(f"| {r['model']} | {r['pattern']}, d {r['d_model']} | {r['parameters']:,} | {r['tokens']:,} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['test_bits_per_byte']:.4f} | {exact} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for cpu_quality_newton.json")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 3 steps: checks the script")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    # 1: on a shared 2-core machine two threads made the Newton models' many small ops up to 26x slower
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(SMOKE if args.smoke else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    settings["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    corpus = load_corpus("stdlib", show_progress=False)
    limit = settings["eval_doc_bytes"]
    corpus = dataclasses.replace(corpus, validation=[document[:limit] for document in corpus.validation],
                                 test=[document[:limit] for document in corpus.test])
    tokenizer = ByteTokenizer()
    chosen = model_options(settings, tokenizer.vocab_size)
    header = {"benchmark": "cpu_quality_newton", "smoke": args.smoke, **environment(torch.device("cpu")),
              "corpus": corpus.describe(), "settings": settings,
              "tokens_per_model": settings["steps"] * settings["batch"] * settings["context"],
              "para_training_solver": PARARNN_TRAINING,
              "para_layer_default_solver": {f.name: getattr(ParaRNNOptions(), f.name)
                                            for f in dataclasses.fields(ParaRNNOptions)
                                            if f.name in ("method", "max_iters", "tol", "on_failure")}}
    print(json.dumps({k: header[k] for k in ("corpus", "settings", "tokens_per_model")}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu_quality_newton_") as runs:
        for preset, model in chosen:
            rows.append(run_model(preset, model, corpus, settings, Path(runs), args.seed))
    header["wall_seconds"] = time.perf_counter() - began
    path = out / "cpu_quality_newton.json"
    path.write_text(json.dumps({**header, "results": rows}, indent=2) + "\n")
    print("\n" + table(rows))
    print(f"wrote {path} ({header['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
