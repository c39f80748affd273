"""``hpcqn plot RUN_DIR...``: loss and accuracy curves of one or several runs (the
metrics files ``hpcqn run`` writes, one JSON line per epoch per method) in one PNG, so
optimizers compare at a glance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_runs(run_dirs: list[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{label: records}`` for every ``*.jsonl`` in the run directories (label: the
    method, prefixed by the directory's name when several are given)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for directory in map(Path, run_dirs):
        files = sorted(directory.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no metrics files (*.jsonl)")
        for file in files:
            records = [json.loads(line) for line in file.read_text().splitlines() if line]
            if records:
                label = file.stem if len(run_dirs) == 1 else f"{directory.name}/{file.stem}"
                runs[label] = records
    if not runs:
        raise ValueError(f"no records in {', '.join(map(str, run_dirs))}")
    return runs


def plot(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Training loss against epoch and against seconds, and the test metric (accuracy,
    or test loss for reconstruction jobs) against epoch, one line per method; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(run_dirs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, records in runs.items():
        epochs = [r["epoch"] for r in records]
        axes[0].semilogy(epochs, [r["train_loss"] for r in records], marker=".", label=label)
        axes[1].semilogy([r["seconds"] for r in records], [r["train_loss"] for r in records],
                         marker=".", label=label)
        key = "test_accuracy" if "test_accuracy" in records[0] else "test_loss"
        axes[2].plot(epochs, [r[key] for r in records], marker=".", label=label)
        axes[2].set_ylabel(key.replace("_", " "))
    axes[0].set(xlabel="epoch", ylabel="training loss", title="loss per epoch")
    axes[1].set(xlabel="training seconds", ylabel="training loss", title="loss per second")
    axes[2].set(xlabel="epoch", title="test metric")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
