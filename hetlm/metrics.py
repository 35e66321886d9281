"""Training records: metrics.jsonl, TensorBoard events and the loss plot of a run folder."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from hetlm.evaluate import bits_per_byte
from hetlm.io import atomic_write_text
from hetlm.reporting import Reporter
from hetlm.store import RunDir


def finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinity become null: JSON has no spelling for them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def eval_record(step: int, val_loss: float, targets: int, target_bytes: int) -> dict[str, Any]:
    """The record of an evaluation during training: ``targets`` tokens scored, whose text is ``target_bytes`` long."""
    record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
    if target_bytes:
        record["val_bpb"] = bits_per_byte(val_loss * targets, target_bytes)
    return record


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl and TensorBoard events of a run (written by the main process only)."""

    def __init__(self, run: RunDir, start_step: int, enabled: bool, reporter: Reporter) -> None:
        self.path = run.metrics_path
        self.enabled = enabled
        self.handle = None
        self.tensorboard = None
        if not enabled:
            return
        self._drop_after(start_step)
        self.handle = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        try:
            self.tensorboard = SummaryWriter(log_dir=str(run.tensorboard_path), purge_step=start_step + 1)
        except Exception as exc:  # an optional extra must never stop training
            reporter.warning(f"TensorBoard logging disabled: {exc}")

    def _drop_after(self, step: int) -> None:
        # Records a killed run wrote past its last checkpoint are replayed after resuming.
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = finite(record)
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            kind, step = record["kind"], record["step"]
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    if not run.metrics_path.is_file():
        return []
    records = []
    for line in run.metrics_path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def plot_losses(run: RunDir) -> Path | None:
    """RUN/loss.png from metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not train and not val:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if val:
        axes.plot(*zip(*val, strict=True), marker="o", label="val loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(run.path.name)
    axes.grid(alpha=0.3)
    axes.legend()
    target = run.loss_plot_path
    tmp = target.with_name(f".{target.name}.tmp.png")
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, target)
    return target
