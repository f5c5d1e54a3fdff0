"""Metrics logging: a CSV file, TensorBoard (when installed), and a loss-curve PNG."""

from __future__ import annotations

import csv
import os
from pathlib import Path


class MetricsLogger:
    """Appends rows of metrics to `<out_dir>/metrics.csv` and mirrors them to TensorBoard.

    CSV columns: step, split (train | val), metric, value. Train rows: loss (mean over the steps since the previous
    row), lr, tokens (seen so far), tokens_per_s, peak_mem_mb, skipped_steps; val rows: loss, perplexity, bpb, tokens
    (evaluated)."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int = 0, print_fn=print):
        """resume_step > 0: a resumed run; rows logged after that step by the interrupted run are dropped first."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        if resume_step > 0 and self.csv_path.is_file():
            self._drop_rows_after(resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
                print_fn("warning: train.tensorboard is true but the tensorboard package is not installed (pip install "
                         "tensorboard, or the `dev` extra); logging to metrics.csv only")
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                            purge_step=resume_step + 1 if resume_step > 0 else None)

    def _drop_rows_after(self, step: int) -> None:
        with open(self.csv_path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0], *(row for row in rows[1:] if int(row[0]) <= step)] if rows else []
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        os.replace(tmp, self.csv_path)

    def log(self, step: int, split: str, **metrics: float) -> None:
        row = {"step": step, "split": split, **metrics}
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "split", "metric", "value"])
            for name, value in metrics.items():
                writer.writerow([step, split, name, f"{value:.6g}"])
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(csv_path: str | Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(split, metric): [(step, value), ...]} from a metrics.csv file."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            series.setdefault((row["split"], row["metric"]), []).append((int(row["step"]), float(row["value"])))
    return series


def plot_loss_curves(runs: dict[str, str | Path], path: str | Path, x: str = "tokens") -> Path:
    """Plot train and validation loss of one or more runs ({label: metrics.csv}) into a PNG, written atomically.

    x = "tokens" plots against tokens seen (needs the `tokens` train metric), "step" against optimizer steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (label, csv_path) in enumerate(runs.items()):
        series = read_metrics(csv_path)
        color = f"C{index}"
        for split, style in (("train", "-"), ("val", "o--")):
            points = series.get((split, "loss"), [])
            if not points:
                continue
            steps = [s for s, _ in points]
            if x == "tokens":  # tokens seen grow by the same amount every step: scale steps without a train row
                tokens = dict(series.get(("train", "tokens"), []))
                last = max(tokens, default=None)
                per_step = tokens[last] / last if last else float("nan")
                xs = [tokens.get(s, s * per_step) for s in steps]
            else:
                xs = steps
            ax.plot(xs, [v for _, v in points], style, color=color, label=f"{label} {split}",
                    alpha=0.6 if split == "train" else 1.0)
    ax.set_xlabel("tokens seen" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
