"""Peak memory of loading a >= 1 GB Hugging Face xLSTM checkpoint with `revival.from_pretrained` (issue 6: <= 1.3x).

What is measured: the peak resident set size (VmHWM in /proc/self/status, Linux) of a fresh child process, minus its
resident size just before the load call (after `import torch, revival`); the peak counter is reset right before the
load (`echo 5 > /proc/self/clear_refs`). RSS counts everything the process touches: tensors (torch's allocator is
not Python's, so tracemalloc would miss them), and the file pages of a safetensors memory map while it is mapped.
The ratio is that peak delta over the bytes of the parameters the model ends up with (= the checkpoint's tensor
bytes when loading in the stored dtype; half of them when loading float32 weights as bfloat16).

Modes, each in its own child process:
    revival          revival.from_pretrained(dir)                           (stored dtype, float32)
    revival-bf16     revival.from_pretrained(dir, dtype=torch.bfloat16)
    *-warm           the same after paying the process's one-time imports (torch's meta-device kernels, revival's
                     layer modules: ~150 MB of RSS, whatever the model size) before the measurement starts
    naive            LanguageModel(config) built normally, safetensors.torch.load_file of the whole file, copy in
                     (the common way, for comparison)

The checkpoint (random weights, xLSTM-large layout, weight_mode "fused" so split reads are exercised) is written
once into .cache/load_memory/ (ignored by git). Writes benchmarks/results/load_memory.json.

    .venv/bin/python benchmarks/load_memory.py [--blocks 14] [--d-model 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHECKPOINT = ROOT / ".cache" / "load_memory" / "xlstm-large-random"
RESULTS = ROOT / "benchmarks" / "results" / "load_memory.json"


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child(mode: str, directory: str) -> None:
    """Load once, print one JSON line with the peak RSS delta and the loaded parameter bytes."""
    requested = mode
    import safetensors
    import torch

    import revival
    from revival.models.hf_xlstm import hf_weight_plan, revival_config_from_hf

    torch.set_num_threads(1)
    if mode.endswith("-warm"):  # pay the one-time imports (torch's meta-device kernels, revival's layers) first
        import revival.layers.xlstm_large  # noqa: F401

        torch.empty(4, 4, device="meta").normal_()
        mode = mode.removesuffix("-warm")
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if mode == "revival":
        model = revival.from_pretrained(directory)
    elif mode == "revival-bf16":
        model = revival.from_pretrained(directory, dtype=torch.bfloat16)
    elif mode == "naive":
        from safetensors.torch import load_file

        config, weight_mode = revival_config_from_hf(json.loads((Path(directory) / "config.json").read_text()))
        model = revival.LanguageModel(config)  # allocated and randomly initialized, then overwritten
        tensors = load_file(str(Path(directory) / "model.safetensors"))  # every tensor at once
        params = dict(model.named_parameters())
        with torch.no_grad():
            for hf_name, parts in hf_weight_plan(model, weight_mode).items():
                for name, first, end in parts:
                    params[name].copy_(tensors[hf_name][first:end])
        del tensors
    else:
        raise ValueError(f"mode: unknown {mode!r}")
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"mode": requested, "rss_before_bytes": before * 1024, "peak_delta_bytes": (peak - before) * 1024,
                      "param_bytes": param_bytes, "ratio": (peak - before) * 1024 / param_bytes,
                      "seconds": round(seconds, 2), "torch": torch.__version__,
                      "safetensors": safetensors.__version__}))


def make_checkpoint(blocks: int, d_model: int) -> int:
    """Write the random checkpoint (if not there yet); returns its tensor bytes."""
    import torch

    from revival.models import LanguageModel, preset_config
    from revival.models.hf_xlstm import save_hf_xlstm

    if not (CHECKPOINT / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = preset_config("xlstm-large", d_model=d_model, num_blocks=blocks, num_heads=4)
        save_hf_xlstm(LanguageModel(config), CHECKPOINT, weight_mode="fused")
    from safetensors import safe_open

    total = 0
    with safe_open(str(CHECKPOINT / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            numel = 1
            for n in sl.get_shape():
                numel *= n
            total += numel * {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}[sl.get_dtype()]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=14)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    checkpoint_bytes = make_checkpoint(args.blocks, args.d_model)
    runs = []
    for mode in ("revival", "revival-warm", "revival-bf16", "revival-bf16-warm", "naive"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(CHECKPOINT)], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        runs[-1]["ratio_vs_checkpoint_bytes"] = runs[-1]["peak_delta_bytes"] / checkpoint_bytes
        print(f"{mode:17s} peak +{runs[-1]['peak_delta_bytes'] / 2**30:.3f} GiB for "
              f"{runs[-1]['param_bytes'] / 2**30:.3f} GiB of parameters: {runs[-1]['ratio']:.3f}x "
              f"({runs[-1]['seconds']} s)")
    result = {
        "benchmark": "peak RSS of loading a HF xLSTM checkpoint",
        "measure": "VmHWM - VmRSS before the load call, fresh child process per mode, VmHWM reset via clear_refs; "
                   "ratio = peak delta / bytes of the loaded parameters",
        "target": "revival ratio <= 1.3",
        "note": "the cold runs include ~150 MB of one-time imports (torch's meta-device kernels, revival's layer "
                "modules), paid once per process whatever the model size; the -warm runs exclude them",
        "device": "cpu", "machine": platform.platform(), "processor": platform.processor(), "python": sys.version,
        "checkpoint": {"layout": f"xlstm-large d_model={args.d_model} blocks={args.blocks} vocab=50304 "
                                 "weight_mode=fused float32", "tensor_bytes": checkpoint_bytes},
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint {checkpoint_bytes / 2**30:.3f} GiB -> {RESULTS}")


if __name__ == "__main__":
    main()
