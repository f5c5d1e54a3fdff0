"""GPU: what packed documents cost. Training steps at 8k context with ~500-token documents, with `document_starts`
(every layer restarts at each document) against the same rows without them, for xlstm-large and llama; the mLSTM
op alone (forward + backward) with and without starts; and the exactness of packed rows against separate calls on
the GPU (float32, real shapes).

Run on a CUDA machine (a few minutes on one H100/H200; `--sections` picks some; the JSON is written after each):

    python benchmarks/gpu_packed.py --out "$OUT" [--sections train_xlstm_large,train_llama]

Writes gpu_packed.json. The target of issue 21: packed step time <= 1.1x unpacked for both presets (llama's packed
attention runs on flash attention's varlen kernel per document, `causal_attention(impl="auto")`). Also: the sLSTM
Triton op with and without starts, and attention alone: SDPA causal (plain rows) against the document mask as SDPA
with a boolean mask (the reference), the varlen kernel (what auto runs) and FlexAttention's block mask (compiled).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from revival.models import LanguageModel, ModelConfig, preset_config
from revival.ops._documents import document_ids, from_lengths
from revival.ops.attention import causal_attention
from revival.ops.mlstm import mlstm
from revival.ops.slstm import slstm

CONTEXT, BATCH, MEAN_DOCUMENT = 8192, 4, 500


def random_lengths(rows: int, length: int, mean: int, seed: int) -> list[list[int]]:
    """Document lengths per row, exponential around `mean` (many short ones, some long), each row summing to T."""
    generator = torch.Generator().manual_seed(seed)
    layouts = []
    for _ in range(rows):
        row, left = [], length
        while left:
            n = max(1, min(left, int(torch.empty(1).exponential_(1 / mean, generator=generator))))
            row.append(n)
            left -= n
        layouts.append(row)
    return layouts


def timed(fn, steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_ms(fn, steps: int, warmup: int) -> float:
    return 1e3 * timed(fn, steps, warmup)


def record(row: dict, key: str, measure, *args) -> None:
    """row[key] = measure(*args), or the failure as text: the other rows still run."""
    try:
        row[key] = measure(*args)
    except Exception as error:  # noqa: BLE001 - recorded, the other rows still run
        row[key] = f"failed: {type(error).__name__}: {error}"


def train_rows(preset: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = LanguageModel(preset_config(preset)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, CONTEXT + 1), device="cuda")
    layouts = random_lengths(BATCH, CONTEXT, MEAN_DOCUMENT, seed=1)
    starts = from_lengths(layouts, device="cuda")

    def step(document_starts):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids[:, :-1], document_starts=document_starts)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"preset": preset, "parameters": model.num_parameters(), "batch": BATCH, "context": CONTEXT,
              "documents": sum(len(row) for row in layouts),
              "mean_document_tokens": BATCH * CONTEXT / sum(len(row) for row in layouts)}
    for name, document_starts in (("unpacked", None), ("packed", starts)):
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(functools.partial(step, document_starts), steps, warmup=2)
        result[name] = {"step_ms": 1e3 * seconds, "tokens_per_s": BATCH * CONTEXT / seconds,
                        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    result["packed_over_unpacked"] = result["packed"]["step_ms"] / result["unpacked"]["step_ms"]
    result["target_met"] = result["packed_over_unpacked"] <= 1.1
    return result


def _op_step(inputs, grad, impl, document_starts):
    h, _ = mlstm(*inputs, impl=impl, document_starts=document_starts)
    h.backward(grad)
    for x in inputs:
        x.grad = None


def mlstm_rows(steps: int) -> list[dict]:
    """The op at xlstm-large's head shape (4 heads, Dk 64, Dv 128) and at (8 heads, 128, 128), T = 8192."""
    rows = []
    for B, H, Dk, Dv in ((4, 4, 64, 128), (4, 8, 128, 128)):
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (B, H, CONTEXT)
        q, k = (torch.randn(*shape, Dk, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(*shape, Dv, device="cuda", generator=g, dtype=torch.bfloat16)
        i, f = torch.randn(*shape, device="cuda", generator=g), torch.randn(*shape, device="cuda", generator=g) + 3
        inputs = [x.requires_grad_(True) for x in (q, k, v, i, f)]
        starts = from_lengths(random_lengths(B, CONTEXT, MEAN_DOCUMENT, seed=2), device="cuda")
        grad = torch.randn(B, H, CONTEXT, Dv, device="cuda", dtype=torch.bfloat16)

        row = {"shape": [B, H, CONTEXT, Dk, Dv]}
        for name, impl, document_starts in (("auto", "auto", None), ("auto_packed", "auto", starts),
                                            ("chunkwise", "chunkwise", None),
                                            ("chunkwise_packed", "chunkwise", starts)):
            run = functools.partial(_op_step, inputs, grad, impl, document_starts)
            record(row, name + "_fwd_bwd_ms", timed_ms, run, steps, 2)
        rows.append(row)
    return rows


def _slstm_step(inputs, grad, document_starts):
    y, _ = slstm(*inputs, impl="triton", document_starts=document_starts)
    y.backward(grad)
    for x in inputs:
        x.grad = None


def slstm_rows(steps: int) -> list[dict]:
    """The sLSTM Triton op forward + backward, bf16, T = 8192, with and without starts: 4 heads of 64 (resident
    weights) and of 192 (split over programs, the xlstm[7:1] preset's head)."""
    rows = []
    for B, H, d in ((4, 4, 64), (4, 4, 192)):
        g = torch.Generator(device="cuda").manual_seed(8)
        x = torch.randn(B, CONTEXT, 4, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
        R = torch.randn(4, H, d, d, device="cuda", generator=g) * d**-0.5
        inputs = [x.requires_grad_(True), R.requires_grad_(True)]
        grad = torch.randn(B, CONTEXT, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
        starts = from_lengths(random_lengths(B, CONTEXT, MEAN_DOCUMENT, seed=9), device="cuda")
        row = {"shape": [B, CONTEXT, H, d]}
        for name, document_starts in (("plain", None), ("packed", starts)):
            run = functools.partial(_slstm_step, inputs, grad, document_starts)
            record(row, name + "_fwd_bwd_ms", timed_ms, run, steps, 2)
        rows.append(row)
    return rows


def _max_difference(fn, inputs, reference) -> float:
    return (fn(*inputs).float() - reference).abs().max().item()


def _attention_step(fn, inputs, grad):
    out = fn(*inputs)
    out.backward(grad)
    for x in inputs:
        x.grad = None


def attention_rows(steps: int) -> dict:
    """Causal attention forward + backward at llama's shape (8 heads of 64), T = 8192, bf16."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, hd = BATCH, 8, 64
    g = torch.Generator(device="cuda").manual_seed(6)
    inputs = [torch.randn(B, H, CONTEXT, hd, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
              for _ in range(3)]
    grad = torch.randn(B, H, CONTEXT, hd, device="cuda", dtype=torch.bfloat16)
    starts = from_lengths(random_lengths(B, CONTEXT, MEAN_DOCUMENT, seed=7), device="cuda")
    ids = document_ids(starts)

    def same_document(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(same_document, B, None, CONTEXT, CONTEXT, device="cuda")
    flex = torch.compile(flex_attention)
    variants = {
        "sdpa_causal_unpacked": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_document_mask": lambda q, k, v: causal_attention(q, k, v, document_starts=starts, impl="sdpa"),
        "varlen_document": lambda q, k, v: causal_attention(q, k, v, document_starts=starts, impl="varlen"),
        "flex_document_block_mask": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
    }
    row = {"shape": [B, H, CONTEXT, hd]}
    with torch.no_grad():  # the packed variants against the SDPA mask (all bf16)
        reference = variants["sdpa_document_mask"](*inputs).float()
        for name in ("varlen_document", "flex_document_block_mask"):
            record(row, name + "_max_abs_difference_to_sdpa_mask", _max_difference, variants[name], inputs, reference)
    for name, fn in variants.items():
        run = functools.partial(_attention_step, fn, inputs, grad)
        record(row, name + "_fwd_bwd_ms", timed_ms, run, steps, 3)
    return row


def note(out: dict, name: str, worst: float, began: float) -> None:
    out[name] = worst
    print(f"  exactness: {name} {worst:.2e} after {time.perf_counter() - began:.0f} s", flush=True)


def exactness() -> dict:
    """Packed rows against separate calls on the GPU in float32: the mLSTM op (auto) and a small hybrid model."""
    out, began = {}, time.perf_counter()
    g = torch.Generator(device="cuda").manual_seed(3)
    B, H, T, Dk, Dv = 2, 4, 1500, 64, 128
    layouts = random_lengths(B, T, 300, seed=4)
    starts = from_lengths(layouts, device="cuda")
    q, k = (torch.randn(B, H, T, Dk, device="cuda", generator=g) for _ in range(2))
    v = torch.randn(B, H, T, Dv, device="cuda", generator=g)
    i, f = torch.randn(B, H, T, device="cuda", generator=g), torch.randn(B, H, T, device="cuda", generator=g) + 3
    with torch.no_grad():
        h, _ = mlstm(q, k, v, i, f, document_starts=starts)
        worst = 0.0
        for row, lengths in enumerate(layouts):
            start = 0
            for n in lengths:
                piece = [x[row : row + 1, :, start : start + n] for x in (q, k, v, i, f)]
                alone, _ = mlstm(*piece)
                worst = max(worst, (h[row : row + 1, :, start : start + n] - alone).abs().max().item())
                start += n
    note(out, "mlstm_auto_float32_max_abs_error", worst, began)
    d = 64
    x = torch.randn(B, T, 4, H, d, device="cuda", generator=g)
    R = torch.randn(4, H, d, d, device="cuda", generator=g) * d**-0.5
    with torch.no_grad():
        y, _ = slstm(x, R, impl="triton", document_starts=starts)
        worst = 0.0
        for row, lengths in enumerate(layouts):
            start = 0
            for n in lengths:
                alone, _ = slstm(x[row : row + 1, start : start + n], R, impl="triton")
                worst = max(worst, (y[row : row + 1, start : start + n] - alone).abs().max().item())
                start += n
    note(out, "slstm_triton_float32_max_abs_error", worst, began)
    torch.manual_seed(5)
    model = LanguageModel(ModelConfig(vocab_size=1000, d_model=256, num_heads=4, pattern="msxa")).cuda().eval()
    ids = torch.randint(0, 1000, (B, T), device="cuda")
    with torch.no_grad():
        logits, _ = model(ids, document_starts=starts)
        worst = 0.0
        for row, lengths in enumerate(layouts):
            start = 0
            for n in lengths:
                alone, _ = model(ids[row : row + 1, start : start + n])
                worst = max(worst, (logits[row : row + 1, start : start + n] - alone).abs().max().item())
                start += n
    note(out, "model_msxa_float32_max_abs_logit_error", worst, began)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_packed.json")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, in this order (default: all: {','.join(SECTIONS)})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_packed.py: needs a CUDA device")
    chosen = args.sections.split(",")
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        raise SystemExit(f"gpu_packed.py: --sections: unknown {unknown}, expected names from {list(SECTIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "flash_attention_available": torch.backends.cuda.is_flash_attention_available(), "seconds": {}}
    path = Path(args.out) / "gpu_packed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        started = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args.steps)
        except Exception:  # noqa: BLE001 - recorded, the other sections still run
            results[name] = {"error": traceback.format_exc()}
        results["seconds"][name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {results['seconds'][name]} s  {json.dumps(results[name])[:400]}", flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # after every section: a killed run keeps the rest
        torch.cuda.empty_cache()
    print(f"wrote {path}")


# the target first; the exactness check (also covered by the GPU tests) last
SECTIONS = {"train_xlstm_large": lambda steps: train_rows("xlstm-large", steps),
            "train_llama": lambda steps: train_rows("llama", steps),
            "mlstm_op": mlstm_rows, "slstm_op": slstm_rows, "attention_op": attention_rows,
            "exactness": lambda steps: exactness()}


if __name__ == "__main__":
    main()
