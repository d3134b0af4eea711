"""Where training metrics go: JSON lines, TensorBoard event files, a PNG of the curves.

The JSON-lines file is the record of truth (one object per logged step, with a
``kind`` of ``train`` or ``valid``); TensorBoard and the plot are views of it.
On resume, records after the restored step are dropped first, so a run that
was killed and resumed has the same log as one that ran straight.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf (e.g. the perplexity of a class with no examples) become null: strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends records to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``; plots on demand.

    ``enabled=False`` (every process of a multi-process job but the first) writes nothing.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.plot_path = os.path.join(workdir, "loss_curves.png")
        self.enabled = enabled
        if not enabled:
            return
        kept = [r for r in read_records(self.path) if r["step"] <= resume_step]
        with open(self.path, "w") as f:  # rewrite: drop what the restored step had not reached
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")
        self._writer = _EventWriter(os.path.join(workdir, "tensorboard"), resume_step) if tensorboard else None

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **json_safe(values)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._writer.scalars(step, {f"{kind}/{k}": v for k, v in record.items()
                                        if k not in ("kind", "step") and isinstance(v, (int, float))})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def plot(self, title: str = "") -> str | None:
        """Writes loss_curves.png (train loss / CE / CT, valid perplexities); returns its path."""
        if not self.enabled:
            return None
        return plot_curves(read_records(self.path), self.plot_path, title)


class _EventWriter:
    """TensorBoard scalars through the ``tensorboard`` package's own event writer (no TF, no torch).

    On resume, a ``SessionLog.START`` event at the restored step tells
    TensorBoard to drop the events after it that the earlier attempt wrote.
    """

    def __init__(self, directory: str, resume_step: int):
        # deferred: tensorboard's protos load slowly and only runs that log events need them
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(directory, exist_ok=True)
        self._pb = event_pb2
        self._writer = EventFileWriter(directory)
        if resume_step:
            self._writer.add_event(event_pb2.Event(
                wall_time=time.time(), step=resume_step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self._writer.add_event(self._pb.Event(wall_time=time.time(), step=int(step), summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def agg_figure(figsize: tuple[float, float], what: str):
    """A matplotlib ``Figure`` on the Agg canvas, or None (logged, naming ``what``) without matplotlib.

    Not pyplot: no global figure state, and a caller's backend (a notebook's) is left alone.
    Imported here, not at the top: matplotlib is slow to import and only the plots need it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logging.warning(f"matplotlib is not installed: no {what}")
        return None
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(records: list[dict[str, Any]], path: str, title: str = "") -> str | None:
    fig = agg_figure((11, 4), "loss plot")
    if fig is None:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    axes = fig.subplots(1, 2)
    for key in ("loss", "ce_loss", "ct_loss"):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            axes[0].plot(*zip(*points), label=key)
    axes[0].set(xlabel="step", ylabel="nats / token", title="train")
    for key in ("ppl_positive", "ppl_negative", "ppl_unlabeled"):
        points = [(r["step"], r[key]) for r in valid if r.get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=key)
    axes[1].set(xlabel="step", ylabel="perplexity", title="valid", yscale="log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
