"""Length extrapolation: the loss at and beyond the training context, per position (`revival eval CKPT --extrapolate`).

    result = extrapolate(model, sequences, train_context=256, multipliers=[1, 2, 4, 8, 16])

`sequences` (N, L + 1) are token rows of at least max(multipliers) * train_context + 1 tokens (`corpus_sequences`
cuts them from evenly spaced offsets over a whole split). Every model is scored in two modes on the same targets:

    carried   one pass over each row in segments of `train_context` tokens, the state carried from segment to
              segment: every token sees its whole prefix. For a recurrent model this is how it runs on long inputs;
              for attention it is full context, RoPE positions beyond the trained ones (the KV cache grows).
    window    each token is scored from a window of the last train_context // 2 to train_context - 1 tokens, read
              from a fresh state (stride train_context // 2, as `revival eval` scores attention models): the model
              at its training context, never a position or a state older than the trained ones.

The headline numbers compare the two modes on the very same tokens, so the text's difficulty cancels:

    ratio_to_window[m]          carried / window mean loss over the targets [0, m * train_context) of every row
    beyond_ratio_to_window[m]   the same over the targets beyond the training context only, [train_context,
                                m * train_context), for m >= 2: the extrapolation test proper

Targets [0, train_context) see the same prefix in both modes (for an even train_context the windows start at
position 0 there), so ratio_to_window["1x"] is 1 up to rounding. A ratio above 1 says the model does worse with its
whole prefix than with its training window; below 1, that the longer prefix helps.

Per mode (content-confounded: later positions are different text, so these mix the model with the text):
`loss_by_length[m]`, the mean loss over the first m * train_context targets; `ratio_to_1x[m]` = loss_by_length[m] /
loss_by_length[1] (the old headline: a model that never reads beyond its context moves it too when the later text
is harder or easier); `loss_beyond_context[m]`, the mean over [train_context, m * train_context); `loss_by_position`,
the mean loss in bins of train_context // 4 positions (the curve of the plot: where a model breaks).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["corpus_sequences", "extrapolate", "parse_multipliers", "plot_extrapolation", "position_losses",
           "spaced_rows", "window_position_losses"]


def parse_multipliers(text: str) -> list[int]:
    """'1x,2x,4x' (or '1,2,4') -> [1, 2, 4], sorted; UserError naming --extrapolate otherwise."""
    values = []
    for item in text.split(","):
        item = item.strip().lower().removesuffix("x")
        if not item.isdigit() or int(item) < 1:
            raise UserError(f"--extrapolate: expected multipliers of the training context such as 1x,2x,4x,8x, got "
                            f"{text!r}")
        values.append(int(item))
    return sorted(set(values))


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token NLL in float32, or float64 for a float64 model."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def position_losses(model, sequences: torch.Tensor, segment: int, autocast=contextlib.nullcontext) -> torch.Tensor:
    """(L,) mean NLL over the rows of predicting sequences[:, t + 1] from sequences[:, : t + 1], read in segments of
    `segment` tokens with the state carried."""
    inputs, targets = sequences[:, :-1], sequences[:, 1:]
    state, losses = None, []
    for start in range(0, inputs.shape[1], segment):
        with autocast():
            logits, state = model(inputs[:, start : start + segment], state)
        losses.append(_nll(logits, targets[:, start : start + segment]).mean(0))
    return torch.cat(losses).cpu()


@torch.no_grad()
def window_position_losses(model, sequences: torch.Tensor, context: int,
                           autocast=contextlib.nullcontext) -> torch.Tensor:
    """(L,) as `position_losses`, each target scored from at most `context - 1` preceding tokens: windows of
    `context` tokens advanced by context // 2, each from a fresh state (the first window scores all its targets)."""
    n = sequences.shape[1] - 1
    stride = max(1, context // 2)
    losses = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, stride):
        end = min(start + stride, n)  # score targets start + 1 .. end (positions start .. end - 1)
        begin = max(0, end - context)
        with autocast():
            logits, _ = model(sequences[:, begin:end])
        scored = end - start
        losses[start:end] = _nll(logits[:, -scored:], sequences[:, start + 1 : end + 1]).mean(0).cpu()
    return losses


def _summary(losses: torch.Tensor, train_context: int, multipliers: list[int]) -> dict[str, Any]:
    by_length = {f"{m}x": float(losses[: m * train_context].mean()) for m in multipliers}
    base = by_length[f"{multipliers[0]}x"] if multipliers[0] == 1 else None
    bin_size = max(1, train_context // 4)
    bins = [(start, min(start + bin_size, losses.numel())) for start in range(0, losses.numel(), bin_size)]
    return {"loss_by_length": by_length,
            "ratio_to_1x": {key: value / base for key, value in by_length.items()} if base else None,
            "loss_beyond_context": {f"{m}x": float(losses[train_context : m * train_context].mean())
                                    for m in multipliers if m >= 2},
            "position_bins": [[start, end] for start, end in bins],
            "loss_by_position": [float(losses[start:end].mean()) for start, end in bins]}


def extrapolate(model, sequences: torch.Tensor, train_context: int, multipliers: list[int],
                autocast=contextlib.nullcontext) -> dict[str, Any]:
    """The JSON-ready result of the module docstring for `model` on `sequences` (N, >= max * train_context + 1)."""
    needed = max(multipliers) * train_context + 1
    if sequences.shape[1] < needed:
        raise UserError(f"--extrapolate: {max(multipliers)}x a context of {train_context} needs rows of {needed} "
                        f"tokens, got {sequences.shape[1]}")
    sequences = sequences[:, :needed].to(model.device)
    was_training = model.training
    model.eval()
    # float64 means: every row has the same targets, so the mean of the per-position means is the mean over tokens
    carried = position_losses(model, sequences, train_context, autocast).double()
    window = window_position_losses(model, sequences, train_context, autocast).double()
    model.train(was_training)

    def ratio(start: int, end: int) -> float:
        return float(carried[start:end].mean() / window[start:end].mean())

    return {"train_context": train_context, "multipliers": multipliers, "sequences": int(sequences.shape[0]),
            "tokens_per_sequence": needed, "pattern": model.config.pattern,
            "ratio_to_window": {f"{m}x": ratio(0, m * train_context) for m in multipliers},
            "beyond_ratio_to_window": {f"{m}x": ratio(train_context, m * train_context)
                                       for m in multipliers if m >= 2},
            "modes": {"carried": _summary(carried, train_context, multipliers),
                      "window": _summary(window, train_context, multipliers)}}


def plot_extrapolation(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Loss against position (left) and against evaluation context / training context (right), one line per
    (model, mode); `results` maps a label to `extrapolate`'s result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tasks import save_figure

    figure, (by_position, by_length) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.get_cmap("tab10").colors
    styles = {"carried": "-", "window": "--"}  # one color per model, one line style per mode
    for index, (label, result) in enumerate(results.items()):
        context = result["train_context"]
        for mode, summary in result["modes"].items():
            line = dict(label=f"{label} ({mode})", color=colors[index % len(colors)], linestyle=styles.get(mode, ":"))
            centers = [(start + end) / 2 / context for start, end in summary["position_bins"]]
            by_position.plot(centers, summary["loss_by_position"], **line)
            by_length.plot(result["multipliers"], list(summary["loss_by_length"].values()), marker="o", **line)
    for axis in (by_position, by_length):
        axis.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_ylabel("loss (nats / token)")
    by_position.set_xlabel("position / training context")
    by_length.set_xlabel("evaluation context / training context")
    by_length.set_xscale("log", base=2)
    by_position.set_title("loss by position", fontsize=9)
    by_length.set_title("mean loss over the first m x context tokens", fontsize=9)
    by_length.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(figure, path)


def spaced_rows(stream: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """(min(count, len(stream) // length), length) rows of `stream` (T,) from evenly spaced offsets: the first row at
    the start, the last ending at the end, none overlapping, so the rows sample the whole stream."""
    if length < 1 or count < 1:
        raise ValueError(f"spaced_rows: expected length and count >= 1, got length {length}, count {count}")
    count = min(count, stream.numel() // length)
    if count == 0:
        return stream.new_empty((0, length))
    spare = stream.numel() - length  # offsets i * spare // (count - 1) are >= length apart: count <= len // length
    offsets = [i * spare // (count - 1) for i in range(count)] if count > 1 else [0]
    return torch.stack([stream[offset : offset + length] for offset in offsets])


def corpus_sequences(documents: list, tokenizer, length: int, max_sequences: int) -> torch.Tensor:
    """Up to `max_sequences` rows of `length` tokens cut at evenly spaced offsets (`spaced_rows`) from the whole
    split, its documents joined in order ([eos] + document each, as the trainer packs them); UserError when the
    documents hold fewer than one row."""
    from ..data.packing import iter_document_tokens

    if max_sequences < 1:
        raise UserError(f"--sequences: expected at least 1 row, got {max_sequences}")
    pieces = list(iter_document_tokens(documents, tokenizer))
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    if stream.numel() < length:
        raise UserError(f"--extrapolate: the split holds {stream.numel():,} tokens, fewer than one row of {length:,} "
                        "(the largest multiplier times the context); use smaller multipliers or --context-length")
    return spaced_rows(stream, length, max_sequences)


def run_extrapolation(args) -> int:
    """`revival eval CHECKPOINT --extrapolate 1x,2x,...`: the checkpoint's corpus split (as `revival eval` reads it),
    rows of max * context + 1 tokens, `extrapolate`, then extrapolation.json and extrapolation.png under --out."""
    import json

    from ..data import load_corpus
    from ..train.checkpoint import load_for_inference

    multipliers = parse_multipliers(args.extrapolate)
    model, tokenizer, directory, run_config = load_for_inference(args.checkpoint, args.device)
    data = run_config.get("data") or {}
    context = args.context_length or int(data.get("context_length") or 256)
    corpus = load_corpus(args.corpus or data.get("corpus") or "stdlib", show_progress=not args.no_progress,
                         **{key: data[key] for key in ("validation_fraction", "test_fraction", "text_field")
                            if data.get(key) is not None and not args.corpus})
    sequences = corpus_sequences(corpus.split(args.split), tokenizer, max(multipliers) * context + 1, args.sequences)
    autocast = contextlib.nullcontext
    if model.device.type == "cuda":
        def autocast():
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    result = extrapolate(model, sequences, context, multipliers, autocast)
    result.update(checkpoint=str(directory), corpus=corpus.name, split=args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / "extrapolation.json.tmp"
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(out / "extrapolation.json")
    png = plot_extrapolation({model.config.pattern: result}, out / "extrapolation.png")
    print(f"checkpoint: {directory}\ncorpus: {corpus.name}, split {args.split}: {result['sequences']} rows of "
          f"{result['tokens_per_sequence']:,} tokens (evenly spaced over the split), training context {context}")
    beyond = "  ".join(f"{key} {value:.4f}" for key, value in result["beyond_ratio_to_window"].items())
    print(f"carried / window on the same tokens, beyond the training context: {beyond or '- (needs 2x or more)'}")
    print("carried / window on the same tokens, all targets up to m x context: "
          + "  ".join(f"{key} {value:.4f}" for key, value in result["ratio_to_window"].items()))
    for mode, summary in result["modes"].items():
        cells = "  ".join(f"{key} {value:.4f}" for key, value in summary["loss_by_length"].items())
        ratio = summary["ratio_to_1x"]
        worst = f"  (max / 1x, content-confounded: {max(ratio.values()):.3f})" if ratio else ""
        print(f"{mode:8s} loss  {cells}{worst}")
    print(f"wrote {out / 'extrapolation.json'} and {png}")
    return 0
