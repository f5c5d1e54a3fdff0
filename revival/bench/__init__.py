"""`revival bench`: training, prefill and decode throughput/memory of presets (and Hugging Face anchors).

    from revival.bench import run_study
    result = run_study("decode", presets=["xlstm-large", "llama"], contexts=[1024, 8192], device="cuda",
                       dtype="bf16", out_dir="benchmarks/results", size="125m", batch_sizes=[1, 16])

Each study writes `<out_dir>/bench_<study>.json` and `bench_<study>.png` and returns the JSON dict:

    study           "train" | "prefill" | "decode"
    schema_version  1
    created         ISO time (UTC)
    device          {type, name, ...; on CUDA: capability, total_memory_bytes, multiprocessors, peak_bf16_flops}
    versions        {python, torch, cuda, triton, transformers, revival, git_commit}
    config          {size, dtype, presets, contexts, batch_sizes, cuda_graphs, max_seconds, tokens_per_step, warmup,
                     repeats, decode_tokens, flop_model}
    models          {name: {kind, pattern, parameters, d_model, num_blocks, attention_blocks, model_config, hf_class}}
    points          [{model, context, batch, status: "ok"|"oom"|"error"|"skipped", error, <figures>}]
    wall_seconds    the study's duration
    plot            file name of the PNG beside the JSON

Figures per point: train: tokens, step_seconds, tokens_per_s, flops_per_token, mfu, peak_memory_bytes, loss;
prefill: ttft_seconds, tokens_per_s, peak_memory_bytes, cuda_graph, cuda_graph_error; decode: tokens_per_s,
step_seconds, decode_tokens, prefill_seconds, peak_memory_bytes, state_bytes_after_prefill, cuda_graph,
cuda_graph_error. Memory figures are None off CUDA. Studies, sizes and the FLOP model: see `studies.py` and `models.py`.
"""

from .models import ANCHORS, SIZES, bench_config, training_flops_per_token
from .studies import STUDIES, run_study

__all__ = ["ANCHORS", "SIZES", "STUDIES", "bench_config", "run_study", "training_flops_per_token"]
