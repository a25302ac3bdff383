"""Run reports as text and pictures: CSV tables and the learning curve (no tracking here)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..datasets import Partition


def partition_summary_csv(partition: Partition, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """One row per client: split sizes, then its sample count per class."""
    counts = partition.class_counts(labels, len(class_names))
    out = io.StringIO()
    out.write(",".join(["client", "train", "val", "test", *(f"class:{c}" for c in class_names)]) + "\n")
    for c in range(partition.num_clients):
        sizes = [len(partition.train[c]), len(partition.val[c]), len(partition.test[c])]
        out.write(",".join(str(v) for v in [c, *sizes, *counts[c]]) + "\n")
    return out.getvalue()


def client_accuracy_csv(test_acc, test_count, val_acc, val_count) -> str:
    """One row per client: its personalized test and val accuracy and sample counts."""
    out = io.StringIO()
    out.write("client,test_acc,test_samples,val_acc,val_samples\n")

    def fmt(v: float) -> str:
        return "" if math.isnan(v) else f"{v:.6f}"

    for c in range(len(test_acc)):
        out.write(f"{c},{fmt(test_acc[c])},{test_count[c]},{fmt(val_acc[c])},{val_count[c]}\n")
    return out.getvalue()


def learning_curve_png(history: Sequence[dict[str, float]], path: str | Path, title: str) -> Path:
    """Accuracy and train loss over rounds, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("test_acc_mean", "test (client mean)"), ("test_acc_weighted", "test (weighted)"),
                       ("val_acc_mean", "val (client mean)")):
        pts = [(h["round"], h[key]) for h in history if key in h]
        if pts:
            acc_ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    acc_ax.set(xlabel="round", ylabel="personalized accuracy", ylim=(0, 1))
    acc_ax.legend(loc="lower right")
    acc_ax.grid(alpha=0.3)
    loss_ax.plot([h["round"] for h in history], [h["train_loss"] for h in history], color="tab:red")
    loss_ax.set(xlabel="round", ylabel="train loss")
    loss_ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def label_skew(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-client label statistics of a (clients, classes) count matrix.

    `entropy`: Shannon entropy of the client's label distribution in bits
    (log2 of the class count when balanced, 0 when one class);
    `dominant`: share of the client's most frequent class; `classes`: how
    many classes it holds; `samples`: its sample count.
    """
    counts = np.asarray(counts, dtype=np.float64)
    samples = counts.sum(axis=1)
    shares = counts / np.maximum(samples, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(shares > 0, -shares * np.log2(shares), 0.0)
    return {
        "samples": samples.astype(np.int64),
        "classes": (counts > 0).sum(axis=1),
        "entropy": terms.sum(axis=1),
        "dominant": shares.max(axis=1, initial=0.0),
    }


def partition_heatmap_png(
    counts: np.ndarray, class_names: Sequence[str], path: str | Path, title: str
) -> Path:
    """A clients x classes heatmap of each client's label shares, with its sample counts beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    counts = np.asarray(counts)
    clients, classes = counts.shape
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    width = min(4 + 0.18 * classes, 24)
    height = min(2 + 0.22 * clients, 20)
    fig, (heat_ax, bar_ax) = plt.subplots(
        1, 2, figsize=(width + 2.5, height), gridspec_kw={"width_ratios": [max(classes, 4), max(classes, 4) / 4]},
        sharey=True,
    )
    image = heat_ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(shares.max()), 1e-9),
                           interpolation="nearest")
    heat_ax.set(xlabel="class", ylabel="client")
    if classes <= 40:
        heat_ax.set_xticks(range(classes), [str(c) for c in class_names], rotation=90, fontsize=7)
    if clients <= 64:
        heat_ax.set_yticks(range(clients), [str(c) for c in range(clients)], fontsize=7)
    fig.colorbar(image, ax=heat_ax, label="share of the client's samples", fraction=0.04, pad=0.02)
    bar_ax.barh(range(clients), counts.sum(axis=1), color="tab:gray")
    bar_ax.set(xlabel="samples")
    bar_ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def sensitivity_csv(rows: Sequence[dict[str, object]]) -> str:
    """The sensitivity table: one row per personalized part (keys of the first row are the columns)."""
    if not rows:
        return ""
    columns = list(rows[0])
    out = io.StringIO()
    out.write(",".join(columns) + "\n")
    for row in rows:
        out.write(",".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in (row[c] for c in columns)) + "\n")
    return out.getvalue()


def sensitivity_png(
    labels: Sequence[str], accuracies: Sequence[float], groups: Sequence[str], baseline: float,
    path: str | Path, title: str,
) -> Path:
    """Personalized accuracy of each part as a bar, one colour per group, FedAvg as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    palette = plt.get_cmap("tab10")
    order = list(dict.fromkeys(groups))
    colors = [palette(order.index(g) % 10) for g in groups]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 2), 3.8))
    bars = ax.bar(range(len(labels)), accuracies, color=colors)
    ax.bar_label(bars, labels=[f"{a:.3f}" for a in accuracies], fontsize=7, padding=2)
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"FedAvg {baseline:.3f}")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="personalized test accuracy", ylim=(0, 1), title=title)
    for group in order:
        ax.bar([0], [0], width=0, color=palette(order.index(group) % 10), label=group)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
