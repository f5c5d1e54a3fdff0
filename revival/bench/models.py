"""The models a benchmark runs: sizes per preset, the FLOP model, and one `Runner` interface over revival's
`LanguageModel` and the Hugging Face anchors (`transformers` `xLSTMForCausalLM` / `LlamaForCausalLM`, random weights,
built from configs at the same sizes; nothing is downloaded).

Sizes (`bench_config(preset, size)`):
    tiny   CPU tests: d_model 128, vocab 256, the preset's smallest depth that holds each of its block kinds, and
           each kind's `bench_tiny_options` (revival/layers/kinds.py).
    125m   GPU runs: d_model 768, vocab 50304, tied embeddings (as GPT-2 small), the depth whose parameter count,
           counted on the real classes (meta device), is closest to 125M. Heads: `bench_heads(preset, size)`, from
           the layer kinds' declarations.
    1.3b   as 125m at d_model 2048, closest to 1.3B: a model that fills a GPU at batch 1 (xlstm-large then has the
           xLSTM-7B's head dims, 256 / 512; llama heads of 128).

FLOP model (training, per token; MFU = flops_per_token * tokens/s / peak):
    6 * N  +  6 * n_attention_blocks * d_model * T
N counts every parameter that takes part in a matrix product (all of them, less an untied input embedding table:
a lookup, no FLOPs). The second term is causal softmax attention: QK^T and AV, 2 * 2 * d_model * T / 2 multiply-adds
per token forward (causal halves it), times 3 for forward + backward. The quadratic-in-chunk work inside the chunkwise
mLSTM / SSD / delta-rule kernels is not counted, so MFU slightly under-states the recurrent models' arithmetic.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..layers.kinds import layer_kinds
from ..models import LanguageModel, ModelConfig, preset_config
from ..ops.fused import soft_cap

SIZES = ("tiny", "125m", "1.3b")
ANCHORS = {"hf-xlstm": "xlstm-large", "hf-llama": "llama"}  # anchor -> the preset whose size it copies
# size -> (d_model, target parameter count); the heads come from the layer kinds' `bench_heads`
SCALED_SIZES = {"125m": (768, 125_000_000), "1.3b": (2048, 1_300_000_000)}
# dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is None on other devices
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def bench_heads(preset: str, size: str) -> int:
    """num_heads of `preset` at a scaled size: the fewest that its layer kinds declare (`LayerKind.bench_heads`, 4
    where a kind names none), i.e. the largest head dims, which every kind of the pattern accepts."""
    kinds = layer_kinds()
    return min(kinds[letter].bench_heads.get(size, 4) for letter in set(preset_config(preset).pattern))


def tiny_depth(preset: str) -> int:
    """The fewest blocks (at least 2; 3 for xlstm[a:b]) whose pattern holds every block kind of `preset`'s own."""
    kinds = set(preset_config(preset).pattern)
    depth = 3 if preset.startswith("xlstm[") else 2
    while set(preset_config(preset, num_blocks=depth).pattern) != kinds:
        depth += 1
    return depth


def bench_config(preset: str, size: str) -> ModelConfig:
    """The `ModelConfig` a benchmark uses for `preset` at `size` (one of `SIZES`)."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {list(SIZES)}, got {size!r}")
    if preset in ANCHORS:
        preset = ANCHORS[preset]
    if size == "tiny":
        depth = tiny_depth(preset)
        kinds = layer_kinds()
        letters = sorted(set(preset_config(preset, num_blocks=depth).pattern))
        options = {letter: dict(kinds[letter].bench_tiny_options) for letter in letters
                   if kinds[letter].bench_tiny_options}
        return preset_config(preset, vocab_size=256, d_model=128, num_heads=2, num_blocks=depth, chunk_size=16,
                             layer_options=options)
    d_model, target = SCALED_SIZES[size]
    base = dict(vocab_size=50304, d_model=d_model, num_heads=bench_heads(preset, size), tie_embeddings=True)
    best: tuple[float, ModelConfig] | None = None
    for depth in range(1, 129):
        config = preset_config(preset, num_blocks=depth, **base)
        error = abs(count_parameters(config) - target)
        if best is None or error < best[0]:
            best = (error, config)
        elif count_parameters(config) > target:
            break
    return best[1]


_COUNTS: dict[str, int] = {}


def count_parameters(config: ModelConfig) -> int:
    """Parameters of `LanguageModel(config)`, counted on the meta device (nothing allocated); cached."""
    key = repr(config.to_dict())
    if key not in _COUNTS:
        with torch.device("meta"):
            _COUNTS[key] = LanguageModel(config).num_parameters()
    return _COUNTS[key]


def training_flops_per_token(config: ModelConfig, context: int) -> float:
    """6 N + 6 * n_attention_blocks * d_model * T (see the module doc)."""
    matmul_params = count_parameters(config)
    if not config.tie_embeddings:
        matmul_params -= config.vocab_size * config.d_model
    return 6.0 * matmul_params + 6.0 * config.pattern.count("a") * config.d_model * context


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One model behind the three calls a study makes. ids are (B, T) long on the model's device."""

    name: str
    kind: str  # "revival" | "transformers"
    model: torch.nn.Module
    config: ModelConfig  # the revival config (for anchors: the one they copy)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over ids (training)."""
        logits = self.logits(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """-> (logits of the last position (B, V), state after ids)."""
        raise NotImplementedError

    def step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """ids (B, 1) -> (logits (B, V), state)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


class RevivalRunner(Runner):
    def logits(self, ids):
        return self.model(ids)[0]

    def prefill(self, ids):
        return forward_last(self.model, ids)

    def step(self, ids, state):
        logits, state = self.model(ids, state)
        return logits[:, -1], state


def forward_last(model: LanguageModel, ids: torch.Tensor, state=None) -> tuple[torch.Tensor, list]:
    """`model(ids, state)` but the LM head only at the last position: -> (logits (B, V), state).

    A prefill needs one row of logits; the full (B, T, V) tensor would dominate time and memory at long contexts.
    """
    state = [None] * len(model.blocks) if state is None else state
    x = model.embedding(ids)
    new_state = []
    for block, block_state in zip(model.blocks, state):
        x, block_state = block(x, block_state)
        new_state.append(block_state)
    return soft_cap(model.lm_head(model.out_norm(x[:, -1])), model.config.logit_soft_cap), new_state


@functools.cache
def hf_cache_name(model_class: type, old_name: str) -> str:
    """The cache argument (and output field) of a transformers model: "cache" in the releases that renamed
    `cache_params` / `past_key_values` to it (the old names then warn), else `old_name` (older releases we support)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else old_name


class HFXLSTMRunner(Runner):
    def logits(self, ids):
        return self.model(ids, use_cache=False).logits

    def prefill(self, ids):
        out = self.model.backbone(ids, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1]), out[hf_cache_name(type(self.model), "cache_params")]

    def step(self, ids, state):
        name = hf_cache_name(type(self.model), "cache_params")
        out = self.model(ids, use_cache=True, **{name: state})
        return out.logits[:, -1], out[name]


class HFLlamaRunner(Runner):
    def logits(self, ids):
        return self.model(ids, use_cache=False).logits

    def prefill(self, ids):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out[hf_cache_name(type(self.model), "past_key_values")]

    def step(self, ids, state):
        name = hf_cache_name(type(self.model), "past_key_values")
        out = self.model(ids, use_cache=True, logits_to_keep=1, **{name: state})
        return out.logits[:, -1], out[name]


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def build_runner(name: str, size: str, device: torch.device, dtype: torch.dtype, train: bool = False) -> Runner:
    """A `Runner` for a preset name or an anchor ("hf-xlstm", "hf-llama"), weights random, on `device` in `dtype`."""
    config = bench_config(name, size)
    torch.manual_seed(0)
    if name not in ANCHORS:
        with torch.device(device):
            model = LanguageModel(config)
        return RevivalRunner(name, "revival", model.to(dtype).train(train), config)
    if transformers_version() is None:
        raise ValueError(f"presets: anchor {name!r} needs the `transformers` package, which is not installed")
    if name == "hf-xlstm":
        from transformers import xLSTMConfig, xLSTMForCausalLM

        from ..models.hf_xlstm import hf_config_from_revival

        hf = hf_config_from_revival(config)
        hf.pop("architectures", None)
        hf.update(mode="train" if train else "inference")
        hf_config = xLSTMConfig(**hf)
        model_class, runner_class = xLSTMForCausalLM, HFXLSTMRunner
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..layers.ffn import ffn_hidden_dim

        hf_config = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.num_blocks,
            intermediate_size=ffn_hidden_dim(config.d_model, config.ffn_proj_factor,
                                             config.ffn_round_up_to_multiple_of),
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads or config.num_heads,
            rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
            max_position_embeddings=1 << 20, attention_bias=config.use_bias)
        hf_config._attn_implementation = "sdpa"
        model_class, runner_class = LlamaForCausalLM, HFLlamaRunner
    with torch.device(device):
        model = model_class(hf_config)
    return runner_class(name, "transformers", model.to(dtype).train(train), config)


def model_record(runner: Runner) -> dict[str, Any]:
    """What the JSON says about a model."""
    config = runner.config
    return {"kind": runner.kind, "pattern": config.pattern, "parameters": runner.num_parameters(),
            "d_model": config.d_model, "num_blocks": config.num_blocks, "attention_blocks": config.pattern.count("a"),
            "model_config": config.to_dict(), "hf_class": type(runner.model).__name__ if runner.kind != "revival"
            else None}


def tokens_batch(vocab_size: int, batch: int, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)
