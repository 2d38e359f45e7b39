"""Per-step training records: the NeMo 2 log line, a JSONL metrics file, TensorBoard scalars.

The log line is NeMo 2's, field for field (REFERENCE.md section 4), so that one parser reads our
runs and NeMo's acceptance runs alike:

    Training epoch 0, iteration 5/39 | lr: 0.0009 | global_batch_size: 8 | global_step: 5 |
    reduced_train_loss: 10.27 | train_step_timing in s: 0.8123 | tokens_per_sec_per_gpu: 630.3 |
    consumed_samples: 48 | val_loss: 10.31

(one line; `iteration i/N` counts from 0 to train_steps-1 as in NeMo; consumed_samples is
counted after the step; val_loss is the latest validation, absent before the first). Floats are
printed with Python's `{:.4}` as NeMo's progress printer does (`6.706e+03`, `0.0001754`).
Our own fields follow after NeMo's: `tflops_per_gpu` and, where the accelerator's peak is
known, `mfu`; parsers read fields by key, so NeMo-only parsers ignore them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class StepMetrics:
    """One training step as the trainer measured it: what its log line, metrics.jsonl and
    TensorBoard report. (A step parsed back from a log is `benchmarks.logformats.StepRecord`.)"""

    step: int  # 0-based, NeMo's global_step
    train_steps: int
    lr: float
    global_batch_size: int
    loss: float
    step_time_s: float
    tokens_per_sec_per_gpu: float
    consumed_samples: int
    val_loss: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    grad_norm: float | None = None
    skipped: bool = False


def fmt(value: float) -> str:
    return f"{value:.4}"


def nemo_line(r: StepMetrics) -> str:
    """One NeMo 2 `Training epoch 0, iteration ...` line (no trailing newline)."""
    parts = [
        f"Training epoch 0, iteration {r.step}/{r.train_steps - 1}",
        f"lr: {fmt(r.lr)}",
        f"global_batch_size: {r.global_batch_size}",
        f"global_step: {r.step}",
    ]
    # NeMo prints no loss for a skipped (non-finite) step.
    if not r.skipped:
        parts.append(f"reduced_train_loss: {fmt(r.loss)}")
    parts += [
        f"train_step_timing in s: {fmt(r.step_time_s)}",
        f"tokens_per_sec_per_gpu: {fmt(r.tokens_per_sec_per_gpu)}",
        f"consumed_samples: {r.consumed_samples}",
    ]
    if r.val_loss is not None:
        parts.append(f"val_loss: {fmt(r.val_loss)}")
    if r.tflops_per_gpu is not None:
        parts.append(f"tflops_per_gpu: {fmt(r.tflops_per_gpu)}")
    if r.mfu is not None:
        parts.append(f"mfu: {fmt(r.mfu)}")
    return " | ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows past ~709


def validation_line(step: int, val_loss: float) -> str:
    return f"Validation at step {step} | val_loss: {fmt(val_loss)} | val_ppl: {fmt(perplexity(val_loss))}"


class MetricsWriter:
    """Rank 0's sink: stdout lines, an appended JSONL file and optional TensorBoard scalars."""

    def __init__(self, log_dir: str | None, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.jsonl = None
        self.tb = None
        if log_dir is None:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        # Appended, one JSON object per line: a resumed run continues the same file and a reader
        # keeps the last record of each step (as the log parsers do after a restart).
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        except Exception as err:  # the tensorboard package is optional
            self.print(f"TensorBoard scalars skipped: {type(err).__name__}: {err}")

    def print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, r: StepMetrics) -> None:
        self.print(nemo_line(r))
        self._json({"kind": "train", **asdict(r)})
        if self.tb is not None:
            for key in ("lr", "loss", "step_time_s", "tokens_per_sec_per_gpu", "tflops_per_gpu", "mfu", "grad_norm"):
                value = getattr(r, key)
                if value is not None and not r.skipped:
                    self.tb.add_scalar(f"train/{key}", value, r.step)

    def validation(self, step: int, val_loss: float) -> None:
        self.print(validation_line(step, val_loss))
        ppl = perplexity(val_loss)
        self._json({"kind": "valid", "step": step, "val_loss": val_loss, "val_ppl": ppl})
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", val_loss, step)
            self.tb.add_scalar("valid/ppl", ppl, step)

    def _json(self, obj: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(obj) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
