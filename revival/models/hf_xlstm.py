"""Hugging Face `xLSTMForCausalLM` checkpoints (`model_type: "xlstm"`): config mapping, weight names, lazy load, save.

A HF xLSTM model is revival's pattern `"x" * num_blocks` with a final RMSNorm (docs/math.md). The revival model
must expose (see model.py / blocks.py): `model.embedding`, `model.blocks[i].norm | .mixer | .ffn_norm | .ffn`,
`model.out_norm`, `model.lm_head`. Weight names map one to one,

    backbone.embeddings.weight                 <-> embedding.weight
    backbone.blocks.{i}.norm_mlstm.*           <-> blocks.{i}.norm.*
    backbone.blocks.{i}.mlstm_layer.{name}.*   <-> blocks.{i}.mixer.{name}.*   (q, k, v, ogate_preact, igate_preact,
                                                                                fgate_preact, multihead_norm, out_proj)
    backbone.blocks.{i}.norm_ffn.*             <-> blocks.{i}.ffn_norm.*
    backbone.blocks.{i}.ffn.{name}.*           <-> blocks.{i}.ffn.{name}.*      (proj_up_gate, proj_up, proj_down)
    backbone.out_norm.weight                   <-> out_norm.weight
    lm_head.weight                             <-> lm_head.weight              (stored even when tied, see below)

except that weight_mode "fused" stacks rows: `mlstm_layer.qkv_opreact` = [q; k; v; ogate_preact],
`mlstm_layer.ifgate_preact` = [igate_preact; fgate_preact], `ffn.proj_up_gate_z` = [proj_up_gate; proj_up].

Loading builds the model on the `meta` device (no memory), checks every tensor name and shape against the files'
headers, allocates the parameters once (`to_empty`) and copies each tensor in from a freshly opened
`safetensors.safe_open` memory map in pieces of at most 32 MB, the map closed after each piece so mapped pages never
pile up: peak memory is the parameters plus about two pieces (see benchmarks/load_memory.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig

__all__ = ["HF_DEFAULTS", "revival_config_from_hf", "hf_config_from_revival", "hf_weight_plan", "hf_state_dict",
           "load_hf_xlstm", "load_hf_weights", "save_hf_xlstm", "special_token_ids"]

ARCHITECTURE = "xLSTMForCausalLM"
CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
WEIGHT_MODES = ("single", "fused")

# transformers' xLSTMConfig defaults (used for keys a config.json leaves out)
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50304, hidden_size=4096, num_hidden_layers=32, num_heads=8, use_bias=False,
    norm_reduction_force_float32=True, tie_word_embeddings=False, add_out_norm=True, norm_eps=1e-6, qk_dim_factor=0.5,
    v_dim_factor=1.0, chunk_size=64, eps=1e-6, inference_state_dtype="float32", ffn_proj_factor=2.667,
    ffn_round_up_to_multiple_of=64, gate_soft_cap=15.0, output_logit_soft_cap=30.0, weight_mode="single",
)
# Keys that change the computation, all honored (or their unsupported values rejected by name).
COMPUTE_KEYS = set(HF_DEFAULTS) | {"embedding_dim", "num_blocks", "mlstm_round_up_to_multiple_of", "head_dim"}
# Keys that do not change the outputs beyond float rounding (kernel choices, generation and bookkeeping).
NON_COMPUTE_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "return_last_states", "autocast_kernel_dtype",
    "max_inference_chunksize", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "force_bos_token_insert",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder",
}
_FUSED = [  # (block part, fused HF module, revival modules stacked in its rows, in order)
    ("mixer", "qkv_opreact", ("q", "k", "v", "ogate_preact")),
    ("mixer", "ifgate_preact", ("igate_preact", "fgate_preact")),
    ("ffn", "proj_up_gate_z", ("proj_up_gate", "proj_up")),
]
_BLOCK_PARTS = {"norm": "norm_mlstm", "mixer": "mlstm_layer", "ffn_norm": "norm_ffn", "ffn": "ffn"}


# ---------------------------------------------------------------------------------------------------- config
def _hf_round_up(x: float, multiple: int) -> int:
    """transformers' round_up_to_next_multiple_of (note: floor((x + m - 1) / m) * m, also for fractional x)."""
    return int(((x + multiple - 1) // multiple) * multiple)


def _ffn_factor_for_revival(d_model: int, factor: float, multiple: int) -> float:
    """A revival ffn_proj_factor giving the FFN width transformers computes: `factor` itself unless the two roundings
    disagree (fractional width just above a multiple, e.g. 768 * 2.667), then (width - 0.5) / d_model."""
    from ..layers.ffn import ffn_hidden_dim

    width = _hf_round_up(d_model * factor, multiple)
    if ffn_hidden_dim(d_model, factor, multiple) == width:
        return factor
    adjusted = (width - 0.5) / d_model
    if width < 1 or ffn_hidden_dim(d_model, adjusted, multiple) != width:
        raise ValueError(f"config.json: ffn_proj_factor={factor} gives FFN width {width}, which revival cannot build")
    return adjusted


def _ffn_factor_for_hf(d_model: int, factor: float, multiple: int) -> float:
    """An ffn_proj_factor with which transformers builds revival's FFN width (the inverse of the function above)."""
    from ..layers.ffn import ffn_hidden_dim

    width = ffn_hidden_dim(d_model, factor, multiple)
    if _hf_round_up(d_model * factor, multiple) == width:
        return factor
    adjusted = (width + 0.25) / d_model
    if _hf_round_up(d_model * adjusted, multiple) != width:
        raise ValueError(f"ffn_proj_factor: {factor} gives FFN width {width}, which transformers cannot build")
    return adjusted


def _pick(hf: dict, a: str, b: str) -> Any:
    """Value of two synonymous keys (hidden_size/embedding_dim, ...); they must agree when both are given."""
    if a in hf and b in hf and hf[a] is not None and hf[b] is not None and hf[a] != hf[b]:
        raise ValueError(f"config.json: {a}={hf[a]!r} and {b}={hf[b]!r} disagree")
    value = hf.get(a) if hf.get(a) is not None else hf.get(b)
    return HF_DEFAULTS[a] if value is None else value


def revival_config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """Map a HF xLSTM `config.json` dict to (revival ModelConfig, weight_mode); reject what revival can't honor."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(hf).__name__}")
    unknown = sorted(set(hf) - COMPUTE_KEYS - NON_COMPUTE_KEYS)
    if unknown:
        raise ValueError(f"config.json: unsupported key(s) {unknown}; revival knows {sorted(COMPUTE_KEYS)} "
                         f"(computation) and {sorted(NON_COMPUTE_KEYS)} (no effect on outputs)")
    if hf.get("model_type", "xlstm") != "xlstm":
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'xlstm'")
    architectures = hf.get("architectures") or [ARCHITECTURE]
    if list(architectures) != [ARCHITECTURE]:
        raise ValueError(f"config.json: architectures {architectures!r} not supported; expected [{ARCHITECTURE!r}]")
    if hf.get("is_encoder_decoder"):
        raise ValueError("config.json: is_encoder_decoder=true is not supported (xLSTM is decoder-only)")
    get = {k: hf.get(k, v) for k, v in HF_DEFAULTS.items()}
    rejected = [("add_out_norm", False, "revival always applies the final RMSNorm (transformers' own xLSTM code "
                 "applies it regardless of this key)"),
                ("norm_reduction_force_float32", False, "revival's norms always reduce in float32"),
                ("gate_soft_cap", None, "revival always soft-caps the gates")]
    for key, bad, why in rejected:
        if key in hf and hf[key] is bad:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported: {why}")
    if get["inference_state_dtype"] != "float32":
        raise ValueError(f"config.json: inference_state_dtype={get['inference_state_dtype']!r} is not supported; "
                         "revival keeps mLSTM states in float32")
    if get["weight_mode"] not in WEIGHT_MODES:
        raise ValueError(f"config.json: weight_mode={get['weight_mode']!r}; expected one of {list(WEIGHT_MODES)}")
    d_model = _pick(hf, "hidden_size", "embedding_dim")
    num_blocks = _pick(hf, "num_hidden_layers", "num_blocks")
    heads = get["num_heads"]
    for key in ("qk_dim_factor", "v_dim_factor"):
        dim = d_model * get[key]
        if dim != int(dim):
            raise ValueError(f"config.json: {key}={get[key]} gives a non-integer dimension {dim} for d_model={d_model}")
        multiple = hf.get("mlstm_round_up_to_multiple_of")
        if multiple is not None and _hf_round_up(dim, multiple) != int(dim):
            raise ValueError(f"config.json: mlstm_round_up_to_multiple_of={multiple} rounds {key} * hidden_size = "
                             f"{int(dim)} to {_hf_round_up(dim, multiple)}; transformers' layers use {int(dim)}, so "
                             "the two readings disagree")
    v_head_dim = int(d_model * get["v_dim_factor"]) // heads
    if hf.get("head_dim") is not None and hf["head_dim"] != v_head_dim:
        raise ValueError(f"config.json: head_dim={hf['head_dim']} disagrees with v_dim_factor * hidden_size / "
                         f"num_heads = {v_head_dim}")
    ffn_factor = _ffn_factor_for_revival(d_model, get["ffn_proj_factor"], get["ffn_round_up_to_multiple_of"])
    chunk = get["chunk_size"]  # a tile size: any power of two >= 8 computes the same outputs
    if not isinstance(chunk, int) or chunk < 8 or chunk & (chunk - 1):
        chunk = 64
    options = {} if get["eps"] == 1e-6 else {"x": {"eps": float(get["eps"])}}
    config = ModelConfig(
        vocab_size=get["vocab_size"], d_model=d_model, pattern="x" * num_blocks, num_heads=heads, chunk_size=chunk,
        qk_dim_factor=get["qk_dim_factor"], v_dim_factor=get["v_dim_factor"], gate_soft_cap=get["gate_soft_cap"],
        ffn_proj_factor=ffn_factor, ffn_round_up_to_multiple_of=get["ffn_round_up_to_multiple_of"],
        norm_eps=get["norm_eps"], final_norm="rms", tie_embeddings=bool(get["tie_word_embeddings"]),
        logit_soft_cap=get["output_logit_soft_cap"], use_bias=bool(get["use_bias"]), layer_options=options)
    return config, get["weight_mode"]


def special_token_ids(hf: dict) -> dict[str, Any]:
    """bos/eos/pad token ids of a HF config (transformers' defaults 0/2/1 where absent), for generation."""
    return {k: hf.get(k, default) for k, default in (("bos_token_id", 0), ("eos_token_id", 2), ("pad_token_id", 1))}


def hf_config_from_revival(config: ModelConfig, weight_mode: str = "single", dtype: torch.dtype | None = None,
                           special_tokens: dict | None = None) -> dict[str, Any]:
    """The HF `config.json` dict for a revival xLSTM-large config; rejects configs HF cannot express, by field."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode: expected one of {list(WEIGHT_MODES)}, got {weight_mode!r}")
    if set(config.pattern) != {"x"}:
        raise ValueError(f"pattern: HF xLSTM needs only 'x' blocks, got {config.pattern!r}")
    if config.final_norm != "rms":
        raise ValueError(f"final_norm: HF xLSTM uses an RMSNorm, got {config.final_norm!r}")
    if config.logit_soft_cap is None:
        raise ValueError("logit_soft_cap: None (no cap) cannot be written: transformers' xLSTMConfig requires a float "
                         "output_logit_soft_cap")
    x_options = dict(config.layer_options.get("x", {}))
    eps = x_options.pop("eps", 1e-6)
    if x_options:
        raise ValueError(f"layer_options: HF xLSTM cannot express {sorted(x_options)} for letter 'x' (only 'eps')")
    ffn_factor = _ffn_factor_for_hf(config.d_model, config.ffn_proj_factor, config.ffn_round_up_to_multiple_of)
    for key in ("qk_dim_factor", "v_dim_factor"):
        dim = int(config.d_model * getattr(config, key))
        if dim % 64:  # transformers sizes its state cache with round_up(dim, 64); other sizes break its forward
            raise ValueError(f"{key}: {key} * d_model = {dim} must be a multiple of 64 for transformers' xLSTM "
                             "(its cache rounds the head dims up to a multiple of 64)")
    hf = {"architectures": [ARCHITECTURE], "model_type": "xlstm", "vocab_size": config.vocab_size,
          "hidden_size": config.d_model, "embedding_dim": config.d_model, "num_hidden_layers": config.num_blocks,
          "num_blocks": config.num_blocks, "num_heads": config.num_heads, "use_bias": config.use_bias,
          "norm_reduction_force_float32": True, "tie_word_embeddings": config.tie_embeddings, "add_out_norm": True,
          "norm_eps": config.norm_eps, "qk_dim_factor": config.qk_dim_factor, "v_dim_factor": config.v_dim_factor,
          "chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
          "step_kernel": "native", "mode": "inference", "chunk_size": config.chunk_size, "return_last_states": True,
          "autocast_kernel_dtype": "bfloat16", "eps": eps, "inference_state_dtype": "float32",
          "ffn_proj_factor": ffn_factor, "ffn_round_up_to_multiple_of": config.ffn_round_up_to_multiple_of,
          "gate_soft_cap": config.gate_soft_cap, "output_logit_soft_cap": config.logit_soft_cap,
          "weight_mode": weight_mode, "use_cache": True, "max_inference_chunksize": 16384}
    hf.update(special_tokens or {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


# ---------------------------------------------------------------------------------------------------- names
def _hf_name(name: str, weight_mode: str) -> tuple[str, int]:
    """revival parameter name -> (HF tensor name, position among the row blocks of a fused tensor, else 0)."""
    head, _, rest = name.partition(".")
    if head == "embedding":
        return "backbone.embeddings." + rest, 0
    if head == "out_norm":
        return "backbone.out_norm." + rest, 0
    if head != "blocks":
        return name, 0  # lm_head.weight; anything else is not in the HF layout and shows up as a missing tensor
    index, _, rest = rest.partition(".")
    part, _, rest = rest.partition(".")
    module, _, leaf = rest.partition(".")
    prefix = f"backbone.blocks.{index}.{_BLOCK_PARTS.get(part, part)}."
    if weight_mode == "fused":
        for fused_part, fused, members in _FUSED:
            if part == fused_part and module in members and leaf in ("weight", "bias"):
                return f"{prefix}{fused}.{leaf}", members.index(module)
    return prefix + rest, 0


def hf_weight_plan(model: nn.Module, weight_mode: str = "single") -> dict[str, list[tuple[str, int, int]]]:
    """HF tensor name -> [(revival parameter name, first row, end row)], the rows of the HF tensor each fills.

    A tied LM head appears once, as the embedding. Shapes follow: the HF tensor is the row-wise stack of its parts.
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode: expected one of {list(WEIGHT_MODES)}, got {weight_mode!r}")
    plan: dict[str, list[tuple[str, int, int]]] = {}
    for name, param in model.named_parameters():
        hf_name, rank = _hf_name(name, weight_mode)
        plan.setdefault(hf_name, []).append((name, rank, param.shape[0] if param.ndim else 1))
    params = dict(model.named_parameters())
    for hf_name, parts in plan.items():  # ranks -> row offsets
        parts.sort(key=lambda p: p[1])
        start, rows = 0, []
        for name, _, n in parts:
            rows.append((name, start, start + n))
            start += n
        plan[hf_name] = rows
        if len(rows) > 1 and len({tuple(params[n].shape[1:]) for n, _, _ in rows}) != 1:
            raise ValueError(f"{hf_name}: parts {[n for n, _, _ in rows]} differ in trailing shape")
    return plan


def _expected_shape(model: nn.Module, parts: list[tuple[str, int, int]]) -> tuple[int, ...]:
    params = dict(model.named_parameters())
    first = params[parts[0][0]]
    return tuple(first.shape) if len(parts) == 1 else (parts[-1][2], *first.shape[1:])


def hf_state_dict(model: nn.Module, weight_mode: str = "single") -> dict[str, torch.Tensor]:
    """The model's weights under HF names (fused tensors concatenated; others share storage with the model)."""
    params = dict(model.named_parameters())
    out = {}
    for hf_name, parts in hf_weight_plan(model, weight_mode).items():
        tensors = [params[name].detach() for name, _, _ in parts]
        out[hf_name] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    return out


# ---------------------------------------------------------------------------------------------------- load
def _tensor_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index_path, single = directory / INDEX_NAME, directory / WEIGHTS_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: expected JSON with a 'weight_map' object ({err})") from err
        files = {name: directory / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ValueError(f"{index_path}: shard {path.name!r} listed in weight_map is missing")
        return files
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"directory: neither {WEIGHTS_NAME} nor {INDEX_NAME} in {str(directory)!r}")


def _file_shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF tensor name -> (shape, safetensors dtype string), read from the headers only."""
    out = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in (n for n, p in files.items() if p == path):
                if name not in present:
                    raise ValueError(f"{path.name}: tensor {name!r} listed in the index is not in the file")
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _check_against_files(model: nn.Module, plan: dict, shapes: dict, source: str) -> None:
    tied_head = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(plan) - set(shapes))
    unexpected = sorted(set(shapes) - set(plan) - tied_head)
    misshaped = [f"{n}: expected {_expected_shape(model, plan[n])}, got {shapes[n][0]}"
                 for n in sorted(set(plan) & set(shapes)) if shapes[n][0] != _expected_shape(model, plan[n])]
    problems = ([f"missing tensors {missing}"] if missing else []) + \
               ([f"unexpected tensors {unexpected}"] if unexpected else []) + \
               ([f"mis-shaped tensors [{'; '.join(misshaped)}]"] if misshaped else [])
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def load_hf_weights(model: nn.Module, directory: str | Path, weight_mode: str = "single") -> None:
    """Copy a HF xLSTM checkpoint's tensors into `model`'s (already allocated) parameters, one tensor at a time."""
    directory = Path(directory)
    files = _tensor_files(directory)
    plan = hf_weight_plan(model, weight_mode)
    _check_against_files(model, plan, _file_shapes(files), source=str(directory))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hf_name, parts in plan.items():
            for name, start, stop in parts:
                _copy_rows(files[hf_name], hf_name, start, stop, params[name])


READ_CHUNK_BYTES = 32 * 2**20


def _copy_rows(path: Path, hf_name: str, start: int, stop: int, target: torch.Tensor) -> None:
    """target <- rows [start, stop) of tensor `hf_name`, read in pieces of <= READ_CHUNK_BYTES from a memory map
    that is opened for each piece and closed right after (so its pages leave this process's resident memory)."""
    if target.ndim == 0:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            target.copy_(f.get_tensor(hf_name))
        return
    row_bytes = max(1, target[:1].numel() * 8)  # 8: the widest stored dtype (float64)
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    for row in range(start, stop, step):
        end = min(row + step, stop)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            target[row - start:end - start].copy_(f.get_slice(hf_name)[row:end])


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_hf_xlstm(model_class: type, directory: str | Path, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """A `model_class` (revival's `LanguageModel`) from a HF xLSTM directory, on `device` (default CPU) in `dtype`
    (default: the stored dtype of the embedding). Names and shapes are checked before any parameter memory is
    allocated. `LanguageModel.from_pretrained` is the public entry."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"directory: no {CONFIG_NAME} in {str(directory)!r}")
    config, weight_mode = revival_config_from_hf(json.loads(config_path.read_text()))
    files = _tensor_files(directory)
    shapes = _file_shapes(files)
    if dtype is None:
        stored = shapes.get("backbone.embeddings.weight", (None, "F32"))[1]
        dtype = _SAFETENSORS_DTYPES.get(stored, torch.float32)
    # transformers' xLSTMForCausalLM never ties its head (tie_word_embeddings has no effect there): a stored
    # lm_head.weight is what it computes with. Load it untied, and tie afterwards only if it equals the embedding.
    head_stored = config.tie_embeddings and "lm_head.weight" in shapes
    if head_stored:
        config = config.replace(tie_embeddings=False)
    with torch.device("meta"):
        model = model_class(config)
    model.to(dtype)
    _check_norm_bias(model)
    _check_against_files(model, hf_weight_plan(model, weight_mode), shapes, source=str(directory))
    model.to_empty(device=torch.device("cpu") if device is None else device)
    if config.tie_embeddings:  # to_empty replaces parameters one by one, which unties them
        model.lm_head.weight = model.embedding.weight
    if any(True for _ in model.buffers()):
        raise ValueError("model: buffers are not loaded from HF checkpoints; the xLSTM-large layout has none")
    load_hf_weights(model, directory, weight_mode)
    if head_stored and torch.equal(model.lm_head.weight, model.embedding.weight):
        model.lm_head.weight = model.embedding.weight
        model.config = config.replace(tie_embeddings=True)
    return model.eval()


def _check_norm_bias(model: nn.Module) -> None:
    if model.config.use_bias and any(getattr(b.norm, "bias", None) is None for b in model.blocks):
        raise ValueError("use_bias: HF xLSTM with use_bias=true has biased block RMSNorms (norm_mlstm.bias, "
                         "norm_ffn.bias), which revival's RMSNorm does not have")


# ---------------------------------------------------------------------------------------------------- save
def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
    yield shard


def save_hf_xlstm(model: nn.Module, directory: str | Path, weight_mode: str = "single",
                  max_shard_bytes: int | None = None, special_tokens: dict | None = None) -> Path:
    """Write `model` as a HF xLSTM directory (config.json + model.safetensors, or shards + index) atomically."""
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise ValueError(f"model: expected a LanguageModel, got {type(model).__name__}")
    _check_norm_bias(model)
    hf = hf_config_from_revival(model.config, weight_mode, model.dtype, special_tokens)
    tensors = {k: v.contiguous().cpu() for k, v in hf_state_dict(model, weight_mode).items()}
    if model.config.tie_embeddings:  # transformers' xLSTM does not tie: it needs the head stored (as its own copy)
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"].clone()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {str(directory)!r} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        shards = list(_shards(tensors, max_shard_bytes))
        if len(shards) == 1:
            save_file(shards[0], str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards, start=1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
                total += sum(t.numel() * t.element_size() for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (staging / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
        if not directory.exists():
            os.rename(staging, directory)
            return directory
        _replace_files(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _replace_files(staging: Path, directory: Path) -> None:
    """Move staged files into an existing directory (weights first, config last), then drop stale weight files."""
    new = sorted(p.name for p in staging.iterdir())
    for name in [n for n in new if n != CONFIG_NAME] + [CONFIG_NAME]:
        os.replace(staging / name, directory / name)
    for old in directory.iterdir():
        stale_weights = old.suffix == ".safetensors" or old.name == INDEX_NAME
        if stale_weights and old.name not in new:
            old.unlink()

