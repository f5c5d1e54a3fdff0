"""What a study writes: the environment record (device, versions), the JSON file (atomically) and the PNG plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .models import peak_flops, transformers_version


def environment(device: torch.device) -> dict[str, Any]:
    """{"created", "device": {...}, "versions": {...}} for the JSON."""
    info: dict[str, Any] = {"type": device.type, "name": platform.processor() or platform.machine(),
                            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", total_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count, peak_bf16_flops=peak_flops(device))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__

    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": info,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "triton": triton_version,
                         "transformers": transformers_version(), "revival": __version__, "git_commit": _git_commit(),
                         "git_dirty": _git_dirty()}}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from `git_commit` (then the code that ran is not exactly that commit)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as indented JSON to `path` via a temporary file + rename (nothing half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, allow_nan=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- plots
PANELS = {  # study -> [(metric, y label, log y)]
    "train": [("tokens_per_s", "training tokens/s", True), ("mfu", "MFU", False),
              ("peak_memory_bytes", "peak memory (GiB)", False)],
    "prefill": [("tokens_per_s", "prefill tokens/s", True), ("ttft_seconds", "time to first token (s)", True),
                ("peak_memory_bytes", "peak memory (GiB)", False)],
    "decode": [("tokens_per_s", "decode tokens/s", True), ("peak_memory_bytes", "peak allocated (GiB)", False),
               ("state_bytes_after_prefill", "state / cache bytes (MiB)", True)],
}


def plot_study(result: dict[str, Any], path: Path) -> list[str]:
    """One panel per metric, context on a log2 x axis, one line per model (and batch size for decode); returns the
    legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    study = result["study"]
    panels = [p for p in PANELS[study] if any(_value(pt, p[0]) is not None for pt in result["points"])]
    panels = panels or PANELS[study][:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    lines: dict[tuple[str, int], list[dict]] = {}
    for point in result["points"]:
        lines.setdefault((point["model"], point["batch"] if study == "decode" else 0), []).append(point)
    models = list(dict.fromkeys(p["model"] for p in result["points"]))
    colors = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    batches = result["config"]["batch_sizes"]
    for ax, (metric, label, log_y) in zip(axes[0], panels):
        for (model, batch), points in lines.items():
            xy = [(p["context"], _value(p, metric)) for p in points if _value(p, metric) is not None]
            if not xy:
                continue
            style = ("-", ":", "-.", "--")[batches.index(batch) % 4] if study == "decode" else "-"
            name = f"{model} (B={batch})" if study == "decode" and len(batches) > 1 else model
            ax.plot(*zip(*xy), style, color=colors(models.index(model)), marker="x" if model.startswith("hf-")
                    else "o", markersize=4, label=name)
        contexts = result["config"]["contexts"]
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    legend: dict[str, Any] = {}  # every line of every panel: a model missing from the last panel is still named
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axes[0][-1].legend(list(legend.values()), list(legend), fontsize=7, loc="center left",
                           bbox_to_anchor=(1.02, 0.5))
    device = result["device"].get("name", result["device"]["type"])
    fig.suptitle(f"revival bench {study} · {result['config']['size']} · {result['config']['dtype']} · {device}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return list(legend)


def _value(point: dict[str, Any], metric: str) -> float | None:
    value = point.get(metric) if point.get("status") == "ok" else None
    if value is None:
        return None
    if metric == "peak_memory_bytes":
        return value / 2**30
    if metric == "state_bytes_after_prefill":
        return value / 2**20
    return value
